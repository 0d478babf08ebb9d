"""Page behaviour: partials for htmx, pagination, empty states, users admin, task status."""

from __future__ import annotations

from datetime import timedelta

from portal.extensions import db
from portal.models import ActionLog, Role, Task, User, utcnow
from tests.conftest import PASSWORD, make_server, make_task, make_user, make_vm

HX = {"HX-Request": "true"}


def as_user(app, client, username, role=Role.MANAGER, **kw):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        user = make_user(username, role, **kw)
        uid = user.id
    assert client.post("/login", data={"username": username, "password": PASSWORD}).status_code == 302
    return uid


def test_full_page_or_partial(app, client):
    as_user(app, client, "boss")
    full = client.get("/vms/").get_data(as_text=True)
    part = client.get("/vms/", headers=HX).get_data(as_text=True)
    assert "<html" in full and "<nav" in full
    assert "<html" not in part and "No VMs yet" in part


def test_empty_states_say_what_to_do(app, client):
    as_user(app, client, "boss")
    assert "Pick an appliance in the Library" in client.get("/vms/").get_data(as_text=True)
    assert "register one by hostname" in client.get("/servers/").get_data(as_text=True)
    assert "Upload virtual disks, import an OVA/OVF" in client.get("/library/").get_data(as_text=True)
    assert "No tasks yet" in client.get("/tasks/").get_data(as_text=True)


def test_regular_user_empty_state(app, client):
    as_user(app, client, "reg", Role.REGULAR)
    assert "A manager or power user can create one" in client.get("/vms/").get_data(as_text=True)


def test_vm_list_paginates_and_filters(app, client):
    uid = as_user(app, client, "boss")
    app.config["PAGE_SIZE"] = 10
    with app.app_context():
        owner = db.session.get(User, uid)
        server = make_server()
        for i in range(25):
            make_vm(owner, f"v{i:02d}", server=server, state="running" if i % 5 == 0 else "off")
    page1 = client.get("/vms/").get_data(as_text=True)
    assert "Page 1 of 3" in page1 and "v00" in page1 and "v10" not in page1
    page3 = client.get("/vms/?page=3", headers=HX).get_data(as_text=True)
    assert "v24" in page3 and "v00" not in page3
    running = client.get("/vms/?state=running").get_data(as_text=True)
    assert "v05" in running and "v01" not in running
    named = client.get("/vms/?q=v1").get_data(as_text=True)
    assert "v12" in named and "v21" not in named
    assert client.get("/vms/?page=99").status_code == 200  # past the end: empty page, not an error
    assert client.get("/vms/?state=bogus").status_code == 200  # unknown filter ignored


def test_summary_counts(app, client):
    uid = as_user(app, client, "pow", Role.POWER, max_vms=4)
    with app.app_context():
        me = db.session.get(User, uid)
        other = make_user("someone")
        make_server(status="up")
        make_server(status="down")
        make_vm(me, "mine1", state="running")
        make_vm(me, "mine2", state="off")
        make_vm(other, "theirs", state="running")
        make_task(me, state="failed")
        old = make_task(me, state="failed")
        old.created_at = utcnow() - timedelta(days=2)
        make_task(me, state="running")
        db.session.commit()
    s = client.get("/api/summary").get_json()
    assert s["vms_total"] == 2 and s["vms"] == {"off": 1, "running": 1}
    assert s["tasks"] == {"running": 1, "queued": 0, "failed_last_day": 1}
    assert s["quota"][0] == {"label": "VMs", "used": 2, "limit": 4, "unit": ""}
    assert s["servers"] == {"up": 1, "down": 1, "marked_down": 0}
    panel = client.get("/_summary").get_data(as_text=True)
    assert 'data-testid="vm-total">2<' in panel and "theirs" not in panel
    assert 'hx-trigger="every 5s"' in client.get("/").get_data(as_text=True)


def test_manager_creates_edits_and_resets_users(app, client):
    as_user(app, client, "boss")
    r = client.post("/users/new", data={"username": "alice", "role": "power", "email": "a@example.org",
                                        "max_vms": 2, "max_memory_mb": 2048, "max_disk_gb": 20})
    assert r.status_code == 200
    body = r.get_data(as_text=True)
    password = body.split('data-testid="new-password">')[1].split("<")[0]
    assert len(password) >= 12
    fresh = app.test_client()
    assert fresh.post("/login", data={"username": "alice", "password": password}).status_code == 302
    with app.app_context():
        alice = db.session.execute(db.select(User).where(User.username == "alice")).scalar_one()
        assert (alice.role, alice.max_vms, alice.max_memory_mb, alice.max_disk_gb) == ("power", 2, 2048, 20)
        assert password not in alice.password_hash
        aid = alice.id
    r = client.post(f"/users/{aid}", data={"role": "regular", "email": "", "max_vms": 0})
    assert r.status_code == 302
    listing = client.get("/users/").get_data(as_text=True)
    assert "alice" in listing and "Regular user" in listing
    r = client.post(f"/users/{aid}/reset-password")
    new_pw = r.get_data(as_text=True).split('data-testid="new-password">')[1].split("<")[0]
    assert fresh.get("/").status_code == 302  # old session ended
    assert app.test_client().post("/login", data={"username": "alice", "password": new_pw}).status_code == 302
    with app.app_context():
        actions = set(db.session.execute(db.select(ActionLog.action)).scalars())
        assert {"user-created", "user-updated", "password-reset"} <= actions


def test_user_form_rejects_bad_input_and_changes_nothing(app, client):
    as_user(app, client, "boss")
    with app.app_context():
        before = db.session.execute(db.select(db.func.count(User.id))).scalar_one()
    for data, message in [
        ({"username": "boss", "role": "power"}, "exists already"),
        ({"username": "BOSS", "role": "power"}, "exists already"),
        ({"username": "bad name;rm", "role": "power"}, "Letters, digits"),
        ({"username": "x", "role": "power"}, "between 2 and 64"),
        ({"username": "ok", "role": "emperor"}, "Not a valid choice"),
        ({"username": "ok", "role": "power", "max_vms": -1}, "between 0 and 10000"),
    ]:
        r = client.post("/users/new", data=data)
        assert r.status_code == 400, data
        assert message in r.get_data(as_text=True), (data, message)
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(User.id))).scalar_one() == before


def test_last_manager_cannot_be_demoted_or_disabled(app, client):
    uid = as_user(app, client, "boss")
    r = client.post(f"/users/{uid}", data={"role": "regular"}, follow_redirects=True)
    assert "at least one active manager" in r.get_data(as_text=True)
    r = client.post(f"/users/{uid}", data={"role": "manager", "disabled": "y"}, follow_redirects=True)
    assert "at least one active manager" in r.get_data(as_text=True)
    with app.app_context():
        boss = db.session.get(User, uid)
        assert boss.role == "manager" and not boss.disabled


def test_users_list_shows_quota_usage(app, client):
    as_user(app, client, "boss")
    with app.app_context():
        pow_user = make_user("pow", Role.POWER, max_vms=3, max_memory_mb=4096, max_disk_gb=50)
        make_vm(pow_user, "p1", memory_mb=1024, disk_gb=20)
    body = client.get("/users/").get_data(as_text=True)
    assert "1 / 3" in body and "1024 / 4096 MB" in body and "20 / 50 GB" in body


def test_task_status_polls_until_finished(app, client):
    uid = as_user(app, client, "boss")
    with app.app_context():
        task = make_task(db.session.get(User, uid), state="running")
        task.job_id = None  # no job behind it: reconcile leaves it alone
        task.step, task.pct, task.bytes_done, task.bytes_total, task.eta_seconds = "Copying disk", 40, 400 << 20, 1 << 30, 75
        db.session.commit()
        tid = task.id
    r = client.get(f"/tasks/{tid}/_status", headers=HX)
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and "hx-trigger" in body
    assert "Copying disk" in body and "40 %" in body and "400.0 MiB of 1.0 GiB" in body and "about 1 min 15 s left" in body
    with app.app_context():
        t = db.session.get(Task, tid)
        t.state, t.pct, t.error = "failed", 40, "Disk full on srv1:/var/lib/corral/disk1"
        db.session.commit()
    r = client.get(f"/tasks/{tid}/_status", headers=HX)
    assert r.status_code == 286  # htmx stops polling
    assert r.headers["HX-Trigger"] == "task-finished"
    body = r.get_data(as_text=True)
    assert "Disk full on srv1" in body and "hx-trigger" not in body
    assert client.get(f"/tasks/{tid}/_status").status_code == 200  # plain requests get 200


def test_cancel_button_cancels_a_queued_task(app, client):
    uid = as_user(app, client, "pow", Role.POWER)
    r = client.post("/actionlog/export")
    assert r.status_code == 302
    tid = int(r.headers["Location"].rstrip("/").split("/")[-1])
    assert "Cancel task" in client.get(f"/tasks/{tid}").get_data(as_text=True)
    r = client.post(f"/tasks/{tid}/cancel", follow_redirects=True)
    assert "cancelled before it started" in r.get_data(as_text=True)
    with app.app_context():
        assert db.session.get(Task, tid).state == "cancelled"
        assert db.session.get(Task, tid).requester_id == uid


def test_double_click_on_export_gives_one_task(app, client):
    as_user(app, client, "pow", Role.POWER)
    first = client.post("/actionlog/export").headers["Location"]
    second = client.post("/actionlog/export", follow_redirects=True)
    assert "already running" in second.get_data(as_text=True)
    assert second.request.path == first
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Task.id))).scalar_one() == 1


def test_actionlog_filters_by_user_and_date(app, client):
    as_user(app, client, "boss")
    with app.app_context():
        a, b = make_user("ann"), make_user("bob")
        db.session.add_all([
            ActionLog(user_id=a.id, action="old-thing", at=utcnow() - timedelta(days=10)),
            ActionLog(user_id=a.id, action="ann-thing"),
            ActionLog(user_id=b.id, action="bob-thing"),
        ])
        db.session.commit()
        aid = a.id
    body = client.get(f"/actionlog?user={aid}").get_data(as_text=True)
    assert "ann-thing" in body and "old-thing" in body and "bob-thing" not in body
    start = (utcnow() - timedelta(days=1)).date().isoformat()
    body = client.get(f"/actionlog?user={aid}&start={start}").get_data(as_text=True)
    assert "ann-thing" in body and "old-thing" not in body
    r = client.get("/actionlog?start=not-a-date")
    assert r.status_code == 400 and "not valid" in r.get_data(as_text=True)


def test_unknown_objects_are_404_pages_not_tracebacks(app, client):
    as_user(app, client, "boss")
    for url in ("/vms/999", "/tasks/999", "/servers/999", "/users/999", "/api/vms/999", "/nowhere"):
        r = client.get(url)
        assert r.status_code == 404 and "Traceback" not in r.get_data(as_text=True)

"""The JSON API v1: tokens, CSRF, scopes, errors, pagination, 202 tasks, rate limits (test client, real Redis)."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest

from portal import api_tokens
from portal.extensions import db
from portal.models import VM, ApiToken, Appliance, ApplianceDisk, Role, Task, utcnow
from tests.conftest import csrf_token, log_in_client, make_server, make_user, make_vm


def make_token(user, scope: str = "write", **kw) -> str:
    _token, secret = api_tokens.create(user, name=f"t-{scope}", scope=scope, expires_in_days=kw.get("days"))
    db.session.commit()
    return secret


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def world(app):
    with app.app_context():
        boss = make_user("boss", Role.MANAGER)
        alice = make_user("alice", Role.POWER, max_vms=10, max_memory_mb=65536, max_disk_gb=500)
        server = make_server("srvapi")
        vms = [make_vm(alice, f"a{i}", server=server) for i in range(5)] + [make_vm(boss, "bossvm", server=server)]
        return {"boss": make_token(boss), "alice": make_token(alice), "alice_ro": make_token(alice, "read"),
                "vms": [v.id for v in vms], "server": server.id}


def test_account_page_creates_a_token_shown_once_stored_hashed_and_revocable(app, client):
    with app.app_context():
        make_user("carol")
    log_in_client(client, "carol")
    token = csrf_token(client, "/account")
    resp = client.post("/account/tokens/", data={"name": "ci", "scope": "read", "expires_in_days": "30",
                                                 "csrf_token": token})
    assert resp.status_code == 201 and resp.headers["Cache-Control"] == "no-store"
    secret = re.search(r'id="new-token">([^<]+)<', resp.get_data(as_text=True)).group(1)
    assert secret.startswith("corral_")
    assert secret not in client.get("/account").get_data(as_text=True)  # shown once
    with app.app_context():
        row = db.session.execute(db.select(ApiToken)).scalar_one()
        assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest() and row.scope == "read"
        assert row.expires_at is not None
    anon = app.test_client()
    assert anon.get("/api/v1/me", headers=bearer(secret)).get_json()["username"] == "carol"
    resp = client.post(f"/account/tokens/{row.id}/revoke", data={"csrf_token": csrf_token(client, "/account")})
    assert resp.status_code == 303
    got = anon.get("/api/v1/me", headers=bearer(secret))
    assert got.status_code == 401 and got.get_json()["error"]["code"] == "unauthorized"


def test_expired_and_unknown_tokens_are_refused(app, client):
    with app.app_context():
        user = make_user("dave")
        secret = make_token(user, days=1)
        db.session.execute(db.update(ApiToken).values(expires_at=utcnow() - timedelta(seconds=1)))
        db.session.commit()
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 401
    assert client.get("/api/v1/me", headers=bearer("corral_nope")).status_code == 401
    assert client.get("/api/v1/me").status_code == 401  # no token, no session


def test_csrf_applies_to_cookie_sessions_not_to_tokens(app, client, world):
    log_in_client(client, "alice")
    vm = world["vms"][0]
    resp = client.post(f"/api/v1/vms/{vm}/power", json={"action": "start"})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "csrf_failed"
    other = app.test_client()
    assert other.post(f"/api/v1/vms/{vm}/power", json={"action": "start"},
                      headers=bearer(world["alice"])).status_code == 202
    assert client.get("/api/v1/vms?limit=1").status_code == 200  # reads with the cookie session work


def test_read_only_token_reads_but_does_not_change(client, world):
    ro = bearer(world["alice_ro"])
    assert client.get("/api/v1/vms", headers=ro).status_code == 200
    resp = client.post(f"/api/v1/vms/{world['vms'][0]}/power", json={"action": "start"}, headers=ro)
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "read_only_token"


def test_pagination_filters_and_visibility(client, world):
    seen, cursor = [], None
    while True:
        got = client.get("/api/v1/vms", query_string={"limit": 2, **({"cursor": cursor} if cursor else {})},
                         headers=bearer(world["alice"])).get_json()
        seen += [v["id"] for v in got["items"]]
        cursor = got["next_cursor"]
        if cursor is None:
            break
    assert seen == world["vms"][:5]  # alice's, in id order, each once; not the manager's
    boss = client.get("/api/v1/vms?owner=boss&server=srvapi", headers=bearer(world["boss"])).get_json()
    assert [v["name"] for v in boss["items"]] == ["bossvm"] and boss["items"][0]["vmid"] > 1000
    bad = client.get("/api/v1/vms?limit=0&cursor=zz", headers=bearer(world["alice"]))
    assert bad.status_code == 422
    assert set(bad.get_json()["error"]["fields"]) == {"limit"}
    assert client.get("/api/v1/vms?cursor=zz", headers=bearer(world["alice"])).get_json()["error"]["fields"] == \
        {"cursor": ["Not a valid cursor."]}


def test_errors_are_json_with_stable_codes(client, world):
    h = bearer(world["alice"])
    resp = client.get(f"/api/v1/vms/{world['vms'][5]}", headers=h)  # the manager's VM: not visible
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"
    resp = client.post(f"/api/v1/vms/{world['vms'][0]}/power", json={"action": "fly"}, headers=h)
    assert resp.status_code == 422 and "action" in resp.get_json()["error"]["fields"]
    resp = client.post(f"/api/v1/vms/{world['vms'][0]}/power", json={"action": "resume"}, headers=h)
    assert resp.status_code == 409 and resp.get_json()["error"]["code"] == "refused"
    assert client.get("/api/v1/servers", headers=h).get_json()["error"]["code"] == "forbidden"
    resp = client.post("/api/v1/vms", data="not json", headers=h)
    assert resp.status_code == 422


def test_power_action_answers_202_with_the_task_and_refuses_a_second(app, client, world):
    h, vm = bearer(world["alice"]), world["vms"][1]
    resp = client.post(f"/api/v1/vms/{vm}/power", json={"action": "start"}, headers=h)
    assert resp.status_code == 202
    body = resp.get_json()
    assert resp.headers["Location"] == body["task_url"] == f"/api/v1/tasks/{body['task']['id']}"
    assert body["task"]["kind"] == "vm-start" and body["task"]["state"] == "queued"
    again = client.post(f"/api/v1/vms/{vm}/power", json={"action": "start"}, headers=h)
    assert again.status_code == 409 and again.get_json()["error"] == {
        "code": "busy", "message": again.get_json()["error"]["message"], "fields": {}, "task": body["task"]["id"]}
    # The manager cancels it; waiting on a finished task answers at once.
    cancelled = client.post(f"{body['task_url']}/cancel", headers=bearer(world["boss"])).get_json()
    assert cancelled["state"] == "cancelled"
    assert client.get(f"{body['task_url']}?wait=30", headers=h).get_json()["state"] == "cancelled"
    with app.app_context():
        assert db.session.get(Task, body["task"]["id"]).requester.username == "alice"


def test_settings_owner_and_delete_use_the_pages_rules(app, client, world):
    h, hb, vm = bearer(world["alice"]), bearer(world["boss"]), world["vms"][2]
    resp = client.patch(f"/api/v1/vms/{vm}", json={"memory_mb": 1024}, headers=h)
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["task"]["kind"] == "vm-settings"
    assert client.get(f"/api/v1/vms/{vm}", headers=h).get_json()["memory_mb"] == 1024
    assert client.put(f"/api/v1/vms/{vm}/owner", json={"owner": "boss"}, headers=h).status_code == 403
    moved = client.put(f"/api/v1/vms/{world['vms'][3]}/owner", json={"owner": "boss"}, headers=hb)
    assert moved.status_code == 200 and moved.get_json()["owner"]["username"] == "boss"
    assert client.delete(f"/api/v1/vms/{world['vms'][4]}", headers=h).get_json()["task"]["kind"] == "vm-delete"


def test_create_refused_by_a_rule_leaves_nothing_behind(app, client, world):
    with app.app_context():
        appliance = Appliance(name="api-app", state="ready", min_memory_mb=64, max_memory_mb=4096)
        db.session.add(appliance)
        db.session.flush()
        db.session.add(ApplianceDisk(appliance_id=appliance.id, path="api-app/disk0.qcow2", virtual_size_bytes=1 << 30))
        db.session.commit()
        appliance_id = appliance.id
        before = db.session.execute(db.select(db.func.count()).select_from(VM)).scalar_one()
    body = {"name": "newvm", "appliance_id": appliance_id, "memory_mb": 256, "backup_mode": "livesync",
            "backup_server_id": world["server"]}  # its own server cannot be its backup
    resp = client.post("/api/v1/vms", json=body, headers=bearer(world["boss"]))
    assert resp.status_code == 409 and resp.get_json()["error"]["code"] == "refused", resp.get_json()
    assert resp.get_json()["error"]["message"].startswith("srvapi cannot")  # the LiveSync rule, as on the page
    with app.app_context():
        assert db.session.execute(db.select(db.func.count()).select_from(VM)).scalar_one() == before
        assert db.session.execute(db.select(Task).where(Task.kind == "vm-create")).first() is None
    resp = client.post("/api/v1/vms", json={**body, "backup_mode": "none", "backup_server_id": None},
                       headers=bearer(world["boss"]))
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["task"]["kind"] == "vm-create"


def test_servers_mark_down_and_up(client, world):
    hb, sid = bearer(world["boss"]), world["server"]
    assert client.post(f"/api/v1/servers/{sid}/mark-down", headers=hb).get_json()["status"] == "marked_down"
    again = client.post(f"/api/v1/servers/{sid}/mark-down", headers=hb)
    assert again.status_code == 409
    assert client.post(f"/api/v1/servers/{sid}/mark-up", headers=hb).get_json()["status"] == "up"
    listed = client.get("/api/v1/servers", headers=hb).get_json()["items"]
    assert [(x["hostname"], x["vm_count"]) for x in listed] == [("srvapi", 6)]


def test_rate_limit_per_token(app, client, world):
    app.config["API_RATE_LIMIT"] = 3
    codes = [client.get("/api/v1/me", headers=bearer(world["alice"])).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert client.get("/api/v1/me", headers=bearer(world["boss"])).status_code == 200  # another token's budget


def test_openapi_document_and_docs_page(client, world):
    doc = client.get("/api/v1/openapi.json", headers=bearer(world["alice"])).get_json()
    assert doc["openapi"] == "3.1.0" and "/vms/{vm_id}/power" in doc["paths"]
    log_in_client(client, "alice")
    page = client.get("/api/v1/docs").get_data(as_text=True)
    assert "POST /api/v1/vms/{vm_id}/power" in page


def test_legacy_api_still_answers(client, world):
    log_in_client(client, "alice")
    assert client.get("/api/vms").get_json()["total"] == 5


def test_networks_and_the_license_key_pool(app, client, world):
    from portal import networks

    with app.app_context():
        appliance = Appliance(name="licensed", min_memory_mb=128, max_memory_mb=512, state="ready")
        db.session.add(appliance)
        net = networks.create(name="lab", kind="isolated", vlan=301, cidr="10.30.1.0/24")
        networks.add_reservation(net, "52:54:00:00:30:01", "10.30.1.10")
        db.session.commit()
        appliance_id, net_id = appliance.id, net.id
    boss, alice = bearer(world["boss"]), bearer(world["alice"])
    listed = client.get("/api/v1/networks", headers=boss).get_json()["items"]
    assert [(n["name"], n["vlan"], n["reservations"]) for n in listed] == [
        ("lab", 301, [{"mac": "52:54:00:00:30:01", "ip": "10.30.1.10"}])]
    assert client.get(f"/api/v1/networks/{net_id}", headers=boss).get_json()["cidr"] == "10.30.1.0/24"
    assert client.get("/api/v1/networks", headers=alice).status_code == 403

    added = client.post("/api/v1/license-keys", headers=boss, json={"appliance_id": appliance_id,
                                                                    "keys": ["AAA-1", "BBB-2", "AAA-1"]})
    assert added.status_code == 200, added.get_json()
    pool = added.get_json()
    assert pool["license_required"] and pool["free"] == 2 and [k["key"] for k in pool["keys"]] == ["AAA-1", "BBB-2"]
    again = client.post("/api/v1/license-keys", headers=boss, json={"appliance_id": appliance_id, "keys": ["BBB-2"]})
    assert again.get_json()["free"] == 2  # a key it already has is ignored
    bad = client.post("/api/v1/license-keys", headers=boss, json={"appliance_id": appliance_id, "keys": ["X\nY"]})
    assert bad.status_code == 422 and "keys" in bad.get_json()["error"]["fields"]
    assert client.get(f"/api/v1/license-keys?appliance={appliance_id}", headers=boss).get_json()["free"] == 2
    assert client.get(f"/api/v1/license-keys?appliance={appliance_id}", headers=alice).status_code == 403


def test_upload_an_appliance_through_the_api(app, client, world, tmp_path):
    import io
    import subprocess

    from tests.conftest import run_worker_burst

    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    boss, alice = bearer(world["boss"]), bearer(world["alice"])

    def upload(headers, name="api-app", files=(("disk.qcow2", image.read_bytes()),), **fields):
        data = {"name": name, **fields, "disks": [(io.BytesIO(body), fname) for fname, body in files]}
        return client.post("/api/v1/library/appliances", headers=headers, data=data,
                           content_type="multipart/form-data")

    assert upload(alice).status_code == 403
    none = upload(boss, files=())
    assert none.status_code == 422 and "disks" in none.get_json()["error"]["fields"]
    bad = upload(boss, min_memory_mb=2048, max_memory_mb=1024)
    assert bad.status_code == 422 and "min_memory_mb" in bad.get_json()["error"]["fields"]
    resp = upload(boss, description="via the API", max_memory_mb=1024)
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["task"]["kind"] == "appliance-import"
    run_worker_burst()
    task = client.get(resp.get_json()["task_url"], headers=boss).get_json()
    assert task["state"] == "succeeded", task
    with app.app_context():
        row = db.session.execute(db.select(Appliance).where(Appliance.name == "api-app")).scalar_one()
        assert row.ready and row.description == "via the API" and row.max_memory_mb == 1024
        assert row.disks[0].virtual_size_bytes == 64 << 20
    again = upload(boss)
    assert again.status_code == 422 and "exists already" in again.get_json()["error"]["message"]


def test_import_an_ova_through_the_api(app, client, world):
    import io

    from tests.conftest import run_worker_burst

    boss, alice = bearer(world["boss"]), bearer(world["alice"])

    def post(headers, data):
        return client.post("/api/v1/library/appliances/ova", headers=headers, data=data,
                           content_type="multipart/form-data")

    assert post(alice, {"ova": (io.BytesIO(b"x"), "x.ova")}).status_code == 403
    missing = post(boss, {"name": "from-ova"})
    assert missing.status_code == 422 and "ova" in missing.get_json()["error"]["fields"]
    bad_name = post(boss, {"name": "a/b", "ova": (io.BytesIO(b"x"), "x.ova")})
    assert bad_name.status_code == 422 and "name" in bad_name.get_json()["error"]["fields"]
    # A package that is no tar archive: the task fails with the reason and leaves no appliance.
    resp = post(boss, {"name": "", "ova": (io.BytesIO(b"plain text" * 99), "junk.ova")})
    assert resp.status_code == 202, resp.get_json()
    run_worker_burst()
    task = client.get(resp.get_json()["task_url"], headers=boss).get_json()
    assert task["state"] == "failed" and task["error"], task
    with app.app_context():
        assert db.session.execute(db.select(Appliance)).first() is None

"""Migrate / move: the page's eligibility list, who may use it, refusals that change nothing, and
(on the bed) a clone VM live-migrated and cold-moved back through the pages and a real worker."""

from __future__ import annotations

import json
import os
import posixpath
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from portal.extensions import db
from portal.models import VM, ActionLog, Role, Server, ServerDisk, ServerStatus, Task, User, VirtualDisk
from portal.vmm.appliance import parse_serial_log
from tests.conftest import log_in_client, make_server, make_user, make_vm, run_worker_burst


@pytest.fixture
def world(app):
    """A running VM on srv-a and four other servers, each lacking something but one."""
    with app.app_context():
        pow_ = make_user("pow", Role.POWER)
        make_user("reg", Role.REGULAR)
        a = make_server("srv-a")
        servers = {"b": make_server("srv-b"), "c": make_server("srv-c", status=ServerStatus.MARKED_DOWN.value),
                   "d": make_server("srv-d"), "e": make_server("srv-e")}
        servers["d"].free_memory_mb = 100
        db.session.execute(db.update(ServerDisk).where(ServerDisk.server_id == servers["e"].id).values(free_gb=2))
        vm = make_vm(pow_, "m1", server=a, state="running", disk_gb=10)
        vm.disk_id = a.disks[0].id
        vm.vdisks[0].path = "/var/lib/corral/disk1/corral-vms/m1/disk0.qcow2"
        db.session.commit()
        return {"vm": vm.id, "a": a.id, **{k: s.id for k, s in servers.items()}}


def _tasks(app) -> int:
    with app.app_context():
        return db.session.execute(db.select(db.func.count(Task.id))).scalar_one()


def test_page_lists_every_other_server_with_its_reason(app, client, world):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    log_in_client(client, "pow")
    assert f'href="/vms/{world["vm"]}/move"' in client.get(f"/vms/{world['vm']}").get_data(as_text=True)
    html = client.get(f"/vms/{world['vm']}/move").get_data(as_text=True)
    live = html.split('id="mode-live"')[1].split('id="mode-cold"')[0]
    rows = dict(re.findall(r'data-server="([^"]+)" data-eligible="(yes|no)"', live))
    assert rows == {"srv-b": "yes", "srv-c": "no", "srv-d": "no", "srv-e": "no"}  # never srv-a itself
    assert "server is marked down" in live
    assert "100 MB free memory, the VM needs 512 MB" in live
    assert "no VM disk with 10 GB free (most: 2 GB)" in live
    assert "CPU qemu64 is emulated (TCG)" in live and "user-mode networking only" in live


def test_only_managers_and_power_users_on_their_own_vms(app, client, world):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    log_in_client(client, "reg")
    assert client.get(f"/vms/{world['vm']}/move").status_code == 404  # not theirs: not even seen
    with app.app_context():
        vm = db.session.get(VM, world["vm"])
        vm.owner_id = db.session.execute(db.select(User.id).where(User.username == "reg")).scalar_one()
        db.session.commit()
    assert client.get(f"/vms/{world['vm']}/move").status_code == 403  # theirs, but regular users only operate
    assert "/move" not in client.get(f"/vms/{world['vm']}").get_data(as_text=True)
    assert client.post(f"/vms/{world['vm']}/move", data={"mode": "live", "server_id": world["b"]}).status_code == 403
    client.post("/logout")
    log_in_client(client, "pow")
    assert client.get(f"/vms/{world['vm']}/move").status_code == 404  # no longer the power user's


def test_refusals_say_why_and_change_nothing(app, client, world):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    log_in_client(client, "pow")
    url = f"/vms/{world['vm']}/move"
    r = client.post(url, data={"mode": "live", "server_id": world["d"]}, follow_redirects=True)
    assert "srv-d cannot take m1: 100 MB free memory, the VM needs 512 MB." in r.get_data(as_text=True)
    r = client.post(url, data={"mode": "live", "server_id": world["b"], "max_downtime_ms": "abc"},
                    follow_redirects=True)
    assert "max downtime ms must be a whole number" in r.get_data(as_text=True)
    assert _tasks(app) == 0
    with app.app_context():  # another task holds the VM
        db.session.add(Task(kind="vm-save", title="Save m1", target_type="vm", target_id=world["vm"],
                            state="running", active_key=f"vm:{world['vm']}", log=""))
        db.session.commit()
    r = client.post(url, data={"mode": "live", "server_id": world["b"]}, follow_redirects=True)
    assert "m1 is busy with task" in r.get_data(as_text=True)
    assert "disabled>Migrate" in r.get_data(as_text=True)  # the page offers nothing while it is busy
    with app.app_context():
        db.session.execute(db.update(Task).values(state="succeeded", active_key=None))
        db.session.get(VM, world["vm"]).state = "off"
        db.session.commit()
    r = client.post(url, data={"mode": "live", "server_id": world["b"]}, follow_redirects=True)
    assert "Live migration is possible when m1 runs; it is off." in r.get_data(as_text=True)
    assert _tasks(app) == 1
    with app.app_context():
        vm = db.session.get(VM, world["vm"])
        assert vm.server_id == world["a"] and vm.state == "off"


def test_api_shows_where_each_vm_is_and_the_moves_under_way(app, client, world):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        vm = db.session.get(VM, world["vm"])
        other = make_vm(make_user("someone", Role.POWER), "m2", server=vm.server, state="running")
        for target, title in ((vm, "Migrate m1 to srv-b"), (other, "Move m2 to srv-b")):
            db.session.add(Task(kind="vm-migrate" if target is vm else "vm-move", title=title, target_type="vm",
                                target_id=target.id, state="running", active_key=f"vm:{target.id}", log="",
                                pct=42, step="Migrating: memory 20 MiB left"))
        db.session.commit()
        mine = db.session.execute(db.select(Task.id).where(Task.target_id == world["vm"])).scalar_one()
    log_in_client(client, "pow")
    got = client.get(f"/api/vms/{world['vm']}").get_json()
    assert (got["server"], got["disk"]) == ("srv-a", "/var/lib/corral/disk1")
    assert got["move"] == {"task": mine, "vm": world["vm"], "kind": "vm-migrate", "title": "Migrate m1 to srv-b",
                           "state": "running", "pct": 42, "step": "Migrating: memory 20 MiB left",
                           "eta_seconds": None}
    assert [m["vm"] for m in client.get("/api/moves").get_json()["items"]] == [world["vm"]]  # not someone's
    with app.app_context():
        db.session.execute(db.update(Task).values(state="succeeded", active_key=None))
        db.session.commit()
    assert client.get(f"/api/vms/{world['vm']}").get_json()["move"] is None
    assert client.get("/api/moves").get_json()["items"] == []


# --- on the bed ------------------------------------------------------------------------------

def _serial(bs, name) -> str:
    path = bs.host_path(f"/var/log/libvirt/qemu/{name}.serial.log")
    return path.read_text(errors="replace") if path.exists() else ""


def _wait(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def _domains(bs) -> list[str]:
    return subprocess.run(["virsh", "-c", bs.uri_tcp, "list", "--all", "--name"], capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.fixture
def bed_setup(bed_portal):
    sids = bed_portal["servers"]
    return {**bed_portal, "disk1": bed_portal["disks"][sids[0]]}


def _last_task(app, vm_id) -> Task:
    with app.app_context():
        task = db.session.execute(db.select(Task).where(Task.target_type == "vm", Task.target_id == vm_id)
                                  .order_by(Task.id.desc())).scalars().first()
        db.session.expunge(task)
        return task


def _vm(app, vm_id) -> tuple[VM, VirtualDisk]:
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        d = vm.vdisks[0]
        db.session.expunge_all()
        return vm, d


@pytest.mark.bed
def test_clone_vm_migrates_live_and_moves_back_cold_through_the_pages(app, client, bed_setup, bed_servers):
    b1, b2 = bed_servers[:2]
    s1, s2 = bed_setup["servers"]
    r = client.post("/vms/new", data={"name": "t-mv", "appliance": bed_setup["appliance"], "memory_mb": 256,
                                      "vcpus": 1, "placement": str(bed_setup["disk1"]), "clone": "y", "mac": ""})
    assert r.status_code == 302
    run_worker_burst()
    with app.app_context():
        vm_id = db.session.execute(db.select(VM.id).where(VM.name == "t-mv")).scalar_one()
    assert client.post(f"/vms/{vm_id}/power/start").status_code == 302
    run_worker_burst()
    _wait(lambda: "CORRAL-READY t-mv" in _serial(b1, "t-mv") and bool(parse_serial_log(_serial(b1, "t-mv")).heartbeats),
          "the guest's boot")
    vm, d = _vm(app, vm_id)
    src_path, base = d.path, d.backing_path
    assert b1.host_path(base).exists()

    # Live, with the disk copied along (the clone's base goes first, only the overlay is copied).
    html = client.get(f"/vms/{vm_id}/move").get_data(as_text=True)
    assert 'data-server="bed2" data-eligible="yes"' in html
    before = parse_serial_log(_serial(b1, "t-mv")).last_heartbeat
    r = client.post(f"/vms/{vm_id}/move", data={"mode": "live", "server_id": s2, "submitted": "1",
                                                "auto_converge": "y"})
    assert r.status_code == 303 and "/tasks/" in r.headers["Location"]
    run_worker_burst()
    task = _last_task(app, vm_id)
    assert task.state == "succeeded", (task.error, task.log)
    assert "downtime" in task.log and "Copied appliance-" in task.log
    vm, d = _vm(app, vm_id)
    assert (vm.server_id, vm.state, d.path, d.backing_path) == (s2, "running", src_path, base)
    assert "t-mv" in _domains(b2) and "t-mv" not in _domains(b1)
    assert not b1.host_path(src_path).exists() and not b1.host_path(base).exists()  # no other VM used the base
    assert b2.host_path(base).exists()
    _wait(lambda: len(parse_serial_log(_serial(b2, "t-mv")).heartbeats) >= 3, "heartbeats on bed2")
    st = parse_serial_log(_serial(b2, "t-mv"))
    assert not st.ready and st.heartbeats[0] >= before  # the same boot: the counter went on

    # Cold, back to bed1: saved, copied with verification, restored.
    before = st.last_heartbeat
    r = client.post(f"/vms/{vm_id}/move", data={"mode": "cold", "server_id": s1})
    assert r.status_code == 303
    run_worker_burst()
    task = _last_task(app, vm_id)
    assert task.state == "succeeded", (task.error, task.log)
    vm, d = _vm(app, vm_id)
    assert (vm.server_id, vm.state, d.path) == (s1, "running", src_path)
    assert "t-mv" in _domains(b1) and "t-mv" not in _domains(b2)
    assert not b2.host_path(src_path).exists() and not b2.host_path(base).exists()
    _wait(lambda: len(parse_serial_log(_serial(b1, "t-mv")).heartbeats) >= 3, "heartbeats on bed1")
    st = parse_serial_log(_serial(b1, "t-mv"))
    assert st.heartbeats[-1] > before and _serial(b1, "t-mv").count("CORRAL-READY") == 1  # appended: one boot
    with app.app_context():
        logged = db.session.execute(db.select(ActionLog.detail).where(ActionLog.action == "vm-moved")).scalars().all()
    assert logged == ["live migration: bed1 -> bed2", "cold move: bed2 -> bed1"]


def _running_on(bed_servers, name) -> list[str]:
    return [bs.name for bs in bed_servers[:2]
            if subprocess.run(["virsh", "-c", bs.uri_tcp, "domstate", name], capture_output=True,
                              text=True).stdout.strip() == "running"]


def _poll(app) -> None:
    """One server poll, as the poll job runs it (it commits)."""
    from portal import monitoring

    with app.app_context():
        monitoring.poll_all()
        db.session.commit()


def _polled_state(app, vm_id) -> str:
    _poll(app)
    return _vm(app, vm_id)[0].state


def _horse(worker) -> int:
    """The work horse: the child process a real RQ worker forked last, to run the job (the scheduler,
    also a fork, started with the worker)."""
    def started(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])

    children = [int(p) for p in Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()]
    return max(children, key=started)


@pytest.mark.bed
def test_worker_killed_mid_migration_then_the_poll_finds_where_the_vm_runs(app, client, bed_setup, bed_servers,
                                                                           worker):
    """The process running a live migration is SIGKILLed (a real worker's work horse, the migration
    capped at 1 MiB/s so that it lasts): the task is failed by reconciliation, the VM is held as
    migrating until the next poll, which records it where libvirt runs it (exactly once) and removes
    what the move made on the other server. Then the VM is migrated behind Corral's back: check_vm
    says it runs elsewhere, and the next poll re-homes it (server, VM disk, disk path)."""
    from checks.check_vm import run_check

    b1, b2 = bed_servers[:2]
    s1, s2 = bed_setup["servers"]
    r = client.post("/vms/new", data={"name": "t-mk", "appliance": bed_setup["appliance"], "memory_mb": 256,
                                      "vcpus": 1, "placement": str(bed_setup["disk1"]), "mac": ""})
    assert r.status_code == 302
    with app.app_context():
        vm_id = db.session.execute(db.select(VM.id).where(VM.name == "t-mk")).scalar_one()
    _wait(lambda: _last_task(app, vm_id).finished, "the create task", timeout=120)
    assert client.post(f"/vms/{vm_id}/power/start").status_code == 302
    _wait(lambda: "CORRAL-READY t-mk" in _serial(b1, "t-mk"), "the guest's boot", timeout=90)
    _, d = _vm(app, vm_id)
    path = d.path
    r = client.post(f"/vms/{vm_id}/move", data={"mode": "live", "server_id": s2, "submitted": "1",
                                                "bandwidth_mibs": "1", "time_limit_s": "300"})
    assert r.status_code == 303
    _wait(lambda: (_last_task(app, vm_id).step or "").startswith("Migrating:"), "the migration's progress")
    assert b2.host_path(path).exists()  # the disk Corral pre-created on the target
    os.kill(_horse(worker), signal.SIGKILL)
    assert _vm(app, vm_id)[0].state == "migrating"  # held by the move
    _wait(lambda: _polled_state(app, vm_id) != "migrating", "the poll to settle the VM")
    task = _last_task(app, vm_id)
    assert task.state == "failed" and "stopped before it finished" in task.error, (task.state, task.log)
    assert "stays marked migrating until the next server poll" in task.log
    where = _running_on(bed_servers, "t-mk")
    assert len(where) == 1, where  # never twice
    vm, d = _vm(app, vm_id)
    expected = s1 if where == ["bed1"] else s2
    assert (vm.server_id, vm.state) == (expected, "running")
    other = b2 if where == ["bed1"] else b1
    assert "t-mk" not in _domains(other) and not other.host_path(posixpath.dirname(path)).exists()
    with app.app_context():
        assert run_check("t-mk")[0] == "ok"

    # Behind Corral's back: libvirt moves it, Corral's record stays.
    home, away = (b1, b2) if where == ["bed1"] else (b2, b1)
    size = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(home.host_path(path))],
                                     capture_output=True, text=True, check=True).stdout)["virtual-size"]
    away.host_path(posixpath.dirname(path)).mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(away.host_path(path)), str(size)], check=True)
    raw = subprocess.run(["virsh", "-c", home.uri_tcp, "migrate", "--live", "--persistent", "--undefinesource",
                          "--copy-storage-all", "t-mk", away.uri_tcp], capture_output=True, text=True, timeout=300)
    assert raw.returncode == 0, raw.stderr
    with app.app_context():
        state, summary, _ = run_check("t-mk")
    assert state == "critical" and f"t-mk runs on {away.name}, not where Corral expects it ({home.name}" in summary
    _poll(app)
    vm, d = _vm(app, vm_id)
    assert (vm.server_id, vm.state, d.path) == (s2 if away is b2 else s1, "running", path)
    with app.app_context():
        assert run_check("t-mk")[0] == "ok"
        logged = db.session.execute(db.select(ActionLog.detail).where(ActionLog.action == "vm-moved")).scalars().all()
    assert logged[-1] == f"found running there by the poll: {home.name} -> {away.name}"


def test_shared_claim_refusals_and_the_server_page_form(app, client, world):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        make_user("boss", Role.MANAGER)
        a_disk = db.session.execute(db.select(ServerDisk).where(ServerDisk.server_id == world["a"])).scalar_one()
        b_disk = db.session.execute(db.select(ServerDisk).where(ServerDisk.server_id == world["b"])).scalar_one()
        other = ServerDisk(server_id=world["b"], mountpoint="/srv/elsewhere", size_gb=5)
        db.session.add(other)
        db.session.commit()
        ids = a_disk.id, b_disk.id, other.id
    log_in_client(client, "boss")
    html = client.get(f"/servers/{world['a']}").get_data(as_text=True)
    assert f'action="/servers/{world["a"]}/disks/{ids[0]}/shared"' in html and ">srv-b</option>" in html
    assert 'action="/servers/%d/evacuate"' % world["a"] in html
    url = f"/servers/{world['a']}/disks/{ids[0]}/shared"
    r = client.post(url, data={"other_disk_id": ids[2]}, follow_redirects=True)
    assert "Shared storage has the same path on every server: /srv/elsewhere is not" in r.get_data(as_text=True)
    r = client.post(url, data={"other_disk_id": ids[1]})
    assert r.status_code == 302 and "/tasks/" in r.headers["Location"]  # srv-a and srv-b are up: a task verifies
    with app.app_context():
        assert db.session.get(ServerDisk, ids[0]).shared_group is None  # nothing recorded before the check
        db.session.execute(db.update(Task).values(state="succeeded", active_key=None))
        db.session.get(Server, world["c"]).disks[0].mountpoint = "/var/lib/corral/disk1"
        db.session.commit()
        c_disk = db.session.get(Server, world["c"]).disks[0].id
    r = client.post(url, data={"other_disk_id": c_disk}, follow_redirects=True)
    assert "srv-c is marked down: Corral cannot verify the claim." in r.get_data(as_text=True)


def _shared_task(app, client, server_id, disk_id, other_id) -> Task:
    r = client.post(f"/servers/{server_id}/disks/{disk_id}/shared", data={"other_disk_id": other_id})
    assert r.status_code == 302, r.status_code
    run_worker_burst()
    with app.app_context():
        task = db.session.execute(db.select(Task).where(Task.kind == "disk-share").order_by(Task.id.desc())
                                  ).scalars().first()
        db.session.expunge(task)
        return task


@pytest.mark.bed
def test_shared_storage_is_recorded_only_once_verified(app, client, bed, bed_servers):
    """Two bed servers' disk1 are the same path but not the same storage: the task says so and
    records nothing; a directory bind-mounted into both is verified and recorded as one group."""
    from tests.conftest import register_bed_server

    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    mountpoint = "/var/lib/corral/shared-t"
    b1, b2 = bed_servers[:2]
    sids = [register_bed_server(app, bs, disks=(bs.disk_dir, mountpoint)) for bs in (b1, b2)]
    host_dir = Path(bed.state_dir) / "test-shared-claim"
    host_dir.mkdir(exist_ok=True)
    for bs in (b1, b2):
        bs.host_path(mountpoint).mkdir(exist_ok=True)
        bed.exec(bs.index, ["mount", "--bind", str(host_dir), mountpoint])
    try:
        with app.app_context():
            make_user("boss", Role.MANAGER)
            disks = {(d.server_id, d.mountpoint): d.id for d in db.session.execute(db.select(ServerDisk)).scalars()}
        log_in_client(client, "boss")
        task = _shared_task(app, client, sids[0], disks[(sids[0], b1.disk_dir)], disks[(sids[1], b2.disk_dir)])
        assert task.state == "failed"
        assert (f"{b1.disk_dir} is not shared between bed1 and bed2: a marker written there on bed1 is not in "
                f"{b1.disk_dir} on bed2. Nothing was recorded.") in task.error
        task = _shared_task(app, client, sids[0], disks[(sids[0], mountpoint)], disks[(sids[1], mountpoint)])
        assert task.state == "succeeded", task.log
        with app.app_context():
            groups = {d.mountpoint: d.shared_group for d in db.session.execute(db.select(ServerDisk)).scalars()
                      if d.shared_group}
            assert list(groups) == [mountpoint] and len(set(groups.values())) == 1
            assert db.session.execute(db.select(db.func.count(ServerDisk.id))
                                      .where(ServerDisk.shared_group.is_not(None))).scalar_one() == 2
        html = client.get(f"/servers/{sids[0]}").get_data(as_text=True)
        assert "verified shared with bed2" in html
        assert not list(host_dir.iterdir())  # the markers are gone
    finally:
        for bs in (b1, b2):
            bed.exec(bs.index, ["umount", mountpoint], check=False)
        subprocess.run(["rm", "-rf", str(host_dir)])


@pytest.mark.bed
def test_evacuating_a_server_migrates_its_running_vms_then_marks_it_down(app, client, bed_setup, bed_servers):
    b1, b2 = bed_servers[:2]
    s1, s2 = bed_setup["servers"]
    for name in ("t-ev1", "t-ev2"):
        r = client.post("/vms/new", data={"name": name, "appliance": bed_setup["appliance"], "memory_mb": 256,
                                          "vcpus": 1, "placement": str(bed_setup["disk1"]), "clone": "y", "mac": ""})
        assert r.status_code == 302
    run_worker_burst()
    with app.app_context():
        ids = dict(db.session.execute(db.select(VM.name, VM.id).where(VM.name.like("t-ev%"))).all())
        make_user("boss", Role.MANAGER)
    for name in ids:
        assert client.post(f"/vms/{ids[name]}/power/start").status_code == 302
    run_worker_burst()
    for name in ids:
        _wait(lambda: f"CORRAL-READY {name}" in _serial(b1, name)
              and bool(parse_serial_log(_serial(b1, name)).heartbeats), f"{name}'s boot", timeout=90)
    before = {name: parse_serial_log(_serial(b1, name)).last_heartbeat for name in ids}
    client.post("/logout")
    log_in_client(client, "boss")
    r = client.post(f"/servers/{s1}/evacuate")
    assert r.status_code == 302 and "/tasks/" in r.headers["Location"]
    run_worker_burst(timeout=600)
    with app.app_context():
        task = db.session.execute(db.select(Task).where(Task.kind == "server-evacuate")).scalar_one()
        assert task.state == "succeeded", (task.error, task.log)
        assert task.result == "Moved 2: t-ev1 -> bed2, t-ev2 -> bed2. Stayed 0: none." or \
            task.result == "Moved 2: t-ev2 -> bed2, t-ev1 -> bed2. Stayed 0: none."
        assert "bed1 is marked down: no VM runs there any more." in task.log
        assert db.session.get(Server, s1).status == "marked_down"
        per_vm = db.session.execute(db.select(Task.state).where(Task.kind == "vm-migrate")).scalars().all()
        assert per_vm == ["succeeded", "succeeded"]  # each VM's own task, shown on its page
        for name, vm_id in ids.items():
            vm = db.session.get(VM, vm_id)
            assert (vm.server_id, vm.state) == (s2, "running")
    for name in ids:
        assert name in _domains(b2) and name not in _domains(b1)
        _wait(lambda: len(parse_serial_log(_serial(b2, name)).heartbeats) >= 3, f"{name}'s heartbeats on bed2")
        st = parse_serial_log(_serial(b2, name))
        assert not st.ready and st.heartbeats[0] >= before[name]

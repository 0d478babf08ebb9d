"""Backups through the pages on the bed: "Back up now" by a regular owner while the guest keeps
writing (full, then incremental), who may restore and delete, refusal while another task runs on
the VM, restore of the incremental chain to a guest that boots and counts on from the backup's
start, delete of a backup chain, and deleting the VM removes its backups."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from datetime import timedelta

import pytest

from portal.extensions import db
from portal.models import VM, Appliance, Backup, BackupSchedule, Role, Task, User, utcnow
from portal.vmm.appliance import parse_serial_log, read_disk_heartbeat
from tests.conftest import PASSWORD, make_user, run_worker_burst
from tests.vm_util import act, create, last_task, vm_row, wait_serial

pytestmark = pytest.mark.bed


@pytest.fixture
def setup(bed_portal):
    return bed_portal

NAME = "t-bk"


@pytest.fixture
def running(app, client, setup, bed_servers):
    bs = bed_servers[0]
    assert create(client, setup, NAME).status_code == 302
    run_worker_burst()
    act(app, client, NAME, "start", "running")
    wait_serial(bs, NAME, lambda t: "CORRAL-READY" in t and t.count("CORRAL-HB") >= 3)
    yield bs
    subprocess.run(["virsh", "-c", bs.uri_tcp, "destroy", NAME], capture_output=True)
    subprocess.run(["virsh", "-c", bs.uri_tcp, "undefine", "--checkpoints-metadata", NAME], capture_output=True)
    subprocess.run(["rm", "-rf", str(bs.host_path(f"{bs.disk_dir}/corral-backups"))])


def _beats(bs) -> list[int]:
    return parse_serial_log(bs.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")
                            .read_text(errors="replace")).heartbeats


def _backups(app) -> list[Backup]:
    with app.app_context():
        rows = db.session.execute(db.select(Backup).order_by(Backup.id)).scalars().all()
        for b in rows:
            _ = b.files
            db.session.expunge(b)
        return rows


def _as(app, username):
    other = app.test_client()
    assert other.post("/login", data={"username": username, "password": PASSWORD}).status_code == 302
    return other


@contextmanager
def _busy(app, vm_id):
    """Another task holds the VM's one task slot meanwhile."""
    with app.app_context():
        busy = Task(kind="test", title="something long", state="running", target_type="vm", target_id=vm_id,
                    active_key=f"vm:{vm_id}", log="")
        db.session.add(busy)
        db.session.commit()
        busy_id = busy.id
    try:
        yield
    finally:
        with app.app_context():
            db.session.delete(db.session.get(Task, busy_id))
            db.session.commit()


def _set_owner(app, username):
    with app.app_context():
        vm = db.session.execute(db.select(VM).where(VM.name == NAME)).scalar_one()
        vm.owner_id = db.session.execute(db.select(User.id).where(User.username == username)).scalar_one()
        db.session.commit()


def test_back_up_running_vm_restore_and_delete(app, client, running):
    bs = running
    vm_id = vm_row(app, NAME).id
    with app.app_context():
        make_user("reg", Role.REGULAR)
    _set_owner(app, "reg")
    reg = _as(app, "reg")

    # A regular owner backs the running VM up: full, then incremental; the guest writes all along.
    start_full = _beats(bs)[-1]
    r = reg.post(f"/vms/{vm_id}/backups/new")
    assert r.status_code == 302 and "/tasks/" in r.location
    run_worker_burst()
    task = last_task(app, NAME)
    assert task.kind == "vm-backup" and task.state == "succeeded", task.log
    wait_serial(bs, NAME, lambda t: parse_serial_log(t).heartbeats[-1] >= start_full + 5)
    start_inc = _beats(bs)[-1]
    assert reg.post(f"/vms/{vm_id}/backups/new").status_code == 302
    run_worker_burst()
    assert last_task(app, NAME).state == "succeeded", last_task(app, NAME).log
    full, inc = _backups(app)
    assert (full.kind, full.live, full.state, inc.kind, inc.parent_id) == ("full", True, "ready", "incremental", full.id)
    assert inc.checkpoint and full.size_bytes > 0 and len(full.files[0].sha256) == 64
    assert read_disk_heartbeat(bs.host_path(full.files[0].path)) >= start_full
    page = reg.get(f"/vms/{vm_id}/backups/").get_data(as_text=True)
    assert "incremental" in page and full.files[0].sha256[:12] in page and bs.name in page
    with app.app_context():
        assert "Back up" in db.session.get(Task, task.id).title

    # Restore and delete are for managers and power owners.
    assert reg.post(f"/vms/{vm_id}/backups/{inc.id}/restore").status_code == 403
    assert reg.post(f"/vms/{vm_id}/backups/{full.id}/delete").status_code == 403
    _set_owner(app, "pow")  # the setup's client is the power user

    # Refused while the VM runs, and while another task is active on it.
    r = client.post(f"/vms/{vm_id}/backups/{inc.id}/restore", follow_redirects=True)
    assert "Power t-bk off before restoring" in r.get_data(as_text=True)
    with _busy(app, vm_id):
        r = client.post(f"/vms/{vm_id}/backups/new", follow_redirects=True)
        assert "t-bk is busy with task" in r.get_data(as_text=True)

    # Restore the incremental chain while off: the guest boots and counts on from at least the backup's start.
    act(app, client, NAME, "poweroff", "off")
    assert client.post(f"/vms/{vm_id}/backups/{inc.id}/restore").status_code == 302
    run_worker_burst()
    task = last_task(app, NAME)
    assert task.kind == "vm-restore" and task.state == "succeeded", task.log
    serial = bs.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")
    serial.unlink()
    act(app, client, NAME, "start", "running")
    text = wait_serial(bs, NAME, lambda t: "CORRAL-READY" in t and t.count("CORRAL-HB") >= 2)
    assert parse_serial_log(text).heartbeats[0] > start_inc

    # Deleting the full backup deletes the incremental built on it.
    assert client.post(f"/vms/{vm_id}/backups/{full.id}/delete").status_code == 302
    run_worker_burst()
    assert last_task(app, NAME).state == "succeeded", last_task(app, NAME).log
    assert _backups(app) == [] and not bs.host_path(full.path).exists() and not bs.host_path(inc.path).exists()

    # A new backup after a restore is full again (the restored disks hold no checkpoint); deleting the VM
    # removes it with the VM.
    assert client.post(f"/vms/{vm_id}/backups/new").status_code == 302
    run_worker_burst()
    (again,) = _backups(app)
    assert again.kind == "full" and bs.host_path(again.path).exists()
    act(app, client, NAME, "poweroff", "off")
    assert client.post(f"/vms/{vm_id}/delete").status_code == 302
    run_worker_burst()
    assert vm_row(app, NAME) is None  # the delete task succeeded
    assert _backups(app) == [] and not bs.host_path(f"{bs.disk_dir}/corral-backups/{NAME}").exists()


def _run_due(app):
    """What the periodic poll does for schedules: submit the due backups, commit, enqueue."""
    from portal import backups, tasks

    with app.app_context():
        db.session.execute(db.update(BackupSchedule).values(next_run_at=utcnow() - timedelta(minutes=1)))
        subs = backups.submit_due()
        db.session.commit()
        for sub in subs:
            tasks.enqueue(sub)
        db.session.commit()
        return len(subs)


def test_scheduled_backups_prune_whole_chains_and_a_backup_becomes_an_appliance(app, client, running):
    vm_id = vm_row(app, NAME).id
    with app.app_context():
        make_user("mgr", Role.MANAGER)

    # Bad values change nothing; a good schedule is saved with its next time.
    r = client.post(f"/vms/{vm_id}/backups/schedule", data={"period": "daily", "hour": 3, "keep": 0},
                    follow_redirects=True)
    assert "Keep between 1 and 100" in r.get_data(as_text=True)
    with app.app_context():
        assert db.session.get(BackupSchedule, vm_id) is None
    r = client.post(f"/vms/{vm_id}/backups/schedule", data={"period": "daily", "hour": 3, "weekday": 6, "keep": 2},
                    follow_redirects=True)
    assert "Next scheduled backup of t-bk" in r.get_data(as_text=True)
    with app.app_context():
        sched = db.session.get(BackupSchedule, vm_id)
        assert sched.keep == 2 and sched.next_run_at > utcnow() and sched.next_run_at.hour == 3

    # keep=2: full, incremental, then a new full (the chain holds 2), then an incremental on it, after
    # which the first chain (full + incremental) is pruned, files and rows.
    kinds = []
    for _ in range(4):
        assert _run_due(app) == 1
        run_worker_burst()
        task = last_task(app, NAME)
        assert task.state == "succeeded", task.log
        kinds.append(_backups(app)[-1].kind)
    assert kinds == ["full", "incremental", "full", "incremental"]
    left = _backups(app)
    assert [(b.kind, b.scheduled) for b in left] == [("full", True), ("incremental", True)]
    assert left[1].parent_id == left[0].id and "pruned 2 older scheduled backup(s)" in last_task(app, NAME).result
    assert len(list(running.host_path(f"{running.disk_dir}/corral-backups/{NAME}").iterdir())) == 2
    with app.app_context():
        assert db.session.get(BackupSchedule, vm_id).next_run_at > utcnow()

    # A busy VM skips its turn with a note.
    with _busy(app, vm_id):
        assert _run_due(app) == 0
        assert "skipped, t-bk was busy" in client.get(f"/vms/{vm_id}/backups/").get_data(as_text=True)

    # Copy to library: managers only; the incremental backup (read through its full) becomes an appliance.
    inc = left[1]
    assert client.post(f"/vms/{vm_id}/backups/{inc.id}/copy-to-library", data={"name": "from-bk"}).status_code == 403
    mgr = _as(app, "mgr")
    r = mgr.post(f"/vms/{vm_id}/backups/{inc.id}/copy-to-library", data={"name": "bad name!"}, follow_redirects=True)
    assert "name" in r.get_data(as_text=True).lower() and last_task(app, NAME).kind != "vm-backup-copy"
    assert mgr.post(f"/vms/{vm_id}/backups/{inc.id}/copy-to-library", data={"name": "from-bk"}).status_code == 302
    run_worker_burst()
    task = last_task(app, NAME)
    assert task.kind == "vm-backup-copy" and task.state == "succeeded", task.log
    with app.app_context():
        appl = db.session.execute(db.select(Appliance).where(Appliance.name == "from-bk")).scalar_one()
        assert appl.ready and len(appl.disks) == 1 and appl.disks[0].virtual_size_bytes == inc.files[0].virtual_size_bytes
        assert f"backup {inc.id}" in appl.description
    assert client.post(f"/vms/{vm_id}/backups/schedule", data={"remove": "1"}).status_code == 302
    with app.app_context():
        assert db.session.get(BackupSchedule, vm_id) is None


def test_backups_go_to_the_configured_store_on_another_server_and_restore_from_there(app, client, running,
                                                                                     bed_servers, monkeypatch):
    bs, store_bs = running, bed_servers[1]
    vm_id = vm_row(app, NAME).id

    def store(spec):  # the setting, here and in the worker processes
        app.config["BACKUP_STORE"] = spec
        monkeypatch.setenv("CORRAL_BACKUP_STORE", spec)

    store("nohost:/nowhere")
    r = client.post(f"/vms/{vm_id}/backups/new", follow_redirects=True)
    assert "is not a VM disk of a registered server" in r.get_data(as_text=True) and _backups(app) == []
    store(f"{store_bs.name}:{store_bs.disk_dir}")
    try:
        # Full, then incremental, both written beside the VM, then copied to the store (verified).
        starts = []
        for _ in range(2):
            start = _beats(bs)[-1]
            starts.append(start)
            assert client.post(f"/vms/{vm_id}/backups/new").status_code == 302
            run_worker_burst()
            task = last_task(app, NAME)
            assert task.state == "succeeded", task.log
            wait_serial(bs, NAME, lambda t, s=start: parse_serial_log(t).heartbeats[-1] >= s + 3)
        full, inc = _backups(app)
        assert (full.kind, inc.kind, inc.parent_id) == ("full", "incremental", full.id)
        for b in (full, inc):
            assert b.path.startswith(f"{store_bs.disk_dir}/corral-backups/{NAME}/")
            assert store_bs.host_path(b.files[0].path).exists() and not bs.host_path(b.files[0].path).exists()
        assert [p.name for p in bs.host_path(f"{bs.disk_dir}/corral-backups/{NAME}").iterdir()] == []
        assert store_bs.name in client.get(f"/vms/{vm_id}/backups/").get_data(as_text=True)

        # Restore the incremental (VM off): flattened on the store, fetched, written; the guest counts on.
        start_inc = starts[1]  # the guest's last heartbeat before the incremental backup began
        act(app, client, NAME, "poweroff", "off")
        assert client.post(f"/vms/{vm_id}/backups/{inc.id}/restore").status_code == 302
        run_worker_burst()
        task = last_task(app, NAME)
        assert task.kind == "vm-restore" and task.state == "succeeded", task.log
        assert not list(bs.host_path(f"{bs.disk_dir}/corral-vms/{NAME}").glob("*.from-backup-*"))
        bs.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log").unlink()
        act(app, client, NAME, "start", "running")
        text = wait_serial(bs, NAME, lambda t: "CORRAL-READY" in t and t.count("CORRAL-HB") >= 2)
        assert parse_serial_log(text).heartbeats[0] > start_inc

        # Deleting the VM removes its backups from the store server too.
        act(app, client, NAME, "poweroff", "off")
        assert client.post(f"/vms/{vm_id}/delete").status_code == 302
        run_worker_burst()
        assert vm_row(app, NAME) is None and _backups(app) == []
        assert not store_bs.host_path(f"{store_bs.disk_dir}/corral-backups/{NAME}").exists()
    finally:
        store("")
        subprocess.run(["rm", "-rf", str(store_bs.host_path(f"{store_bs.disk_dir}/corral-backups"))])

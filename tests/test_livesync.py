"""LiveSync through the portal: protection choices and refusals (no bed), and on the bed a protected
clone VM created with a backup server, synced when it starts, and the backup failing under the
writing guest twice (its export killed; its link down): the guest's durable writes stall at most
15 s, the page says broken, and the copy is back in sync by itself once the backup returns.

The guest's heartbeat (a record written with fsync every 100 ms, printed on serial only after the
write returned) is the durable-write counter. A real worker runs the jobs; the monitor's LiveSync
watcher runs in a thread of the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from checks.check_livesync import build_check
from portal import livesync
from portal.extensions import db
from portal.livesync_watch import Watcher
from portal.models import VM, Appliance, ApplianceDisk, BackupMode, LiveSync, Role, Server, ServerStatus
from portal.vmm import domains
from portal.vmm import livesync as ls_vmm
from portal.vmm.appliance import parse_serial_log
from tests.conftest import (
    log_in_client,
    make_server,
    make_user,
    make_vm,
    run_worker_burst,
)
from tests.vm_util import bed_session
from tests.vmm.test_livesync import StallMeter, beat, wait_until


@pytest.fixture
def world(app):
    with app.app_context():
        pow_ = make_user("pow", Role.POWER)
        a, b = make_server("srv-a"), make_server("srv-b")
        make_server("srv-c", status=ServerStatus.MARKED_DOWN.value)
        vm = make_vm(pow_, "m1", server=a, state="off", disk_gb=10)
        vm.disk_id = a.disks[0].id
        vm.vdisks[0].path = "/var/lib/corral/disk1/corral-vms/m1/disk0.qcow2"
        db.session.commit()
        return {"vm": vm.id, "a": a.id, "b": b.id}


def test_settings_offer_the_modes_and_refuse_the_primary(app, client, world):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    log_in_client(client, "pow")
    html = client.get(f"/vms/{world['vm']}").get_data(as_text=True)
    assert "LiveSync with automatic failover" in html
    assert "srv-a (ineligible: the primary)" in html and "srv-c (ineligible: marked down)" in html
    r = client.post(f"/vms/{world['vm']}/protection", data={"backup_mode": "livesync", "backup_server": world["a"]},
                    follow_redirects=True)
    assert "srv-a cannot be the backup server (ineligible: the primary)." in r.get_data(as_text=True)
    with app.app_context():
        vm = db.session.get(VM, world["vm"])
        assert (vm.backup_mode, vm.backup_server_id, vm.livesync) == ("none", None, None)
    # a good choice is recorded and its task queued; the copy path keeps the primary's layout
    r = client.post(f"/vms/{world['vm']}/protection", data={"backup_mode": "livesync", "backup_server": world["b"]})
    assert r.status_code == 302 and "/tasks/" in r.headers["Location"]
    with app.app_context():
        vm = db.session.get(VM, world["vm"])
        assert (vm.backup_mode, vm.backup_server_id, vm.livesync.home_server_id) == ("livesync", world["b"], world["a"])
        assert livesync.copy_paths(vm) == [("vda", "/var/lib/corral/disk1/corral-vms/m1/disk0.qcow2")]
        assert livesync.view(vm).text.startswith("unprotected (the VM is off")
    # the backup server is no move target while it holds the copy
    assert "holds the VM&#39;s LiveSync copy" in client.get(f"/vms/{world['vm']}/move").get_data(as_text=True)


def test_create_offers_protection_and_refuses_the_primary_as_backup(app, client, world):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        make_user("boss", Role.MANAGER)
        appliance = Appliance(name="ls-app", state="ready", min_memory_mb=64, max_memory_mb=4096)
        db.session.add(appliance)
        db.session.flush()
        db.session.add(ApplianceDisk(appliance_id=appliance.id, path="ls-app/disk0.qcow2", virtual_size_bytes=1 << 30))
        disk_a = db.session.get(Server, world["a"]).disks[0].id
        db.session.commit()
        appliance_id = appliance.id
    log_in_client(client, "boss")
    html = client.get("/vms/new").get_data(as_text=True)
    assert "LiveSync with automatic failover" in html and "srv-c (ineligible: marked down)" in html
    form = {"name": "p1", "appliance": appliance_id, "memory_mb": 256, "vcpus": 1, "placement": str(disk_a),
            "mac": "", "backup_mode": "livesync_failover", "backup_server": str(world["a"])}
    r = client.post("/vms/new", data=form)
    assert r.status_code == 400 and "srv-a cannot be the backup server (ineligible: the primary)." in r.get_data(
        as_text=True)
    with app.app_context():
        assert db.session.execute(db.select(VM).where(VM.name == "p1")).first() is None
    r = client.post("/vms/new", data={**form, "backup_server": str(world["b"])})
    assert r.status_code == 302
    with app.app_context():
        vm = db.session.execute(db.select(VM).where(VM.name == "p1")).scalar_one()
        assert (vm.backup_mode, vm.backup_server_id, vm.livesync.home_server_id) == (
            "livesync_failover", world["b"], world["a"])


def test_summary_counts_and_the_relocate_status(app, client, world):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        vm = db.session.get(VM, world["vm"])
        livesync.set_protection(vm, BackupMode.LIVESYNC_FAILOVER.value, world["b"])
        livesync.mark_in_sync(vm.livesync, 10 << 30)
        vm.state = "running"
        vm.server_id, vm.backup_server_id = world["b"], world["a"]  # after a failover: on its backup
        db.session.commit()
    log_in_client(client, "pow")
    with app.app_context():
        livesync.mark_broken(db.session.get(VM, world["vm"]).livesync, "primary down; running on backup")
        db.session.commit()
    html = client.get(f"/vms/{world['vm']}/_state").get_data(as_text=True)
    assert "Powered up on H/A backup VMM (not ready to relocate back to primary VMM srv-a)" in html
    with app.app_context():
        livesync.mark_in_sync(db.session.get(VM, world["vm"]).livesync, 10 << 30)
        db.session.commit()
    assert client.get("/api/summary").get_json()["livesync"] == {
        "protected": 1, "in_sync": 1, "syncing": 0, "broken": 0, "unprotected": 0, "on_backup": 1}
    assert "1 running on their backup server" in client.get("/").get_data(as_text=True)
    html = client.get(f"/vms/{world['vm']}").get_data(as_text=True)
    assert "ready to relocate back to primary VMM srv-a" in html and "Fail back to srv-a" in html
    # "Make srv-b the primary": it stays where it runs, which is now its home
    r = client.post(f"/vms/{world['vm']}/make-primary", follow_redirects=True)
    assert "srv-b is now m1&#39;s primary server." in r.get_data(as_text=True)
    with app.app_context():
        vm = db.session.get(VM, world["vm"])
        assert (vm.livesync.home_server_id, livesync.view(vm).on_backup) == (world["b"], False)
    assert client.get("/api/summary").get_json()["livesync"]["on_backup"] == 0
    r = client.post(f"/vms/{world['vm']}/make-primary", follow_redirects=True)
    assert "srv-b is m1&#39;s primary already." in r.get_data(as_text=True)


# --- on the bed -------------------------------------------------------------------------------

def _row(app, vm_id):
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        ls = vm.livesync
        return ls.state, ls.broken_reason


def _page(client, vm_id) -> str:
    return client.get(f"/vms/{vm_id}/_state").get_data(as_text=True)


@pytest.mark.bed
def test_protected_vm_syncs_and_survives_its_backup_failing(app, client, bed_portal, bed_servers, bed, worker):
    b1, b2 = bed_servers[:2]
    s1, s2 = bed_portal["servers"]
    r = client.post("/vms/new", data={"name": "t-ls", "appliance": bed_portal["appliance"], "memory_mb": 256,
                                      "vcpus": 1, "placement": str(bed_portal["disks"][s1]), "clone": "y", "mac": "",
                                      "backup_mode": "livesync_failover", "backup_server": str(s2)})
    assert r.status_code == 302, r.get_data(as_text=True)
    with app.app_context():
        vm = db.session.execute(db.select(VM).where(VM.name == "t-ls")).scalar_one()
        vm_id = vm.id
        assert (vm.backup_server_id, vm.livesync.home_server_id) == (s2, s1)
    wait_until(lambda: _row(app, vm_id)[1] and "off" in _row(app, vm_id)[1], 120, "the copies prepared")
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        path, base = vm.vdisks[0].path, vm.vdisks[0].backing_path
    # the copy on the backup is flattened: a standalone qcow2 with the disk's virtual size
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(b2.host_path(path))],
                                     capture_output=True, text=True, check=True).stdout)
    primary = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(b1.host_path(path))],
                                        capture_output=True, text=True, check=True).stdout)
    assert base and "backing-filename" not in info and info["virtual-size"] == primary["virtual-size"]
    watcher = Watcher(app, interval=0.5)
    try:
        thread = watcher.start()
        assert client.post(f"/vms/{vm_id}/power/start").status_code == 302
        wait_until(lambda: _row(app, vm_id)[0] == "in_sync", 120, "the initial sync")
        wait_serial_ready(b1)
        assert "in sync with bed2" in _page(client, vm_id)

        # 1. the backup's export is killed while the guest writes
        with StallMeter(b1, "t-ls") as meter:
            bed.exec(b2.index, ["sh", "-c", f"kill -9 $(cat {ls_vmm.RUN_DIR}/t-ls.pid)"])
            wait_until(lambda: _row(app, vm_id)[0] == "broken", 15, "broken recorded")
            assert "broken since" in _page(client, vm_id)
            wait_until(lambda: _row(app, vm_id)[0] == "in_sync", 120, "back in sync after the export restarted")
        print(f"export killed: longest stall of durable guest writes {meter.worst:.1f} s")
        assert meter.worst <= 15, meter.worst

        # 2. the backup goes silent (its link down) while the guest writes
        with StallMeter(b1, "t-ls") as meter:
            bed.set_link(b2.index, False)
            try:
                wait_until(lambda: _row(app, vm_id)[0] == "broken", 15, "broken recorded")
                assert "stopped answering" in _row(app, vm_id)[1]
                page = _page(client, vm_id)
                assert "broken since" in page and "stopped answering" in page
                before = beat(b1, "t-ls")
                wait_until(lambda: beat(b1, "t-ls") >= before + 5, 15, "writes on the primary alone")
            finally:
                bed.set_link(b2.index, True)
            wait_until(lambda: _row(app, vm_id)[0] == "in_sync", 120, "back in sync after the link returned")
        print(f"backup link down: longest stall of durable guest writes {meter.worst:.1f} s")
        assert meter.worst <= 15, meter.worst
        assert livesync_check(app) == "OK"

        # 3. failover, as B's portal/ha.py does it (emulated here, the watcher paused meanwhile), then
        # fail back through the page
        watcher.stop.set()
        thread.join()
        acked = emulate_failover(app, bed, b1, b2, vm_id)
        watcher = Watcher(app, interval=0.5)
        watcher.start()
        wait_until(lambda: beat(b2, "t-ls") > acked, 90, "the guest on the backup")
        first = parse_serial_log(serial(b2)).heartbeats[0]
        assert first > acked  # its counter went on from the copy: no acknowledged write lost
        assert "Powered up on H/A backup VMM" in _page(client, vm_id)  # "not ready" until in sync (fast here)
        wait_until(lambda: _row(app, vm_id)[0] == "in_sync", 120, "the copy back on bed1 in sync")
        assert "ready to relocate back to primary VMM bed1" in _page(client, vm_id)
        assert livesync_check(app) == "CRITICAL"  # running on its backup
        before, boots = beat(b2, "t-ls"), serial(b1).count("CORRAL-READY")
        r = client.post(f"/vms/{vm_id}/failback")
        assert r.status_code == 302 and "/tasks/" in r.headers["Location"]
        wait_until(lambda: vm_where(app, vm_id) == (s1, s2), 180, "the VM back home, bed2 its backup again")
        wait_until(lambda: beat(b1, "t-ls") >= before + 3, 60, "the guest on bed1 after the fail back")
        assert serial(b1).count("CORRAL-READY") == boots  # the log is appended to: no boot after the fail back
        wait_until(lambda: _row(app, vm_id)[0] == "in_sync", 120, "LiveSync home -> backup again")
        assert livesync_check(app) == "OK"

        # 4. power off and delete: the export stops and the copy goes from the backup too
        watcher.stop.set()
        assert client.post(f"/vms/{vm_id}/power/poweroff").status_code == 302
        wait_until(lambda: _row(app, vm_id)[0] == "unprotected", 60, "unprotected once off")
        assert client.post(f"/vms/{vm_id}/delete").status_code == 302
        wait_until(lambda: vm_where_or_none(app, vm_id) is None, 60, "the VM deleted")
        with bed_session(b2) as b:
            assert not ls_vmm.export_status(b, "t-ls").running
        assert not b2.host_path(path).exists()
        # the VM's whole folder is gone from both servers (its copies, and whatever else lived beside them)
        assert not b1.host_path(os.path.dirname(path)).exists() and not b2.host_path(os.path.dirname(path)).exists()
    finally:
        watcher.stop.set()
        with bed_session(b1) as a, bed_session(b2) as b:
            ls_vmm.mirror_stop(a, "t-ls")
            ls_vmm.export_stop(b, "t-ls")
    run_worker_burst()


def serial(bs) -> str:
    path = bs.host_path("/var/log/libvirt/qemu/t-ls.serial.log")
    return path.read_text(errors="replace") if path.exists() else ""


def vm_where_or_none(app, vm_id):
    with app.app_context():
        return db.session.get(VM, vm_id)


def vm_where(app, vm_id):
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        return vm.server_id, vm.backup_server_id


def emulate_failover(app, bed, b1, b2, vm_id) -> int:
    """What B's failover does (kept minimal here): the primary's QEMU dies, the export on the backup
    stops, the rows swap (home stays), the copy is marked stale the other way, and the VM starts on
    the backup from its in-sync copy. Returns the last write the guest had acknowledged."""
    from portal.jobs.vms import domain_spec
    from portal.vmm.domain import render

    bed.kill_guests(b1.index)
    acked = beat(b1, "t-ls")
    wait_until(lambda: subprocess.run(["virsh", "-c", b1.uri_tcp, "domstate", "t-ls"], capture_output=True,
                                      text=True, check=False).stdout.strip() != "running", 15,
               "libvirt to see the guest die")
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        assert vm.livesync.state == "in_sync"
        with bed_session(b2) as s:
            ls_vmm.export_stop(s, vm.name)
        with bed_session(b1) as s:
            domains.undefine(s, vm.name)
        vm.server_id, vm.backup_server_id = vm.backup_server_id, vm.server_id
        vm.disk_id, vm.backup_disk_id = vm.backup_disk_id, vm.disk_id
        vm.livesync.epoch += 1
        livesync.mark_broken(vm.livesync, "primary down; running on backup")
        db.session.flush()
        db.session.refresh(vm)
        with bed_session(b2) as s:
            domains.define(s, render(domain_spec(vm)))
            domains.power(s, vm.name, "start")
        db.session.commit()
    return acked


def wait_serial_ready(bs) -> None:
    wait_until(lambda: beat(bs, "t-ls") >= 3, 90, "the guest's heartbeat")


def livesync_check(app) -> str:
    with app.app_context():
        check = build_check("t-ls")
        check()
        return check.state.text.upper()


def test_a_silent_primary_delays_only_its_own_vms_checks(app, monkeypatch):
    """The watcher checks each primary server's VMs in their own thread. The silent primary is
    simulated here (its VM's check blocks until released, as a libvirt call to a server gone silent
    hangs until the keep-alive gives up, ~20 s): provoking it for real needs two protected guests on two
    primaries of the bed, one of them cut off. The other primary's VM is checked every round meanwhile."""
    with app.app_context():
        pow_ = make_user("pow", Role.POWER)
        a, b, c = make_server("srv-a"), make_server("srv-b"), make_server("srv-c")
        for name, primary, backup in (("on-a", a, b), ("on-b", b, c)):
            vm = make_vm(pow_, name, server=primary, state="running")
            vm.backup_mode, vm.backup_server_id = BackupMode.LIVESYNC.value, backup.id
            vm.livesync = LiveSync(state="in_sync", epoch=0, home_server_id=primary.id)
        db.session.commit()
    release, checked = threading.Event(), []

    def check(self, vm):
        checked.append(vm.name)
        if vm.name == "on-a":
            release.wait(10)

    monkeypatch.setattr(Watcher, "_check", check)
    watcher = Watcher(app, interval=0.2)
    try:
        for _ in range(4):
            watcher.round(wait=0.2)
        assert checked.count("on-b") == 4 and checked.count("on-a") == 1  # on-a's check still under way
        release.set()
        wait_until(lambda: all(f.done() for f in watcher._checks.values()), 10, "the checks to end")
        watcher.round()  # a round without a bound waits for its checks: on-a is checked again
        assert checked.count("on-a") == 2
    finally:
        release.set()
        watcher.close()

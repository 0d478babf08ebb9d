"""LiveSync failover on the bed, with real kills: never twice, nothing acknowledged lost, fast.

One protected guest (mode "LiveSync + automatic failover") lives through, in order:

(c) Corral stopped (worker, LiveSync watcher, HA witness) for twice the takeover time while LiveSync
    runs: nothing fails over, nothing is fenced, the mirror keeps running; on restart Corral
    re-adopts it (still in sync, leases renewed, no task).
(a) every process of the primary's namespace killed (libvirtd, sshd, agent, QEMU): the VM runs on
    the backup, its first heartbeat there follows the last acknowledged write (none lost), and its
    cloud-init seed (it lived beside the dead primary's disks) was rendered there again.
(b) the new primary partitioned (link down) while its QEMU runs: its agent destroys the VM itself
    before the backup starts it.

A sampler lists the running domains of both servers (over their unix sockets, so a partition does not
blind it) every 100 ms throughout: the guest never runs on both. The guest's heartbeat (a record
written with fsync; ``CORRAL-HB n`` on serial only after the fsync returned) is the durable-write
counter. The killed server is brought back (sshd, libvirtd) and links restored at the end.
"""

from __future__ import annotations

import time

import pytest

from portal import attributes, ha
from portal.extensions import db
from portal.livesync_watch import Watcher
from portal.models import VM, Appliance, Task
from portal.vmm import livesync as ls_vmm
from tests.conftest import start_worker, stop_process
from tests.vm_util import RunningSampler, bed_session, boot_heartbeats, last_ack
from tests.vm_util import wait_for as wait_until

NAME = "t-ha"


class Corral:
    """The parts of Corral that act while nobody clicks: the worker, the LiveSync watcher, the witness."""

    def __init__(self, app, tmp_path):
        self.app, self.tmp_path, self.n = app, tmp_path, 0
        self.worker = self.watcher = self.witness = None

    def start(self):
        self.n += 1
        with open(self.tmp_path / f"worker{self.n}.log", "w") as log:
            self.worker = start_worker(log=log)
        self.watcher, self.witness = Watcher(self.app, interval=0.5), ha.Witness(self.app)
        self.watcher.start()
        self.witness.start()

    def stop(self):
        for part in (self.watcher, self.witness):
            if part is not None:
                part.stop.set()
        if self.worker is not None:
            stop_process(self.worker)
        self.worker = self.watcher = self.witness = None


def _vm(app, vm_id) -> tuple[int, int, str, int]:
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        return vm.server_id, vm.backup_server_id, vm.livesync.state, vm.livesync.epoch


def _serial(bs) -> str:
    path = bs.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")
    return path.read_text(errors="replace") if path.exists() else ""


def _ha_tasks(app) -> list[Task]:
    with app.app_context():
        return list(db.session.execute(db.select(Task).where(Task.kind == "ha-failover")).scalars())


@pytest.mark.bed
def test_failover_never_twice_nothing_lost(app, client, bed_portal, bed_servers, bed, tmp_path):
    b1, b2 = bed_servers[:2]
    s1, s2 = bed_portal["servers"]
    bs_of = {s1: b1, s2: b2}
    corral = Corral(app, tmp_path)
    sampler = RunningSampler(bed, [b1.index, b2.index], NAME)
    with app.app_context():  # a cloud-init appliance: the VM boots with its seed CD-ROM
        attributes.set_appliance_os(db.session.get(Appliance, bed_portal["appliance"]), os_type="busybox",
                                    cloud_init=True)
        attributes.set_attr(attributes.GLOBAL, "corral_ha", "seeded")
        db.session.commit()
    corral.start()
    try:
        r = client.post("/vms/new", data={"name": NAME, "appliance": bed_portal["appliance"], "memory_mb": 256,
                                          "vcpus": 1, "placement": str(bed_portal["disks"][s1]), "clone": "y",
                                          "mac": "", "backup_mode": "livesync_failover", "backup_server": str(s2)})
        assert r.status_code == 302, r.get_data(as_text=True)
        with app.app_context():
            vm_id = db.session.execute(db.select(VM.id).where(VM.name == NAME)).scalar_one()
        wait_until(lambda: _vm(app, vm_id)[2] == "unprotected" and not _busy(app, vm_id), 120, "the copies prepared")
        assert client.post(f"/vms/{vm_id}/power/start").status_code == 302
        wait_until(lambda: _vm(app, vm_id)[2] == "in_sync", 120, "the initial sync")
        wait_until(lambda: last_ack(b1, NAME) >= 3, 90, "the guest's heartbeat")
        sampler.start()

        # (c) Corral down for twice the takeover time: nothing fails over, nothing is fenced
        takeover = app.config["HA_TAKEOVER_SECONDS"]
        corral.stop()
        before = last_ack(b1, NAME)
        time.sleep(2 * takeover)
        assert sampler.running_on() == {b1.index}
        assert last_ack(b1, NAME) > before + 10  # the guest kept writing (through the mirror)
        with bed_session(b1) as s:
            assert [j.ready for j in ls_vmm.mirror_status(s, NAME)] == [True]
        corral.start()
        time.sleep(2 * app.config["HA_LEASE_INTERVAL_SECONDS"] + 2)
        assert _vm(app, vm_id) == (s1, s2, "in_sync", 0) and not _ha_tasks(app)  # re-adopted as it was
        assert corral.witness.answers.keys() >= {s1, s2}

        # (a) every process of the primary's namespace killed
        acked_before = last_ack(b1, NAME)
        t_kill = time.monotonic()
        bed.crash_server(b1.index)
        acked = last_ack(b1, NAME)
        assert acked >= acked_before
        wait_until(lambda: _vm(app, vm_id)[0] == s2, 30, "the failover recorded")
        t_on = wait_until(lambda: sampler.first_on(b2.index, t_kill), 30, "the VM on bed2")
        print(f"(a) primary killed: running on the backup after {t_on - t_kill:.1f} s")
        first = wait_until(lambda: boot_heartbeats(b2, NAME), 90, "the guest's heartbeat on the backup")[0]
        assert first > acked, (first, acked)  # the counter went on from the copy: nothing acknowledged lost
        assert _vm(app, vm_id)[1:] == (s1, "broken", 1)
        assert "CORRAL-ATTR corral_ha=seeded" in _serial(b2)
        # the old primary returns (sshd, libvirtd; the witness reinstalls its agent): its stale copy is
        # undefined, never started, and the copy is resynced onto it
        bed.start_sshd(b1.index)
        bed.start_libvirtd(b1.index)
        wait_until(lambda: _vm(app, vm_id)[2] == "in_sync", 120, "bed1's copy back in sync")
        wait_until(lambda: NAME not in bed.virsh(b1.index, "list", "--all", "--name").stdout.split(), 30,
                   "the stale definition gone from bed1")

        # (b) the new primary (bed2) partitioned while its QEMU runs
        readies = _serial(b1).count("CORRAL-READY")
        t_cut = time.monotonic()
        bed.set_link(b2.index, False)
        try:
            wait_until(lambda: _vm(app, vm_id)[0] == s1, 30, "the failover back to bed1")
            started = wait_until(lambda: sampler.first_on(b1.index, t_cut), 30, "the VM on bed1")
            acked = last_ack(b2, NAME)
            gone = sampler.last_on(b2.index, t_cut)
            print(f"(b) partition: fenced on bed2 after {gone - t_cut:.1f} s, started on bed1 after "
                  f"{started - t_cut:.1f} s")
            assert gone < started
            log = bs_of[s2].host_path("/run/corral-agent/agent.log").read_text()
            assert f"fenced {NAME}" in log
        finally:
            bed.set_link(b2.index, True)
        first = wait_until(lambda: _serial(b1).count("CORRAL-READY") > readies and boot_heartbeats(b1, NAME), 90,
                           "the guest's heartbeat on bed1")[0]
        assert first > acked, (first, acked)

        # (d) mode "LiveSync": the primary (bed1) dies; nothing starts until the operator's Power on
        wait_until(lambda: _vm(app, vm_id) == (s1, s2, "in_sync", 2), 120, "bed2's copy back in sync")
        with app.app_context():
            db.session.get(VM, vm_id).backup_mode = "livesync"
            db.session.commit()
        readies, tasks_before = _serial(b2).count("CORRAL-READY"), len(_ha_tasks(app))
        bed.crash_server(b1.index)
        acked = last_ack(b1, NAME)
        page = wait_until(lambda: (p := client.get(f"/vms/{vm_id}").get_data(as_text=True)) and
                          "livesync-power-on-backup" in p and p, 30, "the page to offer Power on on bed2")
        assert "Power on on bed2" in page
        time.sleep(takeover)
        assert sampler.running_on() == set() and len(_ha_tasks(app)) == tasks_before  # it waits
        r = client.post(f"/vms/{vm_id}/power-on-backup")
        assert r.status_code == 302 and "/tasks/" in r.headers["Location"]
        first = wait_until(lambda: _serial(b2).count("CORRAL-READY") > readies and boot_heartbeats(b2, NAME), 90,
                           "the guest's heartbeat on bed2 after the operator's Power on")[0]
        assert first > acked, (first, acked)
        assert _vm(app, vm_id)[:2] == (s2, s1)
        sampler.close()
        assert sampler.both == 0 and len(sampler.samples) > 100
    finally:
        sampler.close()
        corral.stop()
        bed.set_link(b2.index, True)
        bed.start_sshd(b1.index)
        bed.start_libvirtd(b1.index)
        for bs in (b1, b2):
            bed.exec(bs.index, ["sh", "-c", "kill $(cat /run/corral-agent/agent.pid)"], check=False)
            with bed_session(bs) as s:
                ls_vmm.export_stop(s, NAME)


def _busy(app, vm_id) -> bool:
    from portal.models import ACTIVE_TASK_STATES

    with app.app_context():
        return db.session.execute(db.select(Task.id).where(Task.target_type == "vm", Task.target_id == vm_id,
                                                           Task.state.in_(ACTIVE_TASK_STATES))).first() is not None


def test_the_rule_needs_every_check():
    """portal.ha.assess: one failing check keeps the VM where it is (no bed: the facts are given)."""
    from types import SimpleNamespace

    vm = SimpleNamespace(livesync=SimpleNamespace(state="in_sync"))
    gone = ha.Facts(lease_age=6, primary_ssh=False, backup_answers=True, backup_peer_age=6, live_clients=0)
    assert ha.assess(vm, gone, 5) is None
    for change, why in [({"lease_age": 2}, "Corral heard"), ({"primary_ssh": True}, "answers SSH"),
                        ({"backup_answers": False}, "backup server's agent"), ({"backup_peer_age": 1}, "backup heard"),
                        ({"live_clients": 1}, "still writes"), ({"live_clients": None}, "still writes")]:
        assert why in ha.assess(vm, ha.Facts(**{**gone.__dict__, **change}), 5)
    assert "not in sync" in ha.assess(SimpleNamespace(livesync=SimpleNamespace(state="broken")), gone, 5)

"""portal.vmm.migrate on the bed: live migration there and back, failures that keep the VM on the
source with nothing left on the target, cold move, shared storage verified with a marker.

One appliance guest boots once for the module and travels between the two servers; its heartbeat
counter (serial, every 100 ms, kept in guest memory) proves it never restarted: each server's serial
log after a move must continue the counter where the other stopped, without a READY line.
"""

from __future__ import annotations

import posixpath
import subprocess
import threading
from pathlib import Path

import libvirt
import pytest

from portal.vmm import domains, migrate
from portal.vmm.appliance import parse_serial_log
from portal.vmm.errors import VmmError
from tests.bed.guest import appliance_domain_xml, wait_for_serial
from tests.vm_util import bed_session

pytestmark = pytest.mark.bed

NAME = "t-mig"
FOLDER = f"/var/lib/corral/disk1/corral-vms/{NAME}"
DISK = f"{FOLDER}/disk0.qcow2"


def _wipe(bs) -> None:
    for cmd in (["destroy", NAME], ["undefine", "--managed-save", NAME]):
        subprocess.run(["virsh", "-c", bs.uri_tcp, *cmd], capture_output=True)
    subprocess.run(["rm", "-rf", str(bs.host_path(FOLDER))])


def _log(bs) -> Path:
    return bs.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")


@pytest.fixture(scope="module")
def pair(bed_servers, appliance_image):
    """Sessions to both servers and the guest running on the first one."""
    b1, b2 = bed_servers[:2]
    for bs in (b1, b2):
        _wipe(bs)
    disk = b1.host_path(DISK)
    disk.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(appliance_image), str(disk)], check=True)
    s1, s2 = bed_session(b1), bed_session(b2)
    dom = s1.libvirt().defineXML(appliance_domain_xml(NAME, DISK))
    dom.create()
    wait_for_serial(_log(b1), lambda st: st.ready and len(st.heartbeats) >= 2, what="the guest's heartbeat")
    yield {"beds": (b1, b2), "sessions": (s1, s2)}
    for s in (s1, s2):
        s.close()
    for bs in (b1, b2):
        _wipe(bs)


def _where(pair) -> int:
    """Index (0/1) of the server that runs the guest now."""
    b1, b2 = pair["beds"]
    states = [subprocess.run(["virsh", "-c", bs.uri_tcp, "domstate", "--reason", NAME], capture_output=True,
                             text=True).stdout.strip() for bs in (b1, b2)]
    running = [i for i, state in enumerate(states) if state.startswith("running")]
    assert len(running) == 1, states
    return running[0]


def _last_beat(bs) -> int:
    return parse_serial_log(_log(bs).read_text(errors="replace")).last_heartbeat


def _continues(bs, after: int) -> None:
    """The guest's heartbeat on *bs* goes on from *after* (no reboot: no READY line in this log)."""
    st = wait_for_serial(_log(bs), lambda st: len(st.heartbeats) >= 3, what="heartbeats after the move")
    assert not st.ready, "the guest booted again"
    assert st.heartbeats[0] >= after and st.heartbeats == sorted(st.heartbeats)


def _nothing_of_it(bs) -> None:
    names = subprocess.run(["virsh", "-c", bs.uri_tcp, "list", "--all", "--name"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert NAME not in names
    assert not bs.host_path(FOLDER).exists(), list(bs.host_path(FOLDER).iterdir())


def _live(pair, src: int, opts: migrate.MigrationOptions, **kw):
    s_src, s_dst = pair["sessions"][src], pair["sessions"][1 - src]
    prepared = migrate.PreparedTarget()
    migrate.precreate_disks(s_dst, migrate.inspect_disks(s_src, NAME), {}, incremental=False, prepared=prepared)
    return migrate.live_migrate(s_src, s_dst, NAME, opts, prepared=prepared, **kw)


def _drop_source_files(pair, src: int) -> None:
    """What the job does after a move: the source's copy of the disk goes."""
    subprocess.run(["rm", "-rf", str(pair["beds"][src].host_path(FOLDER))], check=True)


def test_live_migration_with_local_disks_there_and_back(pair):
    readings = []
    for _ in range(2):
        src = _where(pair)
        b_src, b_dst = pair["beds"][src], pair["beds"][1 - src]
        before = _last_beat(b_src)
        result = _live(pair, src, migrate.MigrationOptions(storage="local"), on_progress=readings.append)
        assert _where(pair) == 1 - src
        assert result.downtime_ms is not None and result.data_transferred
        names = subprocess.run(["virsh", "-c", b_src.uri_tcp, "list", "--all", "--name"], capture_output=True,
                               text=True).stdout.split()
        assert NAME not in names  # undefined on the source, persistent on the target
        assert subprocess.run(["virsh", "-c", b_dst.uri_tcp, "dominfo", NAME], capture_output=True,
                              text=True).stdout.count("Persistent:     yes") == 1
        _continues(b_dst, before)
        _drop_source_files(pair, src)
    assert all(r.data_total >= r.data_processed for r in readings)


def test_killing_the_target_libvirtd_mid_migration_keeps_the_vm_on_the_source(pair, bed):
    src = _where(pair)
    b_src, b_dst = pair["beds"][src], pair["beds"][1 - src]
    dst_index = b_dst.index
    killed = []

    def kill_once(reading: migrate.JobProgress) -> None:
        if not killed:
            bed.stop_libvirtd(dst_index)
            killed.append(reading)

    try:
        # 1 MiB/s: the disk copy alone lasts seconds, so the kill lands mid-migration.
        with pytest.raises(migrate.MigrationError) as failed:
            _live(pair, src, migrate.MigrationOptions(storage="local", bandwidth_mibs=1), on_progress=kill_once)
        assert killed and failed.value.source_running is True
    finally:
        bed.start_libvirtd(dst_index)
    pair["sessions"][1 - src].close()
    assert _where(pair) == src
    before = _last_beat(b_src)
    wait_for_serial(_log(b_src), lambda st: st.last_heartbeat >= before + 5, what="heartbeats on the source")
    _nothing_of_it(b_dst)


def test_abort_at_the_time_limit_keeps_the_vm_on_the_source(pair):
    src = _where(pair)
    b_src, b_dst = pair["beds"][src], pair["beds"][1 - src]
    with pytest.raises(migrate.MigrationAborted, match="did not finish migrating within"):
        _live(pair, src, migrate.MigrationOptions(storage="local", bandwidth_mibs=1, time_limit_s=1))
    assert _where(pair) == src
    before = _last_beat(b_src)
    wait_for_serial(_log(b_src), lambda st: st.last_heartbeat >= before + 3, what="heartbeats on the source")
    _nothing_of_it(b_dst)


def _in_server(bed, bs, *argv, check=True):
    return bed.exec(bs.index, list(argv), check=check)


def test_target_disk_full_keeps_the_vm_on_the_source(pair, bed):
    """The target's VM folder is on a 2 MiB filesystem (a tmpfs mounted inside that server's own mount
    namespace): the move is refused before anything is made there (a copy that ran out of space
    mid-way would stop the guest: QEMU 7.2's synchronous mirror), the VM stays on the source."""
    src = _where(pair)
    b_src, b_dst = pair["beds"][src], pair["beds"][1 - src]
    parent = posixpath.dirname(FOLDER)
    _in_server(bed, b_dst, "mkdir", "-p", parent)
    _in_server(bed, b_dst, "mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", parent)
    try:
        with pytest.raises(migrate.MigrationError, match=r"bed\d has \d+ MiB free for .*t-mig; the VM's disks need") \
                as failed:
            _live(pair, src, migrate.MigrationOptions(storage="local", time_limit_s=120))
        assert failed.value.source_running is True
        assert _in_server(bed, b_dst, "test", "-e", FOLDER, check=False).returncode != 0  # removed
    finally:
        _in_server(bed, b_dst, "umount", parent, check=False)
    assert _where(pair) == src
    before = _last_beat(b_src)
    wait_for_serial(_log(b_src), lambda st: st.last_heartbeat >= before + 3, what="heartbeats on the source")
    _nothing_of_it(b_dst)


def test_target_link_down_mid_migration_keeps_the_vm_on_the_source(pair, bed):
    """The target's network link goes down mid-migration (for 15 s: the outage outlasts the 5 s time
    limit): the migration is aborted, the VM keeps running on the source, and once the link is back
    nothing of it is left on the target."""
    src = _where(pair)
    b_src, b_dst = pair["beds"][src], pair["beds"][1 - src]
    cut = []

    def cut_once(_reading: migrate.JobProgress) -> None:
        if not cut:
            bed.set_link(b_dst.index, False)
            cut.append(threading.Timer(15, bed.set_link, (b_dst.index, True)))
            cut[0].start()

    try:
        with pytest.raises(migrate.MigrationAborted, match="did not finish migrating within 5 s"):
            _live(pair, src, migrate.MigrationOptions(storage="local", bandwidth_mibs=1, time_limit_s=5),
                  on_progress=cut_once)
    finally:
        if cut:
            cut[0].join()
        bed.set_link(b_dst.index, True)
    assert cut
    assert _where(pair) == src
    before = _last_beat(b_src)
    wait_for_serial(_log(b_src), lambda st: st.last_heartbeat >= before + 3, what="heartbeats on the source")
    _nothing_of_it(b_dst)


def test_cold_move_resumes_the_guest_without_a_reboot(pair):
    src = _where(pair)
    s_src, s_dst = pair["sessions"][src], pair["sessions"][1 - src]
    b_src, b_dst = pair["beds"][src], pair["beds"][1 - src]
    xml = migrate.migratable_xml(s_src, NAME)
    prepared = migrate.PreparedTarget()
    migrate.make_dir(s_dst, FOLDER, prepared)
    seen = []
    assert migrate.cold_move(s_src, s_dst, NAME, copies=[(DISK, DISK)], xml=xml, state_dir=FOLDER,
                             progress=lambda n, t: seen.append((n, t)), prepared=prepared) is True
    before = _last_beat(b_src)
    assert domains.state(s_dst, NAME) is domains.DomainState.RUNNING
    assert domains.state(s_src, NAME) is domains.DomainState.SAVED  # the job undefines it after its commit
    _continues(b_dst, before)
    assert seen and seen[-1][0] == seen[-1][1]
    assert not b_dst.host_path(migrate.save_path(FOLDER)).exists()
    domains.undefine(s_src, NAME)
    _drop_source_files(pair, src)


def test_failed_cold_move_restores_on_the_source_and_cleans_the_target(pair):
    src = _where(pair)
    s_src, s_dst = pair["sessions"][src], pair["sessions"][1 - src]
    b_src, b_dst = pair["beds"][src], pair["beds"][1 - src]
    xml = migrate.migratable_xml(s_src, NAME).replace("<memory", "<memoryx", 1)  # the target refuses to define it
    prepared = migrate.PreparedTarget()
    migrate.make_dir(s_dst, FOLDER, prepared)
    before = _last_beat(b_src)
    with pytest.raises(VmmError, match="defining the VM"):
        migrate.cold_move(s_src, s_dst, NAME, copies=[(DISK, DISK)], xml=xml, state_dir=FOLDER, prepared=prepared)
    assert _where(pair) == src
    # Restored from its saved memory: the counter goes on (the log starts afresh, without READY).
    st = wait_for_serial(_log(b_src), lambda st: len(st.heartbeats) >= 3, what="heartbeats after the restore")
    assert not st.ready and st.heartbeats[0] >= before
    _nothing_of_it(b_dst)


def test_shared_storage_is_verified_and_moves_memory_only(pair, bed, appliance_image):
    b1, b2 = pair["beds"]
    s1, s2 = pair["sessions"]
    # Not shared: each server's disk1 is its own directory.
    assert migrate.verify_shared(s1, s2, "/var/lib/corral/disk1") is False
    # A directory bind-mounted into both servers is (this kernel has no NFS).
    host_dir = Path(bed.state_dir) / "test-shared"
    host_dir.mkdir(exist_ok=True)
    mountpoint = "/var/lib/corral/shared"
    for bs in (b1, b2):
        bs.host_path(mountpoint).mkdir(exist_ok=True)
        bed.exec(bs.index, ["mount", "--bind", str(host_dir), mountpoint])
    try:
        assert migrate.verify_shared(s1, s2, mountpoint) is True
        assert not list(host_dir.iterdir())  # the marker is gone
        # A second guest on the shared disk migrates memory only (UNSAFE: verified above).
        name, disk = "t-shr", f"{mountpoint}/t-shr.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(appliance_image), "-F", "qcow2",
                        str(host_dir / "t-shr.qcow2")], check=True)
        s1.libvirt().defineXML(appliance_domain_xml(name, disk)).create()
        log = b1.host_path(f"/var/log/libvirt/qemu/{name}.serial.log")
        wait_for_serial(log, lambda st: st.ready, what="the shared guest's boot")
        with pytest.raises(migrate.MigrationError):  # without UNSAFE libvirt refuses an unknown "shared" dir
            migrate.live_migrate(s1, s2, name, migrate.MigrationOptions(storage="shared"))
        assert domains.state(s1, name) is domains.DomainState.RUNNING
        result = migrate.live_migrate(s1, s2, name, migrate.MigrationOptions(storage="shared", unsafe=True))
        assert result.downtime_ms is not None
        assert domains.state(s2, name) is domains.DomainState.RUNNING and domains.find(s1, name) is None
        domains.undefine(s2, name)
    finally:
        for s in (s1, s2):
            if domains.find(s, "t-shr") is not None:
                domains.undefine(s, "t-shr")
        for bs in (b1, b2):
            bed.exec(bs.index, ["umount", mountpoint], check=False)
        subprocess.run(["rm", "-rf", str(host_dir)])


def test_job_progress_from_libvirt_stats():
    p = migrate.JobProgress.from_stats({"time_elapsed": 900, "data_total": 300 << 20, "data_processed": 100 << 20,
                                        "memory_remaining": 20 << 20, "disk_total": 32 << 20,
                                        "disk_remaining": 2 << 20, "memory_iteration": 2, "memory_dirty_rate": 40,
                                        "downtime": 35})
    assert p.describe() == ("memory 20 MiB left, disk 2 of 32 MiB left, 100 MiB sent, iteration 2, "
                            "dirty rate 40 pages/s, expected downtime 35 ms")
    opts = migrate.MigrationOptions(storage="local", incremental=True, bandwidth_mibs=50)
    assert opts.flags() & libvirt.VIR_MIGRATE_NON_SHARED_INC and not opts.flags() & libvirt.VIR_MIGRATE_UNSAFE
    assert opts.params() == {libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 50}
    xml = "<domain><devices><disk device='disk'><source file='/a/x.qcow2'/><target dev='vda'/></disk>" \
          "<disk device='cdrom'><source file='/a/i.iso'/><target dev='hdc'/><readonly/></disk></devices></domain>"
    assert migrate.writable_disks(xml) == [("vda", "/a/x.qcow2")]
    assert "/b/x.qcow2" in migrate.retarget_xml(xml, {"/a/x.qcow2": "/b/x.qcow2"})

"""portal.vmm.backup on the bed: live full and incremental backups of a guest that keeps writing,
cancel leaving nothing, restore of an incremental chain to a booting guest, copy of a stopped domain.

One appliance guest (system disk vda with the heartbeat sector, plus a 256 MiB data disk vdb full
of a pattern so that a backup lasts long enough to cancel) runs for the module.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from portal.vmm import backup, domains
from portal.vmm.appliance import parse_serial_log, read_disk_heartbeat
from tests.bed.guest import appliance_domain_xml, wait_for_serial
from tests.vm_util import bed_session

pytestmark = pytest.mark.bed

NAME = "t-bak"
FOLDER = f"/var/lib/corral/disk1/corral-vms/{NAME}"
STORE = f"/var/lib/corral/disk1/corral-backups/{NAME}"
DISK = f"{FOLDER}/disk0.qcow2"
DATA = f"{FOLDER}/disk1.qcow2"


def _wipe(bs) -> None:
    subprocess.run(["virsh", "-c", bs.uri_tcp, "destroy", NAME], capture_output=True)
    subprocess.run(["virsh", "-c", bs.uri_tcp, "undefine", "--checkpoints-metadata", NAME], capture_output=True)
    subprocess.run(["rm", "-rf", str(bs.host_path(FOLDER)), str(bs.host_path(STORE))])


def _log(bs) -> Path:
    return bs.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")


def _beats(bs) -> list[int]:
    return parse_serial_log(_log(bs).read_text(errors="replace")).heartbeats


@pytest.fixture(scope="module")
def guest(bed_servers, appliance_image):
    bs = bed_servers[0]
    _wipe(bs)
    bs.host_path(FOLDER).mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(appliance_image), str(bs.host_path(DISK))], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bs.host_path(DATA)), "256M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 256M", str(bs.host_path(DATA))],
                   check=True, capture_output=True)
    xml = appliance_domain_xml(NAME, DISK, bridge=None).replace(
        "</disk>", f"</disk><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                   f"<source file='{DATA}'/><target dev='vdb' bus='virtio'/></disk>", 1)
    session = bed_session(bs)
    session.libvirt().defineXML(xml).create()
    wait_for_serial(_log(bs), lambda st: st.ready and len(st.heartbeats) >= 2, what="the guest's heartbeat")
    yield bs, session
    session.close()
    _wipe(bs)


def test_full_then_incremental_chain_under_writes_then_cancel_and_restore(guest):
    bs, session = guest
    disks = backup.source_disks(session, NAME)
    assert [d.target for d in disks] == ["vda", "vdb"] and all(d.qcow2_v3 for d in disks)

    seen = []
    before = _beats(bs)[-1]
    full = backup.back_up_running(session, NAME, f"{STORE}/1", checkpoint="corral-1-aaaaaa",
                                  progress=lambda d, t: seen.append((d, t)))
    assert not full.incremental and full.checkpoint == "corral-1-aaaaaa"
    assert seen and seen[-1][0] == seen[-1][1] > 0
    by_target = {f.target: f for f in full.files}
    vda = bs.host_path(by_target["vda"].path)
    assert read_disk_heartbeat(vda) >= before  # the guest kept writing; the copy is from the job's start
    assert by_target["vda"].sha256 == subprocess.run(["sha256sum", str(vda)], capture_output=True, text=True,
                                                     check=True).stdout.split()[0]
    assert by_target["vda"].size_bytes == vda.stat().st_size
    assert backup.checkpoints(session, NAME) == ["corral-1-aaaaaa"]

    wait_for_serial(_log(bs), lambda st: st.heartbeats[-1] >= before + 5, what="more heartbeats")
    before_inc = _beats(bs)[-1]
    inc = backup.back_up_running(session, NAME, f"{STORE}/2", checkpoint="corral-2-bbbbbb",
                                 incremental_from="corral-1-aaaaaa",
                                 parents={f.target: f.path for f in full.files})
    assert inc.incremental
    inc_files = {f.target: f for f in inc.files}
    # Only what changed: the overlay of the 256 MiB data disk (untouched) holds next to nothing.
    assert inc_files["vdb"].size_bytes < by_target["vdb"].size_bytes // 20
    info = subprocess.run(["qemu-img", "info", "-U", str(bs.host_path(inc_files["vda"].path))],
                          capture_output=True, text=True, check=True).stdout
    assert f"backing file: {by_target['vda'].path}" in info
    assert backup.checkpoints(session, NAME) == ["corral-2-bbbbbb"]  # only the newest is kept

    # Cancel: aborted job, nothing left, the checkpoint it would have made is gone.
    calls = []

    def cancel():
        calls.append(1)
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError):
        backup.back_up_running(session, NAME, f"{STORE}/3", checkpoint="corral-3-cccccc", check=cancel)
    assert calls and not bs.host_path(f"{STORE}/3").exists()
    assert backup.checkpoints(session, NAME) == ["corral-2-bbbbbb"]

    # Restore the incremental chain while off; the guest boots and counts on from the backup's value.
    domains.power(session, NAME, "poweroff")
    backup.restore(session, NAME, [(inc_files["vda"].path, DISK, None), (inc_files["vdb"].path, DATA, None)])
    assert backup.checkpoints(session, NAME) == []
    restored = read_disk_heartbeat(bs.host_path(DISK))
    assert restored >= before_inc
    session.run(["qemu-img", "compare", "-q", inc_files["vdb"].path, DATA])  # in the server: backing paths
    domains.power(session, NAME, "start")
    st = wait_for_serial(_log(bs), lambda s: s.ready and len(s.heartbeats) >= 2, what="the restored guest")
    assert st.heartbeats[0] > restored >= before_inc

    # A stopped domain: a verified full copy, no checkpoint.
    domains.power(session, NAME, "poweroff")
    off = backup.copy_stopped(session, NAME, f"{STORE}/4")
    assert not off.incremental and off.checkpoint is None and len(off.files) == 2
    assert read_disk_heartbeat(bs.host_path(off.files[0].path)) == read_disk_heartbeat(bs.host_path(DISK))

    backup.forget_checkpoints(session, NAME, metadata_only=True)
    backup.remove(session, STORE, under="/var/lib/corral/disk1")
    assert not bs.host_path(STORE).exists()

"""portal.vmm.livesync on the bed: an NBD export of the copy on the backup server, a synchronous
mirror on the primary, and the backup failing under a writing guest (export killed; link down).

The appliance guest writes a heartbeat record to its disk with ``conv=fsync`` every 100 ms and prints
the heartbeat on serial only after the write returned: the serial counter is the last write the guest
was told is durable. One guest boots once for the module.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from portal.vmm import livesync
from portal.vmm.appliance import parse_serial_log, read_disk_heartbeat
from portal.vmm.events import BlockJobEvent, EventHub
from tests.bed.guest import appliance_domain_xml, wait_for_serial
from tests.vm_util import bed_session

pytestmark = pytest.mark.bed

NAME = "t-ls"
FOLDER = f"/var/lib/corral/disk1/corral-vms/{NAME}"
DISK = f"{FOLDER}/disk0.qcow2"
PORT = 10950


def _wipe(bs) -> None:
    for cmd in (["destroy", NAME], ["undefine", NAME]):
        subprocess.run(["virsh", "-c", bs.uri_tcp, *cmd], capture_output=True, check=False)
    subprocess.run(["rm", "-rf", str(bs.host_path(FOLDER))], check=False)


def _log(bs, name: str = NAME) -> Path:
    return bs.host_path(f"/var/log/libvirt/qemu/{name}.serial.log")


def beat(bs, name: str = NAME) -> int:
    """The guest's last acknowledged durable write (its serial heartbeat)."""
    path = _log(bs, name)
    return (parse_serial_log(path.read_text(errors="replace")).last_heartbeat or 0) if path.exists() else 0


def wait_until(predicate, timeout: float, what: str, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class StallMeter:
    """Samples the guest's durable-write counter every 100 ms; ``worst`` is the longest gap (seconds)
    between two increases while it ran."""

    def __init__(self, bs, name: str = NAME):
        self.bs, self.name, self.worst, self._stop = bs, name, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last, since = beat(self.bs, self.name), time.monotonic()
        while not self._stop.is_set():
            now_beat = beat(self.bs, self.name)
            now = time.monotonic()
            if now_beat > last:
                last, since = now_beat, now
            self.worst = max(self.worst, now - since)
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def pair(bed_servers, appliance_image):
    """The guest running on the first server; an empty copy of its disk on the second one."""
    b1, b2 = bed_servers[:2]
    for bs in (b1, b2):
        _wipe(bs)
    disk = b1.host_path(DISK)
    disk.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(appliance_image), str(disk)], check=True)
    s1, s2 = bed_session(b1), bed_session(b2)
    size = int(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True,
                              check=True).stdout.split('"virtual-size": ')[1].split(",")[0])
    assert livesync.create_copies(s2, [(DISK, size)]) == [DISK]
    dom = s1.libvirt().defineXML(appliance_domain_xml(NAME, DISK))
    dom.create()
    wait_for_serial(_log(b1), lambda st: st.ready and len(st.heartbeats) >= 2, what="the guest's heartbeat")
    yield {"beds": (b1, b2), "sessions": (s1, s2)}
    livesync.export_stop(s2, NAME)
    for s in (s1, s2):
        s.close()
    for bs in (b1, b2):
        _wipe(bs)


def _sync(pair) -> list[livesync.MirrorJob]:
    (_b1, b2), (s1, s2) = pair["beds"], pair["sessions"]
    livesync.export_start(s2, NAME, [("vda", DISK)], b2.address, PORT)
    livesync.export_start(s2, NAME, [("vda", DISK)], b2.address, PORT)  # idempotent
    livesync.mirror_start(s1, NAME, b2.address, PORT, ["vda"])
    return wait_until(lambda: [j for j in livesync.mirror_status(s1, NAME) if j.ready], 60, "the mirror ready")


def test_export_and_synchronous_mirror_keep_the_copy_current(pair, bed):
    (b1, b2), (s1, s2) = pair["beds"], pair["sessions"]
    jobs = _sync(pair)
    assert [(j.dev, j.pct, j.target) for j in jobs] == [("vda", 100, f"{b2.address}:{PORT}/{NAME}-vda")]
    status = livesync.export_status(s2, NAME, PORT)
    assert status.running and status.clients == 1
    assert livesync.reachable(s1, b2.address, PORT)
    # the export listens on the backup's address only
    listening = bed.exec(b2.index, ["ss", "-Htln"]).stdout
    assert f"{b2.address}:{PORT}" in listening and f"0.0.0.0:{PORT}" not in listening
    livesync.mirror_start(s1, NAME, b2.address, PORT, ["vda"])  # idempotent while it runs
    before = beat(b1)
    wait_for_serial(_log(b1), lambda st: st.last_heartbeat >= before + 5, what="heartbeats while mirrored")
    # Stop the mirror, then the export: the copy holds at least every write acknowledged before the stop.
    acked = beat(b1)
    livesync.mirror_stop(s1, NAME)
    assert livesync.mirror_status(s1, NAME) == []
    livesync.export_stop(s2, NAME)
    livesync.export_stop(s2, NAME)  # idempotent
    assert not livesync.export_status(s2, NAME, PORT).running
    on_copy = read_disk_heartbeat(b2.host_path(DISK), "qcow2")
    assert on_copy is not None and on_copy >= acked


def test_killed_export_fails_the_mirror_and_the_guest_keeps_writing(pair, bed):
    """...and libvirt tells the monitor at once: a block-job event says the mirror failed."""
    (b1, b2), (s1, s2) = pair["beds"], pair["sessions"]
    _sync(pair)
    hub = EventHub()
    assert hub.watch(1, s1.target)
    try:
        with StallMeter(b1) as meter:
            bed.exec(b2.index, ["sh", "-c", f"kill -9 $(cat {livesync.RUN_DIR}/{NAME}.pid)"])
            wait_until(lambda: livesync.mirror_status(s1, NAME) == [], 15, "the mirror to fail")
            before = beat(b1)
            wait_for_serial(_log(b1), lambda st: st.last_heartbeat >= before + 5, what="writes after the kill")
        events = []
        while not hub.events.empty():
            events.append(hub.events.get())
    finally:
        hub.close()
    assert any(isinstance(e, BlockJobEvent) and (e.domain, e.dev, e.status) == (NAME, "vda", "failed")
               for e in events), events
    assert meter.worst <= 15, meter.worst
    assert not livesync.export_status(s2, NAME, PORT).running
    livesync.export_stop(s2, NAME)  # clears the stale pid file


def test_silent_backup_is_yanked_and_the_guest_keeps_writing(pair, bed):
    (b1, b2), (s1, s2) = pair["beds"], pair["sessions"]
    _sync(pair)
    try:
        with StallMeter(b1) as meter:
            bed.set_link(b2.index, False)
            assert not livesync.reachable(s1, b2.address, PORT, timeout_s=2)
            assert livesync.mirror_yank(s1, NAME)
            wait_until(lambda: livesync.mirror_status(s1, NAME) == [], 15, "the mirror to fail after the yank")
            before = beat(b1)
            wait_for_serial(_log(b1), lambda st: st.last_heartbeat >= before + 5, what="writes after the yank")
        assert meter.worst <= 15, meter.worst
    finally:
        bed.set_link(b2.index, True)
    # The backup is back: the export still runs there and a new mirror brings the copy in sync again.
    assert livesync.export_status(s2, NAME, PORT).running
    _sync(pair)
    livesync.mirror_stop(s1, NAME)
    livesync.export_stop(s2, NAME)

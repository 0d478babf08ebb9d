"""What LiveSync costs: durable guest writes per second with the synchronous mirror against without,
and the initial sync throughput of a 1 GiB disk against ``qemu-img convert`` into the same NBD export.

    flock /tmp/corral-bed.lock .venv/bin/python bench/livesync_cost.py [--seconds 15] [--rounds 3] [--size-mib 1024]

On the test bed (two servers), the appliance guest runs on the first server with its heartbeat
interval set to 0 (SMBIOS OEM string ``corral.interval=0``): it writes its counter record with
``conv=fsync`` in a tight loop and prints each number on serial only after the write returned, so
serial lines per second are durable guest writes per second. Rounds alternate: ``--seconds``
without a mirror, then ``--seconds`` with LiveSync's synchronous mirror (vmm.livesync: the
qemu-storage-daemon export on the second server, writethrough) in its ready phase.

Sync throughput: the guest's disk is grown to ``--size-mib`` and written full (a pattern) before the
guest starts; each round's new mirror copies the whole disk, and its time from ``mirror_start`` to
ready is the initial sync (the guest keeps writing meanwhile, as in production), against
``qemu-img convert -n`` of the same image (``-U``, from the first server, the guest still writing)
into the same export, run after the mirror was stopped. Medians of the rounds.

``run()`` returns the figures as a dict (bench/ha.py calls it); ``main()`` prints them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portal.vmm import appliance as builder  # noqa: E402
from portal.vmm import domains, livesync  # noqa: E402
from portal.vmm.appliance import parse_serial_log  # noqa: E402
from tests.bed import Bed, appliance_domain_xml, wait_for_serial  # noqa: E402
from tests.vm_util import bed_session  # noqa: E402

NAME = "b-lscost"
FOLDER = f"/var/lib/corral/disk1/corral-vms/{NAME}"
DISK = f"{FOLDER}/disk0.qcow2"
PORT = 10799
MIB = 1 << 20


def _wipe(bs) -> None:
    subprocess.run(["virsh", "-c", bs.uri_tcp, "destroy", NAME], capture_output=True, check=False)
    subprocess.run(["virsh", "-c", bs.uri_tcp, "undefine", NAME], capture_output=True, check=False)
    subprocess.run(["rm", "-rf", str(bs.host_path(FOLDER))], check=False)


def _log(bs) -> Path:
    return bs.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")


def _beat(bs) -> int:
    return parse_serial_log(_log(bs).read_text(errors="replace")).last_heartbeat or 0


def _rate(bs, seconds: float) -> float:
    """Durable guest writes per second over *seconds*."""
    b0, t0 = _beat(bs), time.monotonic()
    time.sleep(seconds)
    return (_beat(bs) - b0) / (time.monotonic() - t0)


def _domain_xml() -> str:
    xml = appliance_domain_xml(NAME, DISK, bridge=None)
    return xml.replace("</system>", "</system><oemStrings><entry>corral.interval=0</entry></oemStrings>", 1)


def _wait_ready(s1, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        jobs = livesync.mirror_status(s1, NAME)
        if jobs and all(j.ready for j in jobs):
            return time.monotonic() - t0
        if not jobs:
            raise RuntimeError("the mirror went away while syncing")
        time.sleep(0.1)
    raise RuntimeError("the mirror did not get ready")


def run(*, seconds: float = 15, rounds: int = 3, size_mib: int = 1024, bed: Bed | None = None) -> dict:
    bed = bed or Bed()
    b1, b2 = bed.up(n=2)[:2]
    image = builder.build_appliance(bed.appliance_cache)
    for bs in (b1, b2):
        _wipe(bs)
    disk = b1.host_path(DISK)
    disk.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(disk)], check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(disk), f"{size_mib}M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x6b 32M {size_mib - 32}M", str(disk)],
                   check=True, capture_output=True)
    s1, s2 = bed_session(b1), bed_session(b2)
    out: dict = {"seconds_per_phase": seconds, "rounds": rounds, "size_mib": size_mib}
    try:
        livesync.create_copies(s2, [(DISK, size_mib * MIB)])
        livesync.export_start(s2, NAME, [("vda", DISK)], b2.address, PORT)
        s1.libvirt().defineXML(_domain_xml())
        domains.power(s1, NAME, "start")
        wait_for_serial(_log(b1), lambda st: st.ready and len(st.heartbeats) >= 20, what="the guest's writes")

        # Each round: the initial sync of the full disk (a new mirror copies it all), the guest writing
        # all the while; durable writes with the mirror ready; the mirror stopped, writes without; then
        # qemu-img convert of the same image into the same export.
        uri = f"nbd://{b2.address}:{PORT}/{livesync.export_name(NAME, 'vda')}"
        syncs, converts, without, with_ = [], [], [], []
        for _ in range(rounds):
            livesync.mirror_start(s1, NAME, b2.address, PORT, ["vda"])
            syncs.append(_wait_ready(s1))
            with_.append(_rate(b1, seconds))
            livesync.mirror_stop(s1, NAME)
            without.append(_rate(b1, seconds))
            t0 = time.monotonic()
            bed.exec(b1.index, ["qemu-img", "convert", "-U", "-n", "-f", "qcow2", "-O", "raw", DISK, uri],
                     timeout=1800)
            converts.append(time.monotonic() - t0)
        out["writes_per_s_without"] = round(statistics.median(without), 1)
        out["writes_per_s_with"] = round(statistics.median(with_), 1)
        out["writes_ratio"] = round(out["writes_per_s_with"] / out["writes_per_s_without"], 2)
        out["sync_seconds"] = round(statistics.median(syncs), 2)
        out["sync_mibs"] = round(size_mib / out["sync_seconds"], 1)
        out["convert_seconds"] = round(statistics.median(converts), 2)
        out["convert_mibs"] = round(size_mib / out["convert_seconds"], 1)
        out["sync_ratio"] = round(out["sync_mibs"] / out["convert_mibs"], 2)
    finally:
        livesync.mirror_stop(s1, NAME)
        livesync.export_stop(s2, NAME)
        for s in (s1, s2):
            s.close()
        for bs in (b1, b2):
            _wipe(bs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args(argv)
    r = run(seconds=args.seconds, rounds=args.rounds, size_mib=args.size_mib)
    print(f"durable guest writes/s: without LiveSync {r['writes_per_s_without']}, with {r['writes_per_s_with']} "
          f"-> {r['writes_ratio']}x (goal >= 0.7x; median of {r['rounds']} x {r['seconds_per_phase']:g} s)")
    print(f"initial sync of {r['size_mib']} MiB (median of {r['rounds']}): mirror {r['sync_seconds']} s "
          f"({r['sync_mibs']} MiB/s), "
          f"qemu-img convert to the same export {r['convert_seconds']} s ({r['convert_mibs']} MiB/s) "
          f"-> {r['sync_ratio']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

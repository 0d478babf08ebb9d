"""Backup of a running VM, next to copying the same image while it is stopped.

    flock /tmp/corral-bed.lock .venv/bin/python bench/backup.py [--rounds 3] [--size-mib 1024]

On the first test-bed server, the test appliance runs from a ``--size-mib``
qcow2 disk whose space is written full (a pattern), heartbeating to its disk
every 100 ms. Each round: Corral's live full backup of the running guest
(``vmm.backup.back_up_running``: libvirt push-mode backup job, then size and
sha256 of the file on the server), the backup job's own time without the
checksum, then, with the guest shut off, ``qemu-img convert -O qcow2`` of the
same image on the same server. Prints the medians, MiB/s and the ratio of
Corral's throughput to the convert's (the backup job alone, and with the
sha256 Corral records).

It uses the test bed (``python -m tests.bed up``); a benchmark prints
measurements, it is not a test.
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

from portal.vmm import backup, domains  # noqa: E402
from portal.vmm import appliance as builder  # noqa: E402
from tests.bed import Bed, appliance_domain_xml, wait_for_serial  # noqa: E402
from tests.vm_util import bed_session  # noqa: E402

NAME = "b-backup"
FOLDER = f"/var/lib/corral/disk1/corral-vms/{NAME}"
DISK = f"{FOLDER}/disk0.qcow2"
STORE = f"/var/lib/corral/disk1/corral-backups/{NAME}"


def _wipe(bs) -> None:
    subprocess.run(["virsh", "-c", bs.uri_tcp, "destroy", NAME], capture_output=True)
    subprocess.run(["virsh", "-c", bs.uri_tcp, "undefine", "--checkpoints-metadata", NAME], capture_output=True)
    subprocess.run(["rm", "-rf", str(bs.host_path(FOLDER)), str(bs.host_path(STORE))])


def _prepare(bs, image: Path, size_mib: int) -> None:
    disk = bs.host_path(DISK)
    disk.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(disk)], check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(disk), f"{size_mib}M"], check=True)
    # Fill everything after the appliance's own 32 MiB so that every cluster is allocated.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x6b 32M {size_mib - 32}M", str(disk)],
                   check=True, capture_output=True)


def _log(bs) -> Path:
    return bs.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")


def _start(session, bs) -> None:
    domains.power(session, NAME, "start")
    wait_for_serial(_log(bs), lambda st: st.ready and len(st.heartbeats) >= 2, what="the guest's heartbeat")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args(argv)
    bed = Bed()
    bs = bed.up(n=2)[0]
    image = builder.build_appliance(bed.appliance_cache)
    _wipe(bs)
    _prepare(bs, Path(image), args.size_mib)
    session = bed_session(bs)
    session.libvirt().defineXML(appliance_domain_xml(NAME, DISK, bridge=None))
    corral, job, convert = [], [], []
    try:
        for i in range(args.rounds):
            _start(session, bs)
            folder = f"{STORE}/{i}"
            t0 = time.monotonic()
            outcome = backup.back_up_running(session, NAME, folder, checkpoint=None)
            corral.append(time.monotonic() - t0)
            job.append(outcome.job_seconds)  # libvirt's elapsed time of the job
            assert outcome.files and outcome.files[0].virtual_size == args.size_mib << 20
            session.run(["rm", "-rf", "--", folder])
            domains.power(session, NAME, "poweroff")
            t0 = time.monotonic()
            session.run(["qemu-img", "convert", "-O", "qcow2", DISK, f"{FOLDER}/copy.qcow2"], timeout=3600)
            convert.append(time.monotonic() - t0)
            session.run(["rm", "-f", "--", f"{FOLDER}/copy.qcow2"])
    finally:
        session.close()
        _wipe(bs)
    mib = args.size_mib
    rows = [("Corral live backup (job + size + sha256)", corral), ("  backup job alone", job),
            ("qemu-img convert, guest stopped", convert)]
    print(f"Backup of a running guest, {mib} MiB disk (all clusters allocated), {args.rounds} rounds, medians:")
    med = {}
    for label, times in rows:
        med[label] = statistics.median(times)
        print(f"  {label:<42} {med[label]:6.2f} s  {mib / med[label]:7.1f} MiB/s   "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)})")
    base = med["qemu-img convert, guest stopped"]
    print(f"  ratio (throughput vs stopped convert): job alone {base / med['  backup job alone']:.2f}x, "
          f"with sha256 {base / med['Corral live backup (job + size + sha256)']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

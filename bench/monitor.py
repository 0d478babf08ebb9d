"""How fast Corral sees what happens on its servers.

    .venv/bin/python bench/monitor.py [--rounds 20] [--small 10] [--large 1000]

P5: seconds from ``virsh destroy`` of a running guest on a test-bed server to
    the new state in the database and in the rendered VM partial, with a real
    ``corral monitor`` process following libvirt events; median and p95 of
    ``--rounds``, next to the duration of the ``virsh destroy`` command itself
    (the baseline). Goal: at most 1 s.
P7: wall time of one full poll cycle (health check, facts, disks, domains,
    samples) over 10 and over 1,000 simulated servers, and their ratio. Each
    simulated server is :class:`SimulatedServer`, a session defined here (not
    in Corral) whose libvirt is the built-in test driver (``test:///default``)
    and whose commands answer from canned /proc and df output; the bench
    installs it in place of ``open_session`` in its own process only.
    Goal: the 1,000-server cycle under 30 s.

It builds a throw-away instance (SQLite) in a temporary directory and brings
the test bed up with one server if it is not up (``python -m tests.bed``).
A benchmark prints measurements; it is not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portal import create_app
from portal.extensions import db
from portal.models import VM, Role, Server, ServerDisk, User
from portal.vmm.session import HostSession, Result, Target

SIM_URI = "test:///default"
# What a simulated server's commands print: about the test driver's 3 GB, 8 CPUs, one NIC, a 1 TB disk.
_SIM_OUTPUT = {
    ("true",): "",
    ("cat", "/proc/meminfo"): "MemTotal:        3145728 kB\nMemFree:         1048576 kB\n"
                              "MemAvailable:    2097152 kB\n",
    ("cat", "/proc/loadavg"): "0.10 0.05 0.01 1/100 1234\n",
    ("getconf", "_NPROCESSORS_ONLN"): "8\n",
}


class SimulatedServer(HostSession):
    """A stand-in VM server for scale runs: libvirt's test driver, canned command output.

    Only the probes the poll runs are answered; anything else fails as an
    unknown command would, so the bench notices if the poll starts doing more.
    """

    def __init__(self, target: Target):
        super().__init__(Target(target.hostname, target.address, libvirt_uri=SIM_URI))

    def _run(self, argv, *, timeout, input):
        key = tuple(argv)
        if key in _SIM_OUTPUT:
            return Result(argv, 0, _SIM_OUTPUT[key])
        if argv[0] == "sh" and "/sys/class/net" in argv[-1]:
            return Result(argv, 0, "eth0\nlo\n")
        if argv[0] in ("test", "touch", "rm"):
            return Result(argv, 0, "")
        if argv[:3] == ["df", "-P", "-B1"]:
            tib, free = 1000 * 1024 ** 3, 800 * 1024 ** 3
            return Result(argv, 0, "Filesystem 1-blocks Used Available Capacity Mounted on\n"
                                   f"/dev/sim {tib} {tib - free} {free} 20% {argv[3]}\n")
        return Result(argv, 127, "", f"{argv[0]}: not simulated")

    def put(self, local, remote, progress=None):
        raise NotImplementedError("a simulated server stores no files")

    get = put


def _instance(root: Path):
    # Settings go through the environment so the monitor subprocess shares them.
    os.environ.update(CORRAL_INSTANCE_PATH=str(root / "instance"), CORRAL_SECRET_KEY="bench",
                      CORRAL_DATABASE_URL=f"sqlite:///{root / 'corral.sqlite'}",
                      CORRAL_REDIS_URL="redis://127.0.0.1:1/0")
    app = create_app({"SERVER_DOWN_GRACE_SECONDS": 60, "WTF_CSRF_ENABLED": False})
    with app.app_context():
        from flask_migrate import upgrade

        upgrade()
    return app


def _percentile(values, pct):
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def p7(root: Path, sizes: list[int]) -> dict[int, float]:
    from portal import monitoring
    from portal.vmm import health

    health.open_session = SimulatedServer  # this process only: every server probed is simulated
    out = {}
    for n in sizes:
        app = _instance(root / f"p7-{n}")
        with app.app_context():
            rows = [{"hostname": f"sim{i:04d}", "address": f"sim{i:04d}", "transport": "ssh", "status": "up",
                     "cpus": 2, "cores_per_cpu": 4, "memory_mb": 65536} for i in range(n)]
            db.session.execute(db.insert(Server), rows)
            ids = db.session.execute(db.select(Server.id)).scalars().all()
            db.session.execute(db.insert(ServerDisk), [{"server_id": i, "mountpoint": "/var/lib/corral/disk1",
                                                        "size_gb": 1000} for i in ids])
            db.session.commit()
            monitoring.poll_all()  # warm-up: first samples, check rows
            db.session.commit()
            t = time.perf_counter()
            outcomes = monitoring.poll_all()
            db.session.commit()  # what the poll job does
            out[n] = time.perf_counter() - t
            states = {o.state for o in outcomes}
            assert len(outcomes) == n and states == {"ok"}, {o.summary for o in outcomes}
            db.session.remove()
            db.engine.dispose()
    return out


def p5(root: Path, rounds: int) -> tuple[list[float], list[float], list[float]]:
    from tests.bed import Bed
    from tests.bed.guest import appliance_domain_xml
    from tests.conftest import register_bed_server

    from portal.vmm import appliance
    from portal.vmm.detect import local_domain_type

    bed = Bed(Path(os.environ.get("CORRAL_BED_DIR", "/tmp/corral-bed")))
    servers = bed.up(n=max(1, len(bed.servers() or [])))
    bs = servers[0]
    image = appliance.build_appliance(bed.state_dir / "cache" / "appliance")
    domain_type = local_domain_type(bed.state_dir / "cache" / "appliance")
    app = _instance(root / "p5")
    sid = register_bed_server(app, bs)
    with app.app_context():
        owner = User(username="bench", role=Role.MANAGER.value, password_hash="x")
        db.session.add(owner)
        db.session.flush()
        vm = VM(vmid=1, name="p5vm", owner_id=owner.id, memory_mb=256, vcpus=1, server_id=sid, state="off")
        db.session.add(vm)
        db.session.commit()
        vm_id, user_token = vm.id, f"{owner.id}:{owner.session_version}"
    client = app.test_client()
    with client.session_transaction() as sess:
        sess["_user_id"], sess["_fresh"] = user_token, True

    def state():
        with app.app_context():
            return db.session.execute(db.select(VM.state).where(VM.id == vm_id)).scalar_one()

    def wait(pred, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return time.perf_counter()
            time.sleep(0.005)
        raise TimeoutError("state did not change")

    disk = f"{bs.images_dir}/p5vm.qcow2"
    subprocess.run(["cp", str(image), str(bs.host_path(disk))], check=True)
    xml = appliance_domain_xml("p5vm", disk, domain_type=domain_type)
    virsh = ["virsh", "-c", bs.uri_tcp]
    log = open(root / "monitor.log", "w")
    mon = subprocess.Popen([sys.executable, "-m", "portal", "monitor", "--refresh", "1"], stdout=log,
                           stderr=subprocess.STDOUT, env=dict(os.environ))
    to_db, to_partial, baseline = [], [], []
    try:
        time.sleep(3)  # let the monitor subscribe
        for _ in range(rounds):
            subprocess.run([*virsh, "create", "/dev/stdin"], input=xml, text=True, check=True, capture_output=True)
            wait(lambda: state() == "running")
            t0 = time.perf_counter()
            subprocess.run([*virsh, "destroy", "p5vm"], check=True, capture_output=True)
            baseline.append(time.perf_counter() - t0)
            to_db.append(wait(lambda: state() == "off") - t0)
            to_partial.append(wait(lambda: 'state-off' in client.get(
                f"/vms/{vm_id}", headers={"HX-Request": "true"}).get_data(as_text=True)) - t0)
    finally:
        subprocess.run([*virsh, "destroy", "p5vm"], capture_output=True)
        mon.terminate()
        mon.wait(timeout=20)
        log.close()
        bs.host_path(disk).unlink(missing_ok=True)
        with app.app_context():
            db.engine.dispose()
    return to_db, to_partial, baseline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--large", type=int, default=1000)
    ap.add_argument("--skip-p5", action="store_true", help="only the poll cycle (no test bed needed)")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="corral-bench-monitor-") as tmp:
        root = Path(tmp)
        print(f"Corral monitoring benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        if not args.skip_p5:
            to_db, to_partial, baseline = p5(root, args.rounds)
            print(f"\nP5: virsh destroy -> new state, {args.rounds} rounds (seconds)")
            print(f"  {'':28} {'median':>8} {'p95':>8} {'max':>8}")
            after = [d - b for d, b in zip(to_partial, baseline)]
            for label, values in (("virsh destroy itself", baseline), ("state in the database", to_db),
                                  ("state in the VM partial", to_partial),
                                  ("partial, after virsh returned", after)):
                print(f"  {label:28} {statistics.median(values):8.3f} {_percentile(values, 95):8.3f} "
                      f"{max(values):8.3f}")
            med = statistics.median(to_partial)
            print(f"  goal: at most 1 s to the partial: {'OK' if med <= 1 else 'OVER'} (median {med:.3f} s)")
        times = p7(root, [args.small, args.large])
        print("\nP7: one full poll cycle over simulated servers (libvirt test driver)")
        for n, secs in times.items():
            print(f"  {n:5d} servers: {secs:7.2f} s  ({1000 * secs / n:.1f} ms per server)")
        ratio = times[args.large] / times[args.small]
        print(f"  ratio {args.large}/{args.small}: {ratio:.1f} (servers ratio {args.large / args.small:.0f})")
        print(f"  goal: {args.large}-server cycle under 30 s: {'OK' if times[args.large] < 30 else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast Corral creates a virtual cluster, next to creating the same VMs one by one.

    flock /tmp/corral-bed.lock .venv/bin/python -m bench.cluster [--rounds 3] [--computes 8]

Seconds from the request to every VM defined (all "off") for a cluster of one frontend and
``--computes`` computes over two test-bed servers, as linked clones on a private VLAN network (the
cluster's one task: both servers at once, one SSH session each), next to the same VMs (same
appliance, sizes, servers in the same round robin, NICs on a VLAN network of their own) asked for as
separate "New VM" requests sent back to back, which the worker creates one by one (its task per VM).
The appliance's base is cached on both servers first, so both sides only clone and define. Rounds
alternate the two ways; the median of each is printed with the ratio. Goal: at most 0.6x.

It uses the test bed (``python -m tests.bed up``), a throw-away instance, Redis and one worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provision import _redis, bench_instance  # noqa: E402
from portal import networks  # noqa: E402
from portal.extensions import db  # noqa: E402
from portal.models import VM, ServerDisk, VirtualCluster  # noqa: E402
from portal.vmm.detect import local_domain_type  # noqa: E402

MEMORY_MB = 128


def _wait(app, names: list[str], timeout: float = 300) -> None:
    """Until every VM named is defined (off); a partial one or a missing one after the deadline fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.app_context():
            states = dict(db.session.execute(db.select(VM.name, VM.state).where(VM.name.in_(names))).all())
        if "partial" in states.values():
            raise RuntimeError(f"a create failed: {states}")
        if len(states) == len(names) and set(states.values()) == {"off"}:
            return
        time.sleep(0.02)
    raise TimeoutError(f"not all defined: {states}")


def _wait_gone(app, prefix: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.app_context():
            left = db.session.execute(db.select(VM.id).where(VM.name.startswith(prefix))).first()
            clusters_left = db.session.execute(db.select(VirtualCluster.id)).first()
        if left is None and clusters_left is None:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{prefix}* VMs were not deleted")


def _sweep(bed, bs) -> None:
    """Whatever a failed run left on a bed server: the bench's domains and Corral's folders."""
    names = bed.virsh(bs.index, "list", "--all", "--name", check=False).stdout.split()
    for name in (n for n in names if n.startswith(("bc", "bv", "warm"))):
        bed.virsh(bs.index, "destroy", name, check=False)
        bed.virsh(bs.index, "undefine", name, check=False)
    for folder in ("corral-vms", "corral-bases"):
        shutil.rmtree(bs.host_path(f"{bs.disk_dir}/{folder}"), ignore_errors=True)


def cluster_round(app, client, r: int, appliance: int, sids: list[int], computes: int) -> float:
    label = f"bc{r}"
    t0 = time.perf_counter()
    resp = client.post("/clusters/new", data={
        "fqdn": f"{label}.bench.test", "public_ip": f"137.110.119.{100 + r}", "computes": str(computes),
        "appliance": str(appliance), "frontend_memory_mb": str(MEMORY_MB), "compute_memory_mb": str(MEMORY_MB),
        "servers": [str(s) for s in sids], "clone": "y", "clone_field": "1"})
    assert resp.status_code == 302, resp.get_data(as_text=True)[-800:]
    _wait(app, [label] + [f"{label}-{i}" for i in range(computes)])
    elapsed = time.perf_counter() - t0
    with app.app_context():
        cid = db.session.execute(db.select(VirtualCluster.id)).scalar_one()
    assert client.post(f"/clusters/{cid}/delete").status_code == 302
    _wait_gone(app, label)
    return elapsed


def one_by_one_round(app, client, r: int, appliance: int, disks: list[int], computes: int) -> float:
    label = f"bv{r}"
    with app.app_context():
        net = networks.create(name=f"bench-{label}", kind="isolated", vlan=900 + r, cidr="10.1.0.0/16")
        db.session.commit()
        net_id = net.id
    names = [label] + [f"{label}-{i}" for i in range(computes)]
    where = [disks[0]] + [disks[(i + 1) % len(disks)] for i in range(computes)]  # the cluster's round robin
    t0 = time.perf_counter()
    for n, (name, disk) in enumerate(zip(names, where)):
        resp = client.post("/vms/new", data={"name": name, "appliance": str(appliance), "memory_mb": str(MEMORY_MB),
                                             "vcpus": "1", "placement": str(disk), "clone": "y",
                                             "nic0": str(net_id), **({"nic1": "user"} if n == 0 else {})})
        assert resp.status_code == 302, resp.get_data(as_text=True)[-800:]
    _wait(app, names)
    elapsed = time.perf_counter() - t0
    with app.app_context():
        ids = db.session.execute(db.select(VM.id).where(VM.name.in_(names))).scalars().all()
    for vm_id in ids:
        assert client.post(f"/vms/{vm_id}/delete").status_code == 302
    _wait_gone(app, label)
    with app.app_context():
        networks.delete(db.session.get(networks.Network, net_id))
        db.session.commit()
    return elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--computes", type=int, default=8)
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    from tests.bed import Bed
    from tests.conftest import register_bed_server

    bed = Bed()
    pair = bed.up(n=max(2, len(bed.servers() or [])))[:2]
    root = Path(tempfile.mkdtemp(prefix="corral-bench-cluster-"))
    redis_proc, redis_url = _redis(root)
    worker = None
    try:
        app, first, appliance, first_disk, token = bench_instance(bed, pair[0], root, redis_url)
        sids = [first, register_bed_server(app, pair[1])]
        with app.app_context():
            disks = [first_disk, db.session.execute(db.select(ServerDisk.id).where(ServerDisk.server_id == sids[1])
                                                    ).scalar_one()]
        client = app.test_client()
        with client.session_transaction() as sess:
            sess["_user_id"], sess["_fresh"] = token, True
        log = open(root / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "portal", "worker"], stdout=log, stderr=subprocess.STDOUT)
        time.sleep(2)
        # cache the base on both servers (kept by one VM each until the end): both ways only clone
        for n, disk in enumerate(disks):
            resp = client.post("/vms/new", data={"name": f"warm{n}", "appliance": str(appliance),
                                                 "memory_mb": str(MEMORY_MB), "vcpus": "1", "placement": str(disk),
                                                 "clone": "y"})
            assert resp.status_code == 302
        _wait(app, ["warm0", "warm1"])
        print(f"Corral virtual cluster benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, servers "
              f"{pair[0].name} and {pair[1].name} (test bed), guests as {local_domain_type(bed.appliance_cache)}, "
              f"1 frontend + {args.computes} computes, linked clones, {args.rounds} rounds")
        cluster, serial = [], []
        for r in range(args.rounds):
            cluster.append(cluster_round(app, client, r, appliance, sids, args.computes))
            serial.append(one_by_one_round(app, client, r, appliance, disks, args.computes))
            print(f"  round {r + 1}: cluster {cluster[-1]:6.2f} s, one by one {serial[-1]:6.2f} s")
        c, s = statistics.median(cluster), statistics.median(serial)
        print("\nrequest -> every VM defined (median seconds)")
        ways = {"virtual cluster (one task, both servers at once)": cluster,
                f"the same VMs as {1 + args.computes} New VM requests, one task each": serial}
        for label, times in ways.items():
            print(f"  {label + ':':<56}{statistics.median(times):6.2f}  (min {min(times):.2f}, max {max(times):.2f})")
        print(f"  ratio {c / s:.2f}x; goal at most 0.6x: {'OK' if c / s <= 0.6 else 'OVER'}")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=20)
        for bs in pair:
            _sweep(bed, bs)
        redis_proc.terminate()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast Corral provisions VMs, next to doing the same by hand.

    .venv/bin/python bench/provision.py [--rounds 5] [--size-mib 1024]

P1: seconds from the create request to "ready" (the VM defined and off) for a
    clone whose base is already cached on the server, with a running worker
    process, next to the raw work it stands for: ``qemu-img create -b`` and
    ``virsh define`` of the same disk and XML on the same server over ssh.
    Goal: at most 1 s and at most 3x the raw time.
P2: copy throughput of a ``--size-mib`` appliance disk to a test-bed server
    (Corral's copy: streamed through ssh, hashed on the server as it is
    written) next to ``scp`` of the same file with the same key, and to this
    machine (the local server) next to ``cp``. Goal: ratio at least 0.9.

It uses the test bed (``python -m tests.bed up``) and a throw-away instance;
a benchmark prints measurements, it is not a test.
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

from portal import create_app, servers, vms  # noqa: E402
from portal.extensions import db  # noqa: E402
from portal.models import VM, Role, Server, User  # noqa: E402
from portal.vmm import appliance as builder  # noqa: E402
from portal.vmm import images  # noqa: E402
from portal.vmm.session import LocalSession, Target  # noqa: E402


def _instance(root: Path, redis_url: str):
    os.environ.update(CORRAL_INSTANCE_PATH=str(root / "instance"), CORRAL_SECRET_KEY="bench",
                      CORRAL_DATABASE_URL=f"sqlite:///{root / 'corral.sqlite'}", CORRAL_REDIS_URL=redis_url,
                      CORRAL_QUEUE_PREFIX="corralbench", CORRAL_POLL_SECONDS="0")
    app = create_app({"WTF_CSRF_ENABLED": False})
    with app.app_context():
        from flask_migrate import upgrade

        upgrade()
    return app


def _redis(root: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--dir", str(root)], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def _ssh(target: Target, command: str) -> None:
    subprocess.run([target.ssh_command, "-i", target.key_file, f"root@{target.address}", command], check=True,
                   capture_output=True)


def p1(app, client, bs, appliance_id: int, disk_id: int, rounds: int) -> tuple[list[float], list[float]]:
    corral, raw = [], []
    with app.app_context():
        target = servers.target_for(db.session.get(Server, db.session.get(vms.ServerDisk, disk_id).server_id))
    for i in range(rounds + 1):  # the first create caches the base
        name = f"p1-{i}"
        t0 = time.perf_counter()
        r = client.post("/vms/new", data={"name": name, "appliance": appliance_id, "memory_mb": 256, "vcpus": 1,
                                          "placement": str(disk_id), "clone": "y"})
        assert r.status_code == 302, r.get_data(as_text=True)[-500:]
        while True:
            with app.app_context():
                state = db.session.execute(db.select(VM.state).where(VM.name == name)).scalar_one()
            if state in ("off", "partial"):
                break
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        assert state == "off"
        if i == 0:
            continue
        corral.append(elapsed)
        # The raw equivalent of the same thing on the same server.
        with app.app_context():
            vm = db.session.execute(db.select(VM).where(VM.name == name)).scalar_one()
            from portal.jobs.vms import domain_spec
            from portal.vmm.domain import render

            base = vm.vdisks[0].backing_path
            xml = render(domain_spec(vm)).replace(f"<name>{name}</name>", f"<name>raw{i}</name>")
            xml = xml.replace(vms.domain_uuid(vm), f"00000000-0000-4000-8000-{i:012d}")
            path = vm.vdisks[0].path.replace(f"/{name}/", f"/raw{i}/")
        t0 = time.perf_counter()
        _ssh(target, f"mkdir -p {os.path.dirname(path)} && qemu-img create -q -f qcow2 -b {base} -F qcow2 {path}")
        subprocess.run(["virsh", "-c", bs.uri_ssh if hasattr(bs, "uri_ssh") else bs.uri_tcp, "define", "/dev/stdin"],
                       input=xml, text=True, check=True, capture_output=True)
        raw.append(time.perf_counter() - t0)
        subprocess.run(["virsh", "-c", bs.uri_tcp, "undefine", f"raw{i}"], capture_output=True)
    return corral, raw


def p2(app, bs, size_mib: int, root: Path) -> dict[str, tuple[float, float]]:
    src = root / "big.qcow2"
    with open(src, "wb") as fh:  # incompressible data, as a real disk image would mostly be
        for _ in range(size_mib):
            fh.write(os.urandom(1 << 20))
    sha = images.local_sha256(src)
    out = {}
    with app.app_context():
        server = db.session.execute(db.select(Server).where(Server.hostname == bs.name)).scalar_one()
        target = servers.target_for(server)
        with servers.session_for(server) as session:
            dest = f"{bs.disk_dir}/bench-p2.img"
            t0 = time.perf_counter()
            session.put(src, dest)
            corral = time.perf_counter() - t0
            t0 = time.perf_counter()
            assert session.sha256(dest) == sha
            verify = time.perf_counter() - t0
            session.run(["rm", "-f", dest])
    t0 = time.perf_counter()
    subprocess.run(["scp", "-q", "-S", target.ssh_command, "-i", target.key_file, str(src),
                    f"root@{bs.address}:{bs.disk_dir}/bench-p2-scp.img"], check=True)
    scp = time.perf_counter() - t0
    subprocess.run([target.ssh_command, "-i", target.key_file, f"root@{bs.address}", "rm", "-f",
                    f"{bs.disk_dir}/bench-p2-scp.img"], check=True)
    out["remote (test-bed server over ssh) vs scp"] = (corral, verify, scp)
    local = LocalSession(Target("local", "127.0.0.1", transport="local"))
    t0 = time.perf_counter()
    local.put(src, str(root / "copy.img"))
    corral_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert local.sha256(str(root / "copy.img")) == sha
    verify_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(root / "cp.img")], check=True)
    cp = time.perf_counter() - t0
    out["local server vs cp"] = (corral_local, verify_local, cp)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    from tests.bed import Bed
    from tests.conftest import register_bed_server

    bed = Bed()
    bs = bed.up(n=max(1, len(bed.servers() or [])))[0]
    root = Path(tempfile.mkdtemp(prefix="corral-bench-provision-"))
    redis_proc, redis_url = _redis(root)
    worker = None
    try:
        app = _instance(root, redis_url)
        sid = register_bed_server(app, bs)
        with app.app_context():
            app.config["APPLIANCE_CACHE"] = str(bed.appliance_cache)
            from portal import library

            appliance_id = library.ensure_test_appliance().id
            user = User(username="bench", role=Role.MANAGER.value, password_hash="x")
            db.session.add(user)
            db.session.commit()
            token = f"{user.id}:{user.session_version}"
            disk_id = db.session.execute(db.select(vms.ServerDisk.id).where(vms.ServerDisk.server_id == sid)).scalar_one()
        client = app.test_client()
        with client.session_transaction() as sess:
            sess["_user_id"], sess["_fresh"] = token, True
        log = open(root / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "portal", "worker"], stdout=log, stderr=subprocess.STDOUT)
        time.sleep(2)
        print(f"Corral provisioning benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
              f"server {bs.name} (test bed), guests as {builder.detect_domain_type(bed.appliance_cache)}")
        corral, raw = p1(app, client, bs, appliance_id, disk_id, args.rounds)
        c, r = statistics.median(corral), statistics.median(raw)
        print(f"\nP1: clone with the base cached, request -> ready ({args.rounds} rounds, median seconds)")
        print(f"  Corral (request, task, worker, qemu-img, define): {c:6.3f}  (min {min(corral):.3f}, max {max(corral):.3f})")
        print(f"  raw qemu-img create -b + virsh define over ssh:    {r:6.3f}  (min {min(raw):.3f}, max {max(raw):.3f})")
        print(f"  ratio {c / r:.2f}; goal at most 1 s and at most 3x: "
              f"{'OK' if c <= 1 and c / r <= 3 else 'OVER'}")
        print(f"\nP2: copying a {args.size_mib} MiB disk image (seconds, MiB/s)")
        for label, (copy_s, verify_s, base_s) in p2(app, bs, args.size_mib, root).items():
            ratio, with_verify = base_s / copy_s, base_s / (copy_s + verify_s)
            print(f"  {label}:")
            print(f"    baseline {base_s:6.2f} s ({args.size_mib / base_s:6.1f} MiB/s)")
            print(f"    Corral copy {copy_s:6.2f} s ({args.size_mib / copy_s:6.1f} MiB/s): ratio {ratio:.2f} "
                  f"{'OK' if ratio >= 0.9 else 'UNDER'} (goal >= 0.9)")
            print(f"    + sha256 verified on the server {verify_s:5.2f} s: ratio {with_verify:.2f} "
                  "(the baseline verifies nothing)")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=20)
        for name in subprocess.run(["virsh", "-c", bs.uri_tcp, "list", "--all", "--name"], capture_output=True,
                                   text=True).stdout.split():
            if name.startswith("p1-"):
                subprocess.run(["virsh", "-c", bs.uri_tcp, "undefine", name], capture_output=True)
        subprocess.run(["rm", "-rf", str(bs.host_path(f"{bs.disk_dir}/corral-vms")),
                        str(bs.host_path(f"{bs.disk_dir}/corral-bases"))])
        redis_proc.terminate()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

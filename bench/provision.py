"""How fast Corral provisions VMs, next to doing the same by hand.

    flock /tmp/corral-bed.lock .venv/bin/python bench/provision.py [--rounds 5] [--size-mib 1024]
        [--copy-rounds 3] [--only p1|p2]

P1: seconds from the create request to "ready" (the VM defined and off) for a
    clone whose base is already cached on the server, with a running worker
    process, next to the raw work it stands for: ``qemu-img create -b`` and
    ``virsh define`` of the same disk and XML on the same server over ssh.
    Goal: at most 1 s and at most 3x the raw time.
P2: verified copies of a ``--size-mib`` disk image (random bytes) to a
    test-bed server next to ``scp`` with the same key, cipher and options,
    and on this machine (the local server) next to ``cp``, source cold (read
    from disk) and warm (in the page cache). Goal: ratio at least 0.9. Raw
    ``ssh cat >`` and SHA-256 alone are printed for reference.

It uses the test bed (``python -m tests.bed up``) and a throw-away instance;
a benchmark prints measurements, it is not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portal import create_app, servers, vms  # noqa: E402
from portal.extensions import db  # noqa: E402
from portal.models import VM, Role, Server, User  # noqa: E402
from portal.vmm import images  # noqa: E402
from portal.vmm.detect import local_domain_type  # noqa: E402
from portal.vmm.session import COPY_CIPHERS, LocalSession, Target, open_session  # noqa: E402


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


def bench_instance(bed, bs, root: Path, redis_url: str, password_hash: str = "x"):
    """A migrated throw-away instance with bed server *bs* registered, the test appliance in the
    library and a manager ``bench``: (app, server id, appliance id, the server's disk id, the
    manager's session token)."""
    from tests.conftest import register_bed_server

    app = _instance(root, redis_url)
    sid = register_bed_server(app, bs)
    with app.app_context():
        app.config["APPLIANCE_CACHE"] = str(bed.appliance_cache)
        from portal import library

        appliance_id = library.ensure_test_appliance().id
        user = User(username="bench", role=Role.MANAGER.value, password_hash=password_hash)
        db.session.add(user)
        db.session.commit()
        token = f"{user.id}:{user.session_version}"
        disk_id = db.session.execute(db.select(vms.ServerDisk.id).where(vms.ServerDisk.server_id == sid)).scalar_one()
    return app, sid, appliance_id, disk_id, token


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


@dataclass
class Copies:
    """Median seconds of each way of copying one file, taken in interleaved rounds."""

    label: str
    baseline_name: str
    seconds: dict[str, float]
    notes: list[str]


def _median_times(ways: dict[str, Callable[[], None]], rounds: int, before: Callable[[], None]) -> dict[str, float]:
    """Time each way ``rounds`` times, interleaved (a, b, c, a, b, c, ...) so that whatever else the
    machine does weighs on all of them alike; ``before`` runs untimed before each copy."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, copy in ways.items():
            before()
            t0 = time.perf_counter()
            copy()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _evict(path: Path) -> None:
    """Write back dirty pages, then drop ``path`` from the page cache (the next read comes from disk)."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    """Write back dirty pages (earlier copies), then read ``path`` so it sits in the page cache."""
    os.sync()
    with path.open("rb") as fh:
        while fh.read(64 << 20):
            pass


def p2_remote(app, bs, src: Path, sha: str, rounds: int) -> Copies:
    """Corral's verified copy to a bed server next to scp with the same key and ssh options."""
    with app.app_context():
        server = db.session.execute(db.select(Server).where(Server.hostname == bs.name)).scalar_one()
        target = servers.target_for(server)
    ssh_opts = ["-i", target.key_file, "-o", f"Ciphers={COPY_CIPHERS}", "-o", "Compression=no"]
    dest = f"{bs.disk_dir}/bench-p2.img"
    with open_session(target) as session:
        def corral() -> None:
            assert session.put_verified(src, dest) == sha

        def scp() -> None:
            subprocess.run(["scp", "-q", "-S", target.ssh_command, *ssh_opts, str(src),
                            f"root@{bs.address}:{dest}"], check=True)

        def ssh_cat() -> None:
            with src.open("rb") as fh:
                subprocess.run([target.ssh_command, *ssh_opts, f"root@{bs.address}", f"cat > {dest}"], stdin=fh,
                               check=True)

        def before() -> None:
            session.run(["rm", "-f", dest])
            _warm(src)

        seconds = _median_times({"scp": scp, "Corral verified copy": corral, "ssh 'cat >', unverified": ssh_cat},
                                rounds, before)
        session.run(["rm", "-f", dest])
    return Copies(f"remote: to {bs.name} (test bed) over ssh", "scp", seconds, [
        f"both: Ciphers={COPY_CIPHERS}, Compression=no, Corral's key and pinned known_hosts",
        "source warm in the page cache for both; Corral's copy is verified (sha256 of what the server wrote, "
        "computed there), scp's is not; scp speaks SFTP (OpenSSH 9 default)"])


def p2_local(src: Path, sha: str, root: Path, rounds: int, *, cold: bool) -> Copies:
    """Corral's verified copy on this machine (the local server) next to cp, source cold or warm."""
    local = LocalSession(Target("local", "127.0.0.1", transport="local"))
    copies = {"cp": root / "cp.img", "Corral verified copy": root / "corral.img"}

    def before() -> None:
        for path in copies.values():
            path.unlink(missing_ok=True)
        (_evict if cold else _warm)(src)

    def corral() -> None:
        assert local.put_verified(src, str(copies["Corral verified copy"])) == sha

    def cp() -> None:
        subprocess.run(["cp", str(src), str(copies["cp"])], check=True)

    def sha256_alone() -> None:  # the least a verified copy must do: hash the bytes once, no copying
        with src.open("rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert hashlib.sha256(mapped).hexdigest() == sha

    ways = {"cp": cp, "Corral verified copy": corral}
    if not cold:
        ways["sha256 alone (OpenSSL via hashlib, from the page cache)"] = sha256_alone
    seconds = _median_times(ways, rounds, before)
    before()
    if cold:
        return Copies("local server, cold", "cp", seconds, [
            "source dropped from the page cache before each copy (fadvise DONTNEED after sync), for both: "
            "a library file read from disk"])
    return Copies("local server, warm", "cp", seconds, [
        "source in the page cache for both (just read); cp then only copies memory, so SHA-256 itself "
        "bounds a verified copy: ratio at most cp / sha256 alone"])


def print_p2(size_mib: int, rounds: int, results: list[Copies]) -> None:
    print(f"\nP2: copying a {size_mib} MiB disk image of random bytes (median of {rounds} interleaved rounds)")
    for copies in results:
        base = copies.seconds[copies.baseline_name]
        print(f"  {copies.label}:")
        for note in copies.notes:
            print(f"    ({note})")
        for name, secs in copies.seconds.items():
            line = f"    {name + ':':<62} {secs:6.2f} s {size_mib / secs:7.1f} MiB/s"
            if name == "Corral verified copy":
                ratio = base / secs
                line += f"  ratio {ratio:.2f} {'OK' if ratio >= 0.9 else 'UNDER'} (goal >= 0.9 x {copies.baseline_name})"
            elif name != copies.baseline_name:
                line += f"  ({base / secs:.2f} x {copies.baseline_name})"
            print(line)


def p2(app, bs, size_mib: int, root: Path, rounds: int) -> list[Copies]:
    src = root / "big.img"
    with open("/dev/urandom", "rb") as rnd, src.open("wb") as fh:  # incompressible, as disk images mostly are
        for _ in range(size_mib):
            fh.write(rnd.read(1 << 20))
    sha = images.local_sha256(src)
    return [p2_remote(app, bs, src, sha, rounds),
            p2_local(src, sha, root, rounds, cold=True),
            p2_local(src, sha, root, rounds, cold=False)]


def run_p1(app, client, bs, appliance_id: int, disk_id: int, rounds: int) -> None:
    corral, raw = p1(app, client, bs, appliance_id, disk_id, rounds)
    c, r = statistics.median(corral), statistics.median(raw)
    print(f"\nP1: clone with the base cached, request -> ready ({rounds} rounds, median seconds)")
    print(f"  Corral (request, task, worker, qemu-img, define): {c:6.3f}  (min {min(corral):.3f}, max {max(corral):.3f})")
    print(f"  raw qemu-img create -b + virsh define over ssh:    {r:6.3f}  (min {min(raw):.3f}, max {max(raw):.3f})")
    print(f"  ratio {c / r:.2f}; goal at most 1 s and at most 3x: "
          f"{'OK' if c <= 1 and c / r <= 3 else 'OVER'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--copy-rounds", type=int, default=3)
    ap.add_argument("--only", choices=("p1", "p2"), help="run one of the two")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    from tests.bed import Bed

    bed = Bed()
    bs = bed.up(n=max(1, len(bed.servers() or [])))[0]
    root = Path(tempfile.mkdtemp(prefix="corral-bench-provision-"))
    redis_proc, redis_url = _redis(root)
    worker = None
    try:
        app, sid, appliance_id, disk_id, token = bench_instance(bed, bs, root, redis_url)
        client = app.test_client()
        with client.session_transaction() as sess:
            sess["_user_id"], sess["_fresh"] = token, True
        log = open(root / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "portal", "worker"], stdout=log, stderr=subprocess.STDOUT)
        time.sleep(2)
        print(f"Corral provisioning benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
              f"server {bs.name} (test bed), guests as {local_domain_type(bed.appliance_cache)}")
        if args.only != "p2":
            run_p1(app, client, bs, appliance_id, disk_id, args.rounds)
        if args.only != "p1":
            print_p2(args.size_mib, args.copy_rounds, p2(app, bs, args.size_mib, root, args.copy_rounds))
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

"""How fast Corral moves a running VM between servers, next to doing it by hand.

    .venv/bin/python bench/migrate.py [--rounds 3]

P3 (local disks): live migration of the idle test guest (256 MiB, the appliance's disk copied
    along) between the two test-bed servers. Corral: the Migrate form posted, a running worker,
    the task's checks, pre-created destination disk, libvirt's migration with progress, the
    database commit and the source's cleanup; and within that the libvirt migration call alone.
    Raw: ``qemu-img create`` of the destination disk over ssh, then ``virsh migrate --live
    --persistent --copy-storage-all --copy-storage-synchronous-writes --auto-converge
    --abort-on-error`` (Corral's flags) and ``virsh undefine`` of the source (what
    ``--undefinesource`` would do, which drops the source's job statistics). Raw runs twice: over
    the same qemu+ssh connections Corral uses (the fair comparison), and over qemu+tcp without
    authentication (the fastest control channel libvirt has). Same guest, alternating directions.
    Downtime: libvirt's completed-job statistics (``domjobinfo --completed``), read on the source
    for raw runs before the undefine, on the destination for Corral's.
P3 (shared disk): the same for a guest on a directory bind-mounted into both servers and
    verified as shared by Corral's own check: memory only (``--unsafe``: libvirt cannot see that
    a bind mount is shared).
Cold move: the same guest moved by Corral's cold move (managed save, verified copy, define,
    restore), next to the same steps by hand (``virsh managedsave``, ``scp`` of disk and state
    through this machine, ``virsh define`` + ``virsh restore``).

It uses the test bed (``python -m tests.bed up``) and a throw-away instance; a benchmark prints
measurements, it is not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provision import _instance, _redis  # noqa: E402
from portal import vms  # noqa: E402
from portal.extensions import db  # noqa: E402
from portal.models import VM, Role, Task, User  # noqa: E402
from portal.vmm.detect import local_domain_type  # noqa: E402

NAME = "bm-mig"
SHARED_NAME = "bm-shr"
NAME_OF = {False: NAME, True: SHARED_NAME}
SHARED_MP = "/var/lib/corral/shared-bench"


def _virsh(bs, *args, check=True) -> str:
    return subprocess.run(["virsh", "-c", bs.uri_tcp, *args], capture_output=True, text=True, check=check).stdout


def _ssh(bed, bs, argv: list[str]) -> None:
    subprocess.run(bed.ssh_argv(bs.index, argv), check=True, capture_output=True)


def _wait_task(app, vm_id: int, after: int, timeout: float = 300) -> Task:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with app.app_context():
            task = db.session.execute(db.select(Task).where(Task.target_id == vm_id, Task.id > after)
                                      .order_by(Task.id.desc())).scalars().first()
            if task is not None and task.finished:
                db.session.expunge(task)
                return task
        time.sleep(0.05)
    raise TimeoutError("the task did not finish")


def _last_task_id(app) -> int:
    with app.app_context():
        return db.session.execute(db.select(db.func.max(Task.id))).scalar_one() or 0


def _corral(app, client, vm_id: int, mode: str, server_id: int) -> tuple[float, int | None, float | None]:
    after = _last_task_id(app)
    t0 = time.perf_counter()
    r = client.post(f"/vms/{vm_id}/move", data={"mode": mode, "server_id": server_id, "submitted": "1",
                                                "auto_converge": "y"})
    assert r.status_code == 303, r.status_code
    task = _wait_task(app, vm_id, after)
    total = time.perf_counter() - t0
    if task.state != "succeeded":
        raise RuntimeError(f"Corral's {mode} move failed: {task.error}\n{task.log}")
    m = re.search(r"\((\d+\.\d) s, downtime (\d+) ms", task.log or "")
    return total, int(m.group(2)) if m else None, float(m.group(1)) if m else None


def _raw_live(bed, src_uri: str, dst_uri: str, dst, disk: str | None, size: int) -> tuple[float, int | None]:
    """Raw live migration; *disk* None: shared storage (memory only)."""
    t0 = time.perf_counter()
    if disk is not None:
        _ssh(bed, dst, ["sh", "-c", 'mkdir -p "$(dirname "$1")" && qemu-img create -q -f qcow2 "$1" "$2"', "x",
                        disk, str(size)])
        how = ["--copy-storage-all", "--copy-storage-synchronous-writes"]
    else:
        how = ["--unsafe"]
    subprocess.run(["virsh", "-c", src_uri, "migrate", "--live", "--persistent", *how, "--auto-converge",
                    "--abort-on-error", NAME_OF[disk is None], dst_uri], check=True, capture_output=True, text=True)
    t1 = time.perf_counter()
    info = subprocess.run(["virsh", "-c", src_uri, "domjobinfo", "--completed", NAME_OF[disk is None]],
                          capture_output=True, text=True).stdout
    t2 = time.perf_counter()
    subprocess.run(["virsh", "-c", src_uri, "undefine", NAME_OF[disk is None]], check=True, capture_output=True)
    total = time.perf_counter() - t0 - (t2 - t1)
    m = re.search(r"Total downtime:\s+(\d+)\s+ms", info)
    return total, int(m.group(1)) if m else None


def _raw_cold(bed, src, dst, disk: str, root: Path) -> float:
    xml = root / "dom.xml"
    t0 = time.perf_counter()
    xml.write_text(_virsh(src, "dumpxml", "--migratable", NAME))
    _virsh(src, "managedsave", NAME)
    state = f"/var/lib/libvirt/qemu/save/{NAME}.save"
    _ssh(bed, dst, ["mkdir", "-p", os.path.dirname(disk)])
    for path, to in ((disk, disk), (state, os.path.join(os.path.dirname(disk), "hand.save"))):
        local = root / "xfer"
        subprocess.run(["scp", "-q", "-F", bed.ssh_config, f"root@{src.address}:{path}", str(local)], check=True)
        subprocess.run(["scp", "-q", "-F", bed.ssh_config, str(local), f"root@{dst.address}:{to}"], check=True)
        local.unlink()
    _virsh(dst, "define", str(xml))
    _virsh(dst, "restore", os.path.join(os.path.dirname(disk), "hand.save"))
    total = time.perf_counter() - t0
    _virsh(src, "undefine", "--managed-save", NAME)
    _ssh(bed, dst, ["rm", "-f", os.path.join(os.path.dirname(disk), "hand.save")])
    _ssh(bed, src, ["rm", "-rf", os.path.dirname(disk)])
    return total


def _fix_db(app, vm_id: int, server_id: int) -> None:
    """A raw move behind Corral's back: put the row where the VM now is (no monitor runs here)."""
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        disk = db.session.execute(db.select(vms.ServerDisk).where(vms.ServerDisk.server_id == server_id,
                                                                  vms.ServerDisk.mountpoint == vm.disk.mountpoint)
                                  ).scalar_one()
        vm.server_id, vm.disk_id = server_id, disk.id
        db.session.commit()


def _p3(app, client, bed, beds, sids, uris, vm_id: int, disk: str | None, size: int, rounds: int) -> dict:
    """Alternating rounds: Corral, raw over qemu+ssh, raw over qemu+tcp, each moving the guest to the
    other server. Returns lists of totals and downtimes per contender."""
    out = {k: [] for k in ("corral", "call", "corral_down", "ssh", "ssh_down", "tcp", "tcp_down")}
    at = 0
    for _ in range(rounds):
        total, down, call = _corral(app, client, vm_id, "live", sids[1 - at])
        out["corral"].append(total)
        out["call"] += [call] if call is not None else []
        out["corral_down"] += [down] if down is not None else []
        at = 1 - at
        for kind in ("ssh", "tcp"):
            src, dst = beds[at], beds[1 - at]
            total, down = _raw_live(bed, uris[kind][at], uris[kind][1 - at], dst, disk, size)
            if disk is not None:
                _ssh(bed, src, ["rm", "-rf", os.path.dirname(disk)])
            out[kind].append(total)
            out[f"{kind}_down"] += [down] if down is not None else []
            at = 1 - at
            _fix_db(app, vm_id, sids[at])
    if at:  # home again for whatever comes next
        _corral(app, client, vm_id, "live", sids[0])
    return out


def _print_p3(title: str, r: dict, rounds: int) -> None:
    print(f"\n{title} ({rounds} rounds each, alternating; median)")
    print(_line("Corral (form -> task done: checks, disks, migrate, commit, cleanup)", r["corral"]))
    if r["call"]:
        print(_line("  of which the libvirt migration call", r["call"]))
    print(_line("raw over qemu+ssh, as Corral connects (same flags)", r["ssh"]))
    print(_line("raw over qemu+tcp, no authentication (same flags)", r["tcp"]))
    med = statistics.median
    print(f"  ratio total {med(r['corral']) / med(r['ssh']):.2f} against raw over ssh, "
          f"{med(r['corral']) / med(r['tcp']):.2f} against raw over tcp (goal at most 1.1)")
    for key, label in (("corral_down", "Corral"), ("ssh_down", "raw over ssh"), ("tcp_down", "raw over tcp")):
        if r[key]:
            print(_line(f"downtime, {label} (libvirt-reported)", r[key], "ms", "6.0f"))
        else:
            print(f"  downtime, {label}: libvirt reported none")
    raw_down = r["ssh_down"] + r["tcp_down"]
    if r["corral_down"] and raw_down:
        print(f"  ratio downtime {med(r['corral_down']) / med(raw_down):.2f} (goal: no worse than raw)")


def _boot(app, client, vm_id: int, bs) -> None:
    after = _last_task_id(app)
    client.post(f"/vms/{vm_id}/power/start")
    _wait_task(app, vm_id, after)
    with app.app_context():
        name = db.session.get(VM, vm_id).name
    serial = bs.host_path(f"/var/log/libvirt/qemu/{name}.serial.log")
    deadline = time.monotonic() + 60
    while "CORRAL-READY" not in (serial.read_text(errors="replace") if serial.exists() else ""):
        if time.monotonic() > deadline:
            raise TimeoutError("the guest did not boot")
        time.sleep(0.2)


def _shared_guest(app, client, bed, beds, sids, root: Path, appliance_id: int) -> int | None:
    """A guest on a directory bind-mounted into both servers (this kernel has no NFS), declared
    shared on the server page and verified by Corral's task. None (said why) when that fails."""
    host_dir = root / "shared"
    host_dir.mkdir()
    for bs in beds:
        bs.host_path(SHARED_MP).mkdir(parents=True, exist_ok=True)
        bed.exec(bs.index, ["mount", "--bind", str(host_dir), SHARED_MP])
    with app.app_context():
        disks = [vms.ServerDisk(server_id=sid, mountpoint=SHARED_MP, size_gb=10) for sid in sids]
        db.session.add_all(disks)
        db.session.commit()
        ids = [d.id for d in disks]
    after = _last_task_id(app)
    client.post(f"/servers/{sids[0]}/disks/{ids[0]}/shared", data={"other_disk_id": ids[1]})
    deadline = time.monotonic() + 60
    while True:
        with app.app_context():
            task = db.session.execute(db.select(Task).where(Task.id > after)).scalars().first()
            if task is not None and task.finished:
                break
        if time.monotonic() > deadline:
            raise TimeoutError("the shared-storage check did not finish")
        time.sleep(0.1)
    if task.state != "succeeded":
        print(f"\n(no shared-disk P3: {task.error})")
        return None
    after = _last_task_id(app)
    client.post("/vms/new", data={"name": SHARED_NAME, "appliance": appliance_id, "memory_mb": 256, "vcpus": 1,
                                  "placement": str(ids[0])})
    with app.app_context():
        vm_id = db.session.execute(db.select(VM.id).where(VM.name == SHARED_NAME)).scalar_one()
    _wait_task(app, vm_id, after)
    _boot(app, client, vm_id, beds[0])
    return vm_id


def _line(label: str, values: list[float], unit: str = "s", fmt: str = "6.2f") -> str:
    return (f"  {label:<52} {statistics.median(values):{fmt}} {unit}  (min {min(values):{fmt}}, "
            f"max {max(values):{fmt}})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    from tests.bed import Bed
    from tests.conftest import register_bed_server

    bed = Bed()
    b1, b2 = bed.up(n=max(2, len(bed.servers() or [])))[:2]
    root = Path(tempfile.mkdtemp(prefix="corral-bench-migrate-"))
    redis_proc, redis_url = _redis(root)
    worker = None
    try:
        app = _instance(root, redis_url)
        sids = [register_bed_server(app, bs) for bs in (b1, b2)]
        with app.app_context():
            app.config["APPLIANCE_CACHE"] = str(bed.appliance_cache)
            from portal import library

            appliance_id = library.ensure_test_appliance().id
            user = User(username="bench", role=Role.MANAGER.value, password_hash="x")
            db.session.add(user)
            db.session.commit()
            token = f"{user.id}:{user.session_version}"
            disk_id = db.session.execute(db.select(vms.ServerDisk.id).where(vms.ServerDisk.server_id == sids[0])
                                         ).scalar_one()
        client = app.test_client()
        with client.session_transaction() as sess:
            sess["_user_id"], sess["_fresh"] = token, True
        log = open(root / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "portal", "worker"], stdout=log, stderr=subprocess.STDOUT)
        time.sleep(2)
        after = _last_task_id(app)
        client.post("/vms/new", data={"name": NAME, "appliance": appliance_id, "memory_mb": 256, "vcpus": 1,
                                      "placement": str(disk_id)})
        with app.app_context():
            vm_id = db.session.execute(db.select(VM.id).where(VM.name == NAME)).scalar_one()
        _wait_task(app, vm_id, after)
        _boot(app, client, vm_id, b1)
        with app.app_context():
            disk = db.session.get(VM, vm_id).vdisks[0].path
        size = int(re.search(r'"virtual-size": (\d+)', subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(b1.host_path(disk))], capture_output=True, text=True,
            check=True).stdout).group(1))
        print(f"Corral migration benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, servers "
              f"{b1.name} and {b2.name} (test bed), guests as {local_domain_type(bed.appliance_cache)}, "
              f"idle 256 MiB guest, {size >> 20} MiB virtual disk")
        with app.app_context():
            from portal import servers as servers_mod
            from portal.models import Server

            ssh_uris = [servers_mod.target_for(db.session.get(Server, sid)).uri() for sid in sids]
        uris = {"ssh": ssh_uris, "tcp": [b1.uri_tcp, b2.uri_tcp]}
        r = _p3(app, client, bed, (b1, b2), sids, uris, vm_id, disk, size, args.rounds)
        _print_p3("P3: live migration with local disks", r, args.rounds)
        shared = _shared_guest(app, client, bed, (b1, b2), sids, root, appliance_id)
        if shared is not None:
            r = _p3(app, client, bed, (b1, b2), sids, uris, shared, None, size, args.rounds)
            _print_p3("P3: live migration, shared disk (memory only)", r, args.rounds)
        cold, cold_raw = [], []
        for _ in range(args.rounds):
            total, _down, _call = _corral(app, client, vm_id, "cold", sids[1])  # bed1 -> bed2
            cold.append(total)
            cold_raw.append(_raw_cold(bed, b2, b1, disk, root))  # bed2 -> bed1, by hand
            _fix_db(app, vm_id, sids[0])
        print(f"\nCold move of the running guest ({args.rounds} rounds each, alternating; median)")
        print(_line("Corral (save, verified copy, define, restore, cleanup)", cold))
        print(_line("by hand (managedsave, scp via this machine, define, restore)", cold_raw))
        print(f"  ratio {statistics.median(cold) / statistics.median(cold_raw):.2f}")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=20)
        for bs in (b1, b2):
            for name in (NAME, SHARED_NAME):
                _virsh(bs, "destroy", name, check=False)
                _virsh(bs, "undefine", "--managed-save", name, check=False)
            bed.exec(bs.index, ["umount", SHARED_MP], check=False)
            subprocess.run(["rm", "-rf", str(bs.host_path(f"{bs.disk_dir}/corral-vms")),
                            str(bs.host_path(f"{bs.disk_dir}/corral-bases"))])
        redis_proc.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

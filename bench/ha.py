"""P4: LiveSync failover time and lost writes, then what LiveSync costs (bench/livesync_cost.py).

    flock /tmp/corral-bed.lock .venv/bin/python bench/ha.py [--rounds 5] [--no-cost]

On the test bed (two servers) a Corral instance (its own SQLite and Redis, a real worker, the LiveSync
watcher and the HA witness in threads) runs one protected guest in mode "LiveSync + automatic
failover". Each round kills every process of the server the guest runs on (libvirtd, sshd, agent,
QEMU: ``Bed.crash_server``) and measures from the kill to

(a) the guest running on the other server (its running domains listed every 100 ms), and
(b) the guest's first heartbeat there (a durable write: its serial ``CORRAL-HB n`` is printed only
    after the fsync of record n returned);

lost acknowledged writes = last heartbeat acknowledged on the dead server - (first heartbeat on the
new one - 1), floored at 0 (goal 0 every round). The killed server is then brought back and the round
ends once the copy is in sync again (the next round kills the other server). Medians over the rounds,
with the lease settings used.
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

from bench.provision import _instance, _redis  # noqa: E402
from portal import ha  # noqa: E402
from portal.extensions import db  # noqa: E402
from portal.livesync_watch import Watcher  # noqa: E402
from portal.models import VM, Role, ServerDisk, User  # noqa: E402
from tests.vm_util import RunningSampler, boot_heartbeats, last_ack, wait_for  # noqa: E402

NAME = "b-ha"


def _state(app, vm_id):
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        return vm.server_id, vm.livesync.state if vm.livesync else None


def _prepared(app, vm_id) -> bool:
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        return vm.state == "off" and "off" in (vm.livesync.broken_reason or "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-cost", action="store_true", help="skip bench/livesync_cost.py")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    from portal import library
    from tests.bed import Bed
    from tests.conftest import register_bed_server

    bed = Bed()
    b1, b2 = bed.up(n=max(2, len(bed.servers() or [])))[:2]
    root = Path(tempfile.mkdtemp(prefix="corral-bench-ha-"))
    redis_proc, redis_url = _redis(root)
    worker = watcher = witness = None
    results = []
    try:
        app = _instance(root, redis_url)
        sids = [register_bed_server(app, bs) for bs in (b1, b2)]
        beds = dict(zip(sids, (b1, b2)))
        with app.app_context():
            app.config["APPLIANCE_CACHE"] = str(bed.appliance_cache)
            appliance_id = library.ensure_test_appliance().id
            user = User(username="bench", role=Role.MANAGER.value, password_hash="x")
            db.session.add(user)
            db.session.commit()
            token = f"{user.id}:{user.session_version}"
            disk_id = db.session.execute(db.select(ServerDisk.id).where(ServerDisk.server_id == sids[0])).scalar_one()
        client = app.test_client()
        with client.session_transaction() as sess:
            sess["_user_id"], sess["_fresh"] = token, True
        with open(root / "worker.log", "w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "portal", "worker"], stdout=log, stderr=subprocess.STDOUT)
        watcher, witness = Watcher(app, interval=0.5), ha.Witness(app)
        watcher.start()
        witness.start()
        r = client.post("/vms/new", data={"name": NAME, "appliance": appliance_id, "memory_mb": 256, "vcpus": 1,
                                          "placement": str(disk_id), "clone": "y", "mac": "",
                                          "backup_mode": "livesync_failover", "backup_server": str(sids[1])})
        assert r.status_code == 302, r.get_data(as_text=True)
        with app.app_context():
            vm_id = db.session.execute(db.select(VM.id).where(VM.name == NAME)).scalar_one()
        wait_for(lambda: _prepared(app, vm_id), 180, "the VM created and its copies prepared", step=0.5)
        r = client.post(f"/vms/{vm_id}/power/start", follow_redirects=True)
        assert r.status_code == 200, r.status_code
        wait_for(lambda: _state(app, vm_id)[1] == "in_sync", 180, "the initial sync", step=0.5)
        wait_for(lambda: last_ack(b1, NAME) >= 3, 120, "the guest's heartbeat", step=0.5)
        cfg = app.config
        print(f"Corral HA benchmark (P4): Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, servers "
              f"{b1.name} and {b2.name} (test bed), 256 MiB guest, heartbeat (fsync) every 0.1 s")
        print(f"lease settings: renew every {cfg['HA_LEASE_INTERVAL_SECONDS']} s, self-fence after "
              f"{cfg['HA_FENCE_AFTER_SECONDS']} s alone, takeover after {cfg['HA_TAKEOVER_SECONDS']} s")
        sampler = RunningSampler(bed, [b1.index, b2.index], NAME).start()
        for n in range(args.rounds):
            here, _ = _state(app, vm_id)
            there = next(s for s in sids if s != here)
            dead, new = beds[here], beds[there]
            readies = new.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")
            readies = readies.read_text(errors="replace").count("CORRAL-READY") if readies.exists() else 0
            t0 = time.monotonic()
            bed.crash_server(dead.index)
            acked = last_ack(dead, NAME)
            t_run = wait_for(lambda: sampler.first_on(new.index, t0), 60, "the guest on the backup", step=0.05)

            def beats():
                log = new.host_path(f"/var/log/libvirt/qemu/{NAME}.serial.log")
                fresh = log.exists() and log.read_text(errors="replace").count("CORRAL-READY") > readies
                return boot_heartbeats(new, NAME) if fresh else None

            first = wait_for(beats, 120, "the first heartbeat on the backup", step=0.05)[0]
            t_beat = time.monotonic()
            lost = max(0, acked - (first - 1))
            results.append((t_run - t0, t_beat - t0, lost))
            print(f"  round {n + 1}: {dead.name} killed -> running on {new.name} after {t_run - t0:5.2f} s, first "
                  f"heartbeat after {t_beat - t0:5.2f} s; last acked {acked}, first there {first}, lost {lost}")
            bed.start_sshd(dead.index)
            bed.start_libvirtd(dead.index)
            wait_for(lambda: _state(app, vm_id) == (there, "in_sync"), 300, "the copy back in sync", step=0.5)
        sampler.close()
        runs, beats_, lost = zip(*results)
        print(f"\nP4 over {len(results)} rounds (median): running on the backup {statistics.median(runs):.2f} s "
              f"(goal <= 10 s; max {max(runs):.2f}), first heartbeat {statistics.median(beats_):.2f} s "
              f"(max {max(beats_):.2f}); acknowledged writes lost per round {list(lost)} (goal 0); samples with "
              f"the guest on both servers: {sampler.both} of {len(sampler.samples)}")
    finally:
        for part in (watcher, witness):
            if part is not None:
                part.stop.set()
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=20)
        for bs in (b1, b2):
            bed.start_sshd(bs.index)
            bed.start_libvirtd(bs.index)
            bed.exec(bs.index, ["sh", "-c", "kill $(cat /run/corral-agent/agent.pid)"], check=False)
            bed.exec(bs.index, ["sh", "-c", f"kill $(cat /run/corral-livesync/{NAME}.pid)"], check=False)
            bed.virsh(bs.index, "destroy", NAME, check=False)
            bed.virsh(bs.index, "undefine", NAME, check=False)
            subprocess.run(["rm", "-rf", str(bs.host_path(f"{bs.disk_dir}/corral-vms")),
                            str(bs.host_path(f"{bs.disk_dir}/corral-bases"))])
        redis_proc.terminate()
    if not args.no_cost:
        try:
            from bench import livesync_cost
        except ImportError:
            return 0
        print("\nLiveSync cost (bench/livesync_cost.py):")
        figures = livesync_cost.run(bed=bed)
        for key, value in figures.items():
            print(f"  {key}: {value:.2f}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How fast the rebalancing planner is on a large cluster, and how many moves it proposes next to a
simple greedy loop's.

    .venv/bin/python bench/rebalance.py [--servers 1000] [--vms 20000] [--seeds 3]

Each seed builds a synthetic cluster (``synthetic_cluster``): servers of 16 cores and 64 GiB,
a tenth of them "hot" (packed with more VMs than the rest, over the thresholds), VMs of
1 to 8 GiB and 1 to 4 vCPUs with a CPU load each, a fifth of them LiveSync-protected (a backup
server they may never land on), some KVM-only servers. It then times ``rebalance.plan`` (the
planner alone, no database) and runs ``rebalance.greedy_baseline`` on the same input: move the
hot server's VMs in their order to the least loaded server they fit on until it is under.

Printed per seed: planner time, moves proposed by each, servers over threshold before and
after each. Goals: planner under 5 s at 1,000 / 20,000; never more moves than greedy; every
server under threshold whenever greedy also gets there.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portal.rebalance import SrvLoad, Thresholds, VMLoad, greedy_baseline, plan  # noqa: E402

MEM_MB = 65536
CORES = 16


def synthetic_cluster(n_servers: int, n_vms: int, seed: int = 1, hot_fraction: float = 0.1
                      ) -> tuple[list[SrvLoad], list[VMLoad]]:
    """Servers and VMs as the planner sees them: hot servers over the default thresholds, the rest not."""
    rnd = random.Random(seed)
    servers = [SrvLoad(id=i + 1, name=f"s{i + 1}", cores=CORES, cpu_load=0.0, mem_total_mb=MEM_MB, mem_used_mb=0,
                       disks={10_000 + i: rnd.choice([800, 1500, 3000])}, kvm=rnd.random() > 0.05)
               for i in range(n_servers)]
    hot = set(rnd.sample(range(n_servers), max(1, int(n_servers * hot_fraction))))
    # Hot servers get ~1.6 times their share; everyone stays within physical memory.
    weights = [1.6 if i in hot else 1.0 for i in range(n_servers)]
    vms = []
    for n in range(n_vms):
        memory = rnd.choice([1024, 1024, 2048, 2048, 2048, 4096, 8192])
        vcpus = rnd.choice([1, 1, 2, 2, 4])
        cpu = round(vcpus * rnd.uniform(0.05, 0.45), 3)
        for _ in range(20):
            i = rnd.choices(range(n_servers), weights)[0]
            s = servers[i]
            if s.mem_used_mb + memory <= s.mem_total_mb * (1.0 if i in hot else 0.8):
                break
        else:
            continue
        s.mem_used_mb += memory
        s.cpu_load += cpu
        backup = rnd.choice(servers).id if rnd.random() < 0.2 else None
        vms.append(VMLoad(id=n + 1, name=f"v{n + 1}", server_id=s.id, memory_mb=memory, cpu=cpu,
                          disk_gb=rnd.choice([10, 20, 40]), backup_server_id=backup if backup != s.id else None,
                          kvm=s.kvm, movable=rnd.random() > 0.02))
    return servers, vms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, default=1000)
    ap.add_argument("--vms", type=int, default=20000)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    t = Thresholds()
    print(f"{'seed':>4} {'over':>5} {'plan s':>7} {'moves':>6} {'left':>5} {'greedy s':>9} {'moves':>6} {'left':>5}"
          f" {'ratio':>6}")
    for seed in range(1, args.seeds + 1):
        servers, vms = synthetic_cluster(args.servers, args.vms, seed)
        t0 = time.perf_counter()
        ours = plan(servers, vms, t)
        t1 = time.perf_counter()
        greedy = greedy_baseline(servers, vms, t)
        t2 = time.perf_counter()
        over = len(ours.over_before(t))
        ratio = len(ours.moves) / max(len(greedy.moves), 1)
        print(f"{seed:>4} {over:>5} {t1 - t0:>7.2f} {len(ours.moves):>6} {len(ours.still_over):>5} {t2 - t1:>9.2f} "
              f"{len(greedy.moves):>6} {len(greedy.still_over):>5} {ratio:>6.2f}")
    print("over: servers over a threshold before; left: still over after; ratio: planner moves / greedy moves")


if __name__ == "__main__":
    main()

"""Server time of the busiest pages with 100 VMs and with 20,000 VMs.

Run it from the repository root, either way::

    .venv/bin/python bench/pages.py
    .venv/bin/python -m bench.pages [--requests 60] [--warmup 5] [--extra] [--sql] [--keep] [--check]

It builds two throw-away instances in a temporary directory, each a SQLite
database migrated with Alembic exactly like a real installation:

* small: 100 VMs on 50 servers, 10 users
* large: 20,000 VMs on 1,000 servers, 200 users

Every VM has a virtual disk (every fifth a second one), a NIC and the task that
created it; servers have one or two disks. Owners, servers and states are
drawn from a seeded random generator, so two runs see the same data. The
small instance has 50 servers (one full page) and its power user owns 60 VMs
(more than a page) so that both sizes render full first pages: the ratio
then measures the growth of the data, not the filling of a page.

Pages are requested through Flask's test client, logged in as a manager (who
sees everything: the worst case) and as a power user owning about 100 VMs.
Requests to the two instances alternate, so load on the machine affects both
sizes alike. The time of a request is the wall time around ``client.get``;
the number of SQL statements per request is counted on the engine. The goal
(issue "bench/pages.py"): p50 at 20k / p50 at 100 <= 2 for every page, and the
same number of queries at both sizes (no N+1).

A benchmark prints measurements; it is not a test. ``--check`` makes the exit
status 1 when a page is over its goal, for scripts that want one.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import event, insert

from portal import create_app
from portal.auth_core import hash_password
from portal.extensions import db
from portal.models import (
    NIC,
    VM,
    BackupMode,
    Role,
    Server,
    ServerDisk,
    ServerStatus,
    Task,
    TaskState,
    User,
    VirtualDisk,
    VMState,
    utcnow,
)

GOAL = 2.0


@dataclass(frozen=True)
class Size:
    key: str
    label: str
    vms: int
    servers: int
    users: int
    power_vms: int  # VMs owned by the benchmark's power user


SMALL = Size("small", "100 VMs", vms=100, servers=50, users=10, power_vms=60)
LARGE = Size("large", "20k VMs", vms=20_000, servers=1_000, users=200, power_vms=100)

# (label, who, url): who is a client of the instance ("anon" is logged out).
PAGES = [
    ("trivial: GET /login (anon)", "anon", "/login"),
    ("summary / (manager)", "manager", "/"),
    ("summary / (power user)", "power", "/"),
    ("VM list /vms/ (manager)", "manager", "/vms/"),
    ("VM list /vms/ (power user)", "power", "/vms/"),
    ("server list /servers/ (manager)", "manager", "/servers/"),
]
BASELINE = PAGES[0][0]


def _last_vm_page(inst: Instance) -> str:
    pages = -(-inst.counts["VMs"] // inst.app.config["PAGE_SIZE"])
    return f"/vms/?page={pages}"


# With --extra: views a manager reaches from the Summary and the VM list. Each
# shows a page of about the same length at both sizes: ~45 running VMs of 100
# and 50 of 20k, the ten names vm00010-vm00019, a full last page.
EXTRA_PAGES = [
    ("VM list ?state=running (manager)", "manager", "/vms/?state=running"),
    ("VM list ?q=vm0001 (manager)", "manager", "/vms/?q=vm0001"),
    ("VM list last page (manager)", "manager", _last_vm_page),
]

VM_STATES = [  # (state, weight): a cluster mostly running or off
    (VMState.RUNNING, 45), (VMState.OFF, 30), (VMState.PAUSED, 4), (VMState.SAVED, 4),
    (VMState.CRASHED, 3), (VMState.PARTIAL, 3), (VMState.CREATING, 2), (VMState.MIGRATING, 2),
    (VMState.DELETING, 1), (VMState.UNKNOWN, 6),
]
SERVER_STATES = [(ServerStatus.UP, 90), (ServerStatus.DOWN, 5), (ServerStatus.MARKED_DOWN, 5)]
TASK_STATES = [(TaskState.SUCCEEDED, 94), (TaskState.FAILED, 4), (TaskState.CANCELLED, 1),
               (TaskState.RUNNING, 0.5), (TaskState.QUEUED, 0.5)]


def _pick(rng: random.Random, weighted) -> str:
    values, weights = zip(*weighted)
    return rng.choices(values, weights)[0].value


# --- seeding -----------------------------------------------------------------

@dataclass
class Seeded:
    manager: User
    power: User
    counts: dict[str, int] = field(default_factory=dict)


def seed(size: Size, password_hash: str, rng: random.Random) -> Seeded:
    """Bulk-insert users, servers with disks, VMs with disks and NICs, tasks."""
    now = utcnow()

    users = []
    for i in range(size.users):
        if i == 0:
            name, role = "manager", Role.MANAGER
        elif i == 1:
            name, role = "power", Role.POWER
        else:
            name = f"user{i:03d}"
            role = Role.MANAGER if i % 10 == 0 else Role.POWER if i % 10 in (1, 2, 3) else Role.REGULAR
        power = role is Role.POWER
        users.append(dict(
            id=i + 1, username=name, email=f"{name}@example.org", password_hash=password_hash,
            role=role.value, disabled=False, session_version=1, quota_serial=0,
            max_vms=200 if power else 0, max_memory_mb=1_048_576 if power else 0,
            max_disk_gb=100_000 if power else 0, created_at=now - timedelta(days=400),
        ))
    power_id = 2
    regular = {u["id"] for u in users if u["role"] == Role.REGULAR.value}
    other_owners = [u["id"] for u in users if u["id"] != power_id]

    servers, server_disks, first_disk = [], [], {}
    for j in range(size.servers):
        sid = j + 1
        servers.append(dict(
            id=sid, hostname=f"srv{sid:04d}.bench.example", address=f"10.{sid // 250}.{sid % 250}.1",
            transport="ssh", ssh_port=22, cpus=2, cores_per_cpu=16, hyperthreading=True,
            memory_mb=524_288, free_memory_mb=rng.randrange(16_384, 262_144), nics=4, mhz=2400,
            hypervisor_vendor="QEMU", hypervisor_type="QEMU", hypervisor_version="7.2.0",
            domain_type="kvm", status=_pick(rng, SERVER_STATES),
            last_seen=now - timedelta(seconds=rng.randrange(5, 600)), created_at=now - timedelta(days=300),
        ))
        for k in range(2 if sid % 4 == 0 else 1):
            did = len(server_disks) + 1
            first_disk.setdefault(sid, did)
            server_disks.append(dict(id=did, server_id=sid, mountpoint=f"/var/lib/corral/disk{k + 1}",
                                     size_gb=4000, free_gb=rng.randrange(100, 4000)))

    names = list(range(size.vms))
    rng.shuffle(names)  # so that the order by name is not the order of insertion
    power_vms = set(rng.sample(range(size.vms), size.power_vms))
    vms, vdisks, nics, tasks = [], [], [], []
    for i in range(size.vms):
        vid = i + 1
        state = _pick(rng, VM_STATES)
        owner = power_id if i in power_vms else rng.choice(other_owners)
        server = None if state in ("creating", "partial") and rng.random() < 0.5 else rng.randrange(1, size.servers + 1)
        backup = rng.random() < 0.1 and server is not None
        created = now - timedelta(days=rng.uniform(0, 365))
        vms.append(dict(
            id=vid, vmid=1000 + vid, name=f"vm{names[i]:05d}", owner_id=owner,
            memory_mb=rng.choice((512, 1024, 2048, 4096, 8192)), vcpus=rng.choice((1, 2, 4)),
            server_id=server, disk_id=first_disk[server] if server else None,
            backup_server_id=(server % size.servers) + 1 if backup else None,
            backup_mode=BackupMode.LIVESYNC.value if backup else BackupMode.NONE.value,
            is_clone=rng.random() < 0.1, usb_tablet=False, state=state,
            created_at=created, state_changed_at=now - timedelta(minutes=rng.uniform(1, 10_000)),
        ))
        for pos in range(2 if vid % 5 == 0 else 1):
            vdisks.append(dict(id=len(vdisks) + 1, vm_id=vid, position=pos, size_gb=rng.choice((10, 20, 50, 100)),
                               bus="virtio", format="qcow2", path=f"/var/lib/corral/disk1/{vid}-{pos}.qcow2"))
        nics.append(dict(id=vid, vm_id=vid, position=0, model="virtio",
                         mac=f"52:54:00:{vid >> 16 & 255:02x}:{vid >> 8 & 255:02x}:{vid & 255:02x}"))
        tstate = _pick(rng, TASK_STATES)
        # Half the failures happened in the last day (they count on the Summary page).
        tcreated = now - timedelta(hours=rng.uniform(0, 23)) if tstate == "failed" and vid % 2 else created
        tasks.append(dict(
            id=vid, kind="vm.create", title=f"Create VM vm{names[i]:05d}", target_type="vm", target_id=vid,
            # Regular users cannot create VMs: a manager made theirs.
            requester_id=1 if owner in regular else owner, state=tstate, pct=100 if tstate == "succeeded" else 40,
            log="", error="it broke" if tstate == "failed" else None, cancel_requested=False,
            created_at=tcreated, started_at=tcreated,
            finished_at=tcreated + timedelta(minutes=3) if tstate in ("succeeded", "failed", "cancelled") else None,
        ))

    for model, rows in ((User, users), (Server, servers), (ServerDisk, server_disks), (VM, vms),
                        (VirtualDisk, vdisks), (NIC, nics), (Task, tasks)):
        db.session.execute(insert(model), rows)
    db.session.commit()
    return Seeded(
        manager=db.session.get(User, 1), power=db.session.get(User, power_id),
        counts={"users": len(users), "servers": len(servers), "server disks": len(server_disks),
                "VMs": len(vms), "virtual disks": len(vdisks), "NICs": len(nics), "tasks": len(tasks)},
    )


# --- instances ---------------------------------------------------------------

class QueryCounter:
    """Counts (and keeps) the SQL statements sent through an engine."""

    def __init__(self, engine) -> None:
        self.statements: list[str] = []
        event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.statements.append(statement)

    def reset(self) -> None:
        self.statements = []


class Instance:
    """A throw-away Corral instance of one size with logged-in test clients."""

    def __init__(self, size: Size, root: Path, password_hash: str) -> None:
        self.size = size
        path = root / size.key
        os.environ["CORRAL_INSTANCE_PATH"] = str(path)  # read by create_app
        self.app = create_app({
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{path / 'corral.sqlite'}",
            "SECRET_KEY": "bench-secret",
            "REDIS_URL": "redis://127.0.0.1:1/0",  # nothing answers: the pages must not need Redis
            "QUEUE_PREFIX": f"corralbench{os.getpid()}",
            "PROPAGATE_EXCEPTIONS": True,
        })
        with self.app.app_context():
            from flask_migrate import upgrade

            logging.disable(logging.INFO)  # Alembic's "Running upgrade" lines
            try:
                upgrade()
            finally:
                logging.disable(logging.NOTSET)
            t0 = time.perf_counter()
            seeded = seed(size, password_hash, random.Random(20_000 + size.vms))
            self.seed_seconds = time.perf_counter() - t0
            self.counts = seeded.counts
            self.counter = QueryCounter(db.engine)
            manager_id, power_id = seeded.manager.get_id(), seeded.power.get_id()
            self.power_owns = db.session.scalar(
                db.select(db.func.count()).select_from(VM).where(VM.owner_id == seeded.power.id))
            db.session.remove()
        self.clients = {"anon": self.app.test_client(), "manager": self._client(manager_id),
                        "power": self._client(power_id)}

    def _client(self, user_token: str):
        client = self.app.test_client()
        with client.session_transaction() as sess:  # what flask-login's login_user stores
            sess["_user_id"] = user_token
            sess["_fresh"] = True
        return client

    def get(self, who: str, url: str) -> tuple[float, int]:
        """One request: (seconds, SQL statements)."""
        client = self.clients[who]
        self.counter.reset()
        t0 = time.perf_counter()
        resp = client.get(url)
        elapsed = time.perf_counter() - t0
        if resp.status_code != 200:
            raise RuntimeError(f"{self.size.label}: GET {url} as {who} answered {resp.status_code}, not 200")
        return elapsed, len(self.counter.statements)

    def close(self) -> None:
        with self.app.app_context():
            db.session.remove()
            db.engine.dispose()


# --- measuring ---------------------------------------------------------------

def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


@dataclass
class Result:
    times: dict[str, list[float]] = field(default_factory=dict)  # size key -> seconds
    queries: dict[str, set[int]] = field(default_factory=dict)  # size key -> distinct counts

    def p(self, key: str, pct: float) -> float:
        return percentile(self.times[key], pct) * 1000

    def p50(self, key: str) -> float:
        return statistics.median(self.times[key]) * 1000


def _url(url, inst: Instance) -> str:
    return url(inst) if callable(url) else url


def measure(instances: list[Instance], who: str, url, requests: int, warmup: int) -> Result:
    result = Result({i.size.key: [] for i in instances}, {i.size.key: set() for i in instances})
    for _ in range(warmup):
        for inst in instances:
            inst.get(who, _url(url, inst))
    for n in range(requests):
        for inst in instances if n % 2 == 0 else reversed(instances):  # alternate who goes first
            seconds, queries = inst.get(who, _url(url, inst))
            result.times[inst.size.key].append(seconds)
            result.queries[inst.size.key].add(queries)
    return result


def run_pages(pages, instances: list[Instance], args) -> list[tuple[str, Result | str]]:
    """Measure each page; a page that fails gets its error instead of a Result."""
    large = instances[-1]
    results = []
    for label, who, url in pages:
        try:
            results.append((label, measure(instances, who, url, args.requests, args.warmup)))
        except Exception as exc:  # a broken page must not hide the others' numbers
            results.append((label, f"{type(exc).__name__}: {exc}"))
            continue
        if args.sql:
            large.get(who, _url(url, large))
            print(f"-- {label} at {large.size.label}: {len(large.counter.statements)} statements")
            for stmt in large.counter.statements:
                print("   " + " ".join(stmt.split()))
            print()
    return results


def _queries(counts: set[int]) -> str:
    return "/".join(str(c) for c in sorted(counts))


def print_table(results: list[tuple[str, Result | str]]) -> list[str]:
    """Print one table; return the labels of the pages over their goal."""
    head = (f"{'page':<36} {'100 VMs p50/p95':>16} {'20k VMs p50/p95':>16} {'ratio':>6} {'goal':>5}  "
            f"{'':<4}  {'queries 100/20k':>15}")
    print(head)
    print("-" * len(head))
    over = []
    for label, r in results:
        if isinstance(r, str):
            over.append(label)
            print(f"{label:<36} ERROR {r}")
            continue
        ratio = r.p50(LARGE.key) / r.p50(SMALL.key)
        same_queries = r.queries[SMALL.key] == r.queries[LARGE.key]
        if label == BASELINE:
            verdict, goal = "", ""
        else:
            verdict, goal = ("OK" if ratio <= GOAL and same_queries else "OVER"), f"≤ {GOAL:g}"
            if verdict == "OVER":
                over.append(label)
        print(f"{label:<36} {r.p50(SMALL.key):7.1f} / {r.p(SMALL.key, 95):6.1f} "
              f"{r.p50(LARGE.key):7.1f} / {r.p(LARGE.key, 95):6.1f} {ratio:6.2f} {goal:>5}  {verdict:<4}  "
              f"{_queries(r.queries[SMALL.key]):>7} / {_queries(r.queries[LARGE.key]):<6}"
              f"{'' if same_queries else '  queries grow with the data'}")
    return over


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="timed requests per page and size (60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests first (5)")
    parser.add_argument("--extra", action="store_true",
                        help="also measure filtered, searched and last-page VM lists (not in the goal)")
    parser.add_argument("--sql", action="store_true", help="print the SQL of one request per page (20k)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary instances and say where")
    parser.add_argument("--check", action="store_true", help="exit 1 when a page is over its goal")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    saved_env = os.environ.get("CORRAL_INSTANCE_PATH")
    started = time.perf_counter()
    instances: list[Instance] = []
    try:
        password_hash = hash_password("bench-password-not-used")
        for size in (SMALL, LARGE):
            instances.append(Instance(size, root, password_hash))

        print(f"Corral page benchmark: Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
              f"Flask test client, {os.cpu_count()} CPUs")
        print(f"{args.requests} timed requests per page and size after {args.warmup} warm-up, "
              f"the two sizes alternating; times in ms; PAGE_SIZE {instances[0].app.config['PAGE_SIZE']}")
        for inst in instances:
            counts = ", ".join(f"{n:,} {what}" for what, n in inst.counts.items())
            print(f"  {inst.size.label:>7}: {counts}; power user owns {inst.power_owns} VMs; "
                  f"seeded in {inst.seed_seconds:.1f} s")
        print()

        results = run_pages(PAGES, instances, args)
        over = print_table(results)
        base = dict(results)[BASELINE]
        print()
        if not isinstance(base, str):
            print(f"Trivial route p50 (to compare machines): {base.p50(SMALL.key):.2f} ms at 100 VMs, "
                  f"{base.p50(LARGE.key):.2f} ms at 20k VMs.")
        print(f"ratio = p50 at 20k / p50 at 100; goal ≤ {GOAL:g} and the same number of SQL statements per "
              f"request at both sizes. {'All pages OK' if not over else 'OVER: ' + ', '.join(over)}.")
        if args.extra:
            print()
            print("Extra views (not in the issue's goal; pages of about the same length at both sizes):")
            print_table(run_pages(EXTRA_PAGES, instances, args))
        print(f"Whole run {time.perf_counter() - started:.0f} s.")
        return 1 if over and args.check else 0
    finally:
        for inst in instances:
            inst.close()
        if saved_env is None:
            os.environ.pop("CORRAL_INSTANCE_PATH", None)
        else:
            os.environ["CORRAL_INSTANCE_PATH"] = saved_env
        if args.keep:
            print(f"Instances kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Rebalancing: a planner that proposes the fewest live migrations bringing every server under thresholds.

:func:`plan` is pure (plain dataclasses in, a :class:`Plan` out), so it is
tested on synthetic clusters of thousands of servers. :func:`snapshot` reads
the cluster from the database (the poll's recent samples and load), and
:func:`apply` turns approved moves into the existing live-migration tasks.

Load model: a server's memory load is its used memory (average of the poll's
samples over ``REBALANCE_WINDOW_SECONDS``, at least the memory of the VMs it
runs: samples may be missing or stale) over its total; its CPU load is the
poll's 1-minute load average over its cores. A VM carries its memory and a
share of its server's CPU load proportional to its vCPUs. A move is allowed
where a live migration would be (``portal.moves``: up, free memory, a VM disk
with room unless the storage is shared, KVM only onto KVM) and never onto the
VM's own LiveSync backup server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy.orm import selectinload

from .extensions import db
from .models import ACTIVE_TASK_STATES, VM, BackupMode, Server, ServerSample, ServerStatus, Task, VMState, utcnow


@dataclass
class SrvLoad:
    id: int
    name: str
    cores: int
    cpu_load: float  # run-queue load (1-minute average)
    mem_total_mb: int
    mem_used_mb: int
    disks: dict[int, int] = field(default_factory=dict)  # VM disk id -> free GB
    shared: dict[str, int] = field(default_factory=dict)  # shared group -> that disk's id here
    kvm: bool = False
    up: bool = True

    def cpu_frac(self) -> float:
        return self.cpu_load / max(self.cores, 1)

    def mem_frac(self) -> float:
        return self.mem_used_mb / max(self.mem_total_mb, 1)


@dataclass
class VMLoad:
    id: int
    name: str
    server_id: int
    memory_mb: int
    cpu: float  # its share of the server's load
    disk_gb: int
    backup_server_id: int | None = None
    shared_group: str | None = None
    kvm: bool = False
    movable: bool = True  # runs and no task holds it


@dataclass(frozen=True)
class Thresholds:
    cpu: float = 0.8  # load per core
    mem: float = 0.85  # fraction of memory used


@dataclass
class Move:
    vm_id: int
    vm_name: str
    source_id: int
    target_id: int
    disk_id: int | None  # the target's VM disk (the shared one for shared storage)


@dataclass
class Plan:
    moves: list[Move]
    before: dict[int, tuple[float, float]]  # server id -> (cpu, mem) fractions
    after: dict[int, tuple[float, float]]
    still_over: list[int]  # servers no allowed move brings under the thresholds

    def over_before(self, t: Thresholds) -> list[int]:
        return [s for s, (c, m) in self.before.items() if c > t.cpu or m > t.mem]


def _over(s: SrvLoad, t: Thresholds) -> bool:
    return s.cpu_frac() > t.cpu or s.mem_frac() > t.mem


def _target_disk(vm: VMLoad, dst: SrvLoad) -> int | None | bool:
    """The disk a VM would land on at *dst*, or False when none can hold it."""
    if vm.shared_group and vm.shared_group in dst.shared:
        return dst.shared[vm.shared_group]
    best, best_free = False, -1
    for disk_id, free in dst.disks.items():
        if free >= vm.disk_gb and free > best_free:
            best, best_free = disk_id, free
    return best


def _fits(vm: VMLoad, dst: SrvLoad, t: Thresholds) -> bool:
    if not dst.up or dst.id == vm.server_id or dst.id == vm.backup_server_id:
        return False
    if vm.kvm and not dst.kvm:
        return False
    if dst.mem_total_mb - dst.mem_used_mb < vm.memory_mb:
        return False
    return ((dst.cpu_load + vm.cpu) / max(dst.cores, 1) <= t.cpu
            and (dst.mem_used_mb + vm.memory_mb) / max(dst.mem_total_mb, 1) <= t.mem)


def _headroom(s: SrvLoad, t: Thresholds) -> float:
    return min(t.cpu - s.cpu_frac(), t.mem - s.mem_frac())


class _Targets:
    """Destination servers ordered by headroom; the best one a VM fits on is the first that fits."""

    def __init__(self, servers: dict[int, SrvLoad], t: Thresholds):
        self.t = t
        self.servers = servers
        self.order = sorted((s for s in servers.values() if s.up and not _over(s, t)),
                            key=lambda s: _headroom(s, t), reverse=True)

    def best(self, vm: VMLoad) -> tuple[SrvLoad, int | None] | None:
        for s in self.order:
            if _headroom(s, self.t) <= 0:
                break
            if _fits(vm, s, self.t):
                disk = _target_disk(vm, s)
                if disk is not False:
                    return s, disk
        return None

    def took(self, s: SrvLoad) -> None:
        """*s* just received a VM: move it back to its place in the headroom order."""
        self.order.remove(s)
        h = _headroom(s, self.t)
        lo, hi = 0, len(self.order)
        while lo < hi:
            mid = (lo + hi) // 2
            if _headroom(self.order[mid], self.t) >= h:
                lo = mid + 1
            else:
                hi = mid
        self.order.insert(lo, s)


def _shift(vm: VMLoad, src: SrvLoad, dst: SrvLoad, disk_id: int | None) -> None:
    src.cpu_load -= vm.cpu
    src.mem_used_mb -= vm.memory_mb
    dst.cpu_load += vm.cpu
    dst.mem_used_mb += vm.memory_mb
    if not (vm.shared_group and vm.shared_group in dst.shared) and disk_id is not None:
        dst.disks[disk_id] -= vm.disk_gb
    vm.server_id = dst.id


def _need(s: SrvLoad, t: Thresholds) -> tuple[float, float]:
    """How much CPU load and memory must leave *s* to bring it under the thresholds."""
    return max(0.0, s.cpu_load - t.cpu * s.cores), max(0.0, s.mem_used_mb - t.mem * s.mem_total_mb)


def _covers(vm: VMLoad, need: tuple[float, float]) -> bool:
    return vm.cpu >= need[0] - 1e-9 and vm.memory_mb >= need[1] - 1e-9


def _weight(vm: VMLoad, need: tuple[float, float]) -> float:
    """How much of what must leave this VM takes with it (more is better for fewer moves)."""
    parts = [min(vm.cpu / need[0], 1.0) if need[0] > 0 else 0.0,
             min(vm.memory_mb / need[1], 1.0) if need[1] > 0 else 0.0]
    return sum(parts)


def plan(servers: list[SrvLoad], vms: list[VMLoad], t: Thresholds = Thresholds(),
         *, max_moves: int | None = None) -> Plan:
    """The fewest live migrations (found greedily, best fit first) that bring every server under *t*.

    For each server over a threshold, most loaded first: if one VM alone
    takes enough away, the smallest such VM moves; otherwise the VM taking
    the most of what must go moves, and the server is looked at again. Each
    VM goes to the eligible server with the most headroom that stays under
    the thresholds with it. Inputs are copied, not changed.
    """
    by_id = {s.id: SrvLoad(**{**s.__dict__, "disks": dict(s.disks), "shared": dict(s.shared)}) for s in servers}
    before = {s.id: (s.cpu_frac(), s.mem_frac()) for s in by_id.values()}
    on: dict[int, list[VMLoad]] = {}
    for v in vms:
        if v.movable and v.server_id in by_id:
            on.setdefault(v.server_id, []).append(VMLoad(**v.__dict__))
    targets = _Targets(by_id, t)
    moves: list[Move] = []
    still_over = []
    hot = sorted((s for s in by_id.values() if s.up and _over(s, t)),
                 key=lambda s: max(s.cpu_frac() - t.cpu, s.mem_frac() - t.mem), reverse=True)
    for src in hot:
        pool = on.get(src.id, [])
        while _over(src, t):
            if max_moves is not None and len(moves) >= max_moves:
                break
            need = _need(src, t)
            covering = sorted((v for v in pool if _covers(v, need)), key=lambda v: (v.memory_mb, v.cpu, v.id))
            rest = sorted((v for v in pool if not _covers(v, need)), key=lambda v: (-_weight(v, need), v.id))
            chosen = None
            for v in covering + rest:
                found = targets.best(v)
                if found is not None:
                    chosen = (v, *found)
                    break
            if chosen is None:
                break
            vm, dst, disk_id = chosen
            _shift(vm, src, dst, disk_id)
            pool.remove(vm)
            targets.took(dst)
            moves.append(Move(vm.id, vm.name, src.id, dst.id, disk_id))
        if _over(src, t):
            still_over.append(src.id)
    after = {s.id: (s.cpu_frac(), s.mem_frac()) for s in by_id.values()}
    return Plan(moves, before, after, still_over)


def greedy_baseline(servers: list[SrvLoad], vms: list[VMLoad], t: Thresholds = Thresholds()) -> Plan:
    """The simple way, for comparison: move an over-threshold server's VMs in their order to the
    least loaded server they fit on until it is under (what a hand-written loop would do)."""
    by_id = {s.id: SrvLoad(**{**s.__dict__, "disks": dict(s.disks), "shared": dict(s.shared)}) for s in servers}
    before = {s.id: (s.cpu_frac(), s.mem_frac()) for s in by_id.values()}
    on: dict[int, list[VMLoad]] = {}
    for v in vms:
        if v.movable and v.server_id in by_id:
            on.setdefault(v.server_id, []).append(VMLoad(**v.__dict__))
    targets = _Targets(by_id, t)
    moves, still_over = [], []
    for src in [s for s in by_id.values() if s.up and _over(s, t)]:
        for vm in list(on.get(src.id, [])):
            if not _over(src, t):
                break
            found = targets.best(vm)
            if found is None:
                continue
            dst, disk_id = found
            _shift(vm, src, dst, disk_id)
            targets.took(dst)
            moves.append(Move(vm.id, vm.name, src.id, dst.id, disk_id))
        if _over(src, t):
            still_over.append(src.id)
    after = {s.id: (s.cpu_frac(), s.mem_frac()) for s in by_id.values()}
    return Plan(moves, before, after, still_over)


# --- from and to the database -----------------------------------------------------

def thresholds() -> Thresholds:
    cfg = current_app.config
    return Thresholds(cpu=float(cfg["REBALANCE_CPU_THRESHOLD"]), mem=float(cfg["REBALANCE_MEMORY_THRESHOLD"]))


def _cores(s: Server) -> int:
    return max(1, (s.cpus or 1) * (s.cores_per_cpu or 1))


def _recent_memory(window: timedelta, now: datetime) -> dict[int, float]:
    rows = db.session.execute(
        db.select(ServerSample.server_id, db.func.avg(ServerSample.mem_used_mb))
        .where(ServerSample.at >= now - window).group_by(ServerSample.server_id)).all()
    return {sid: float(avg) for sid, avg in rows}


def snapshot(now: datetime | None = None) -> tuple[list[SrvLoad], list[VMLoad], dict[int, Server]]:
    """Every server's recent load and every VM's share of it, from what the poll recorded."""
    now = now or utcnow()
    window = timedelta(seconds=int(current_app.config["REBALANCE_WINDOW_SECONDS"]))
    memory = _recent_memory(window, now)
    rows = db.session.execute(db.select(Server).options(selectinload(Server.disks)).order_by(Server.id)).scalars().all()
    busy = set(db.session.execute(db.select(Task.target_id).where(
        Task.target_type == "vm", Task.state.in_(ACTIVE_TASK_STATES))).scalars())
    vms = db.session.execute(db.select(VM).where(VM.server_id.is_not(None))
                             .options(selectinload(VM.vdisks), selectinload(VM.disk))).scalars().all()
    vcpus_running: dict[int, int] = {}
    committed: dict[int, int] = {}
    for v in vms:
        if v.state == VMState.RUNNING.value:
            vcpus_running[v.server_id] = vcpus_running.get(v.server_id, 0) + v.vcpus
            committed[v.server_id] = committed.get(v.server_id, 0) + v.memory_mb
    servers = []
    for s in rows:
        total = s.memory_mb or 0
        used = memory.get(s.id)
        if used is None:
            used = total - (s.free_memory_mb if s.free_memory_mb is not None else total)
        used = max(used, committed.get(s.id, 0))  # never less than its running VMs' memory
        servers.append(SrvLoad(
            id=s.id, name=s.hostname, cores=_cores(s), cpu_load=float(s.load1 or 0.0), mem_total_mb=total,
            mem_used_mb=int(used), disks={d.id: (d.free_gb if d.free_gb is not None else d.size_gb) for d in s.disks},
            shared={d.shared_group: d.id for d in s.disks if d.shared_group}, kvm=s.domain_type == "kvm",
            up=s.status == ServerStatus.UP.value))
    by_id = {s.id: s for s in rows}
    loads = []
    for v in vms:
        server = by_id[v.server_id]
        running = v.state == VMState.RUNNING.value
        share = (float(server.load1 or 0.0) * v.vcpus / vcpus_running[v.server_id]) if running else 0.0
        loads.append(VMLoad(id=v.id, name=v.name, server_id=v.server_id, memory_mb=v.memory_mb if running else 0,
                            cpu=share, disk_gb=v.disk_gb,
                            backup_server_id=v.backup_server_id if v.backup_mode != BackupMode.NONE.value else None,
                            shared_group=v.disk.shared_group if v.disk else None, kvm=server.domain_type == "kvm",
                            movable=running and v.id not in busy and v.disk is not None))
    return servers, loads, by_id


def propose(now: datetime | None = None, *, max_moves: int | None = None) -> tuple[Plan, dict[int, Server]]:
    servers, vms, rows = snapshot(now)
    return plan(servers, vms, thresholds(), max_moves=max_moves), rows


def failover_running() -> bool:
    """A LiveSync failover or fail-back (a task whose kind names one) is under way: automatic moves wait."""
    return db.session.execute(db.select(Task.id).where(
        db.or_(Task.kind.like("%failover%"), Task.kind.like("%failback%")), Task.state.in_(ACTIVE_TASK_STATES))
        .limit(1)).first() is not None


# --- applying ---------------------------------------------------------------------

def submit_moves(selected: list[tuple[int, int]], user_id: int | None) -> tuple[list, list[str]]:
    """Approved moves (VM id, target server id) as live-migration tasks, each checked again by
    the rules of :mod:`portal.moves` (flushes; the edge commits, then enqueues). Returns the
    submitted tasks and, in sentences, the moves that were refused."""
    from . import moves

    subs, refused = [], []
    options = moves.default_options()
    for vm_id, server_id in selected:
        vm = db.session.get(VM, vm_id)
        if vm is None:
            refused.append(f"VM {vm_id} no longer exists.")
            continue
        try:
            cand = moves.check_target(vm, moves.LIVE, server_id)
        except moves.MoveError as exc:
            refused.append(str(exc))
            continue
        sub = moves.submit(vm, cand, moves.LIVE, options, user_id)
        if sub.created:
            subs.append(sub)
        else:
            refused.append(f"{vm.name} is busy with task {sub.task.id}.")
    return subs, refused


def auto_step(now: datetime | None = None) -> list:
    """The automatic mode, run by the poll: when a server has stayed over a threshold for
    ``REBALANCE_AUTO_AFTER_SECONDS``, submit the planned moves off it, never more than
    ``REBALANCE_MAX_MOVES`` migrations running at once and none during a failover (flushes).
    Returns the submitted tasks for the poll to enqueue."""
    from . import actionlog, moves

    cfg = current_app.config
    if not cfg["REBALANCE_AUTO"]:
        return []
    now = now or utcnow()
    servers, vms, rows = snapshot(now)
    t = thresholds()
    for s in servers:
        row = rows[s.id]
        over = s.up and _over(s, t)
        if over and row.over_threshold_since is None:
            row.over_threshold_since = now
        elif not over and row.over_threshold_since is not None:
            row.over_threshold_since = None
    db.session.flush()
    if failover_running():
        return []
    room = int(cfg["REBALANCE_MAX_MOVES"]) - db.session.execute(
        db.select(db.func.count()).select_from(moves.running_moves_query().subquery())).scalar_one()
    after = timedelta(seconds=int(cfg["REBALANCE_AUTO_AFTER_SECONDS"]))
    due = {s.id for s in servers if rows[s.id].over_threshold_since is not None
           and rows[s.id].over_threshold_since <= now - after}
    if room <= 0 or not due:
        return []
    proposal = plan(servers, vms, t)
    chosen = [(m.vm_id, m.target_id) for m in proposal.moves if m.source_id in due][:room]
    subs, refused = submit_moves(chosen, None)
    for sub in subs:
        actionlog.record("rebalance-auto", target=db.session.get(VM, sub.task.target_id), user_id=None,
                         detail=sub.task.title)
    return subs

"""The periodic poll: health, facts, domains and graph samples of every server.

``poll_all`` probes every server that is not marked down, in parallel threads
(the probing touches no database), then records what it saw in one short
transaction: the check result the health view shows, free memory and disk,
the domains libvirt reports (VM states follow them), a graph sample; and the
server's status, which turns "down" only after a grace period of silence.

The probing and judging are :mod:`portal.vmm.health`'s, the same code the
``check_vmm_host`` plugin runs. Functions here flush; the poll job commits.
:func:`vm_state_for` is the one rule for what a libvirt domain state means
for a VM (the poll, the monitor and ``check_vm`` all ask it).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from flask import current_app
from sqlalchemy import delete

from . import actionlog, moves, servers, tasks, vms
from .extensions import db
from .models import VM, CheckResult, Server, ServerSample, ServerStatus, VMState, utcnow
from .vmm import health, migrate
from .vmm.domains import DomainState
from .vmm.errors import VmmError
from .vmm.session import Target

log = logging.getLogger(__name__)

# libvirt domain state -> Corral VM state
_VM_STATE = {
    DomainState.RUNNING: VMState.RUNNING, DomainState.BLOCKED: VMState.RUNNING,
    DomainState.SHUTDOWN: VMState.RUNNING,  # still running while it shuts down
    DomainState.PAUSED: VMState.PAUSED, DomainState.PMSUSPENDED: VMState.PAUSED,
    DomainState.SHUTOFF: VMState.OFF, DomainState.CRASHED: VMState.CRASHED,
    DomainState.SAVED: VMState.SAVED, DomainState.UNDEFINED: VMState.OFF,
}
# States the poll and the monitor never overwrite (a task owns the VM).
TASK_OWNED = {VMState.CREATING.value, VMState.PARTIAL.value, VMState.MIGRATING.value, VMState.DELETING.value}

# Corral setting for each health threshold (CORRAL_MEM_FREE_WARNING, ...); unset: health.DEFAULTS.
THRESHOLD_SETTINGS = {
    "mem_warning": "MEM_FREE_WARNING", "mem_critical": "MEM_FREE_CRITICAL",
    "disk_warning": "DISK_FREE_WARNING", "disk_critical": "DISK_FREE_CRITICAL",
    "load_warning": "LOAD_WARNING", "load_critical": "LOAD_CRITICAL",
}


def vm_state_for(domain: str | None, current: str | None = None) -> VMState:
    """What libvirt's domain state (None: not defined on the server) means for a VM now in *current*.

    libvirt's domain list shows a managed save as plain ``shutoff``, so a VM
    Corral saved stays saved while its domain is shut off or not listed; an
    ``undefined`` event takes the save image with it, so that VM is off.
    """
    if domain is None:
        return VMState.SAVED if current == VMState.SAVED.value else VMState.OFF
    try:
        new = _VM_STATE.get(DomainState(domain), VMState.UNKNOWN)
    except ValueError:
        return VMState.UNKNOWN
    if new is VMState.OFF and domain == DomainState.SHUTOFF and current == VMState.SAVED.value:
        return VMState.SAVED
    return new

# (age beyond which rows are merged, from resolution, to resolution)
COMPACTION = [(timedelta(hours=2), 0, 300), (timedelta(days=2), 300, 3600)]
KEEP = timedelta(days=8)


@dataclass
class PollOutcome:
    server_id: int
    state: str
    summary: str
    perfdata: str
    observed: health.Observed


def thresholds() -> health.Thresholds:
    """The health thresholds: the settings that are set, health's defaults for the rest."""
    cfg = current_app.config
    return health.Thresholds(**{name: float(cfg[key]) for name, key in THRESHOLD_SETTINGS.items()
                                if cfg.get(key) is not None})


def _probe(server_id: int, target: Target, mountpoints: list[str], t: health.Thresholds) -> PollOutcome:
    try:
        verdict, observed = health.check(target, mountpoints, t)
    except Exception as exc:  # one bad server must not stop the poll of the others
        log.exception("probing %s failed", target.hostname)
        observed = health.Observed(error=str(exc))
        verdict = health.Verdict(health.Status.UNKNOWN, f"probe failed: {exc}", [])
    return PollOutcome(server_id, verdict.status.text, verdict.summary, verdict.perfdata, observed)


def poll_all(*, max_workers: int | None = None) -> list[PollOutcome]:
    """Probe every server that is not marked down and record what was seen (flushed, not committed)."""
    rows = db.session.execute(
        db.select(Server).where(Server.status != ServerStatus.MARKED_DOWN.value).order_by(Server.id)
    ).scalars().all()
    work = [(s.id, servers.target_for(s), [d.mountpoint for d in s.disks]) for s in rows]
    db.session.rollback()  # no transaction open while we wait on servers
    t = thresholds()
    workers = max_workers or current_app.config["POLL_THREADS"]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(work) or 1))) as pool:
        outcomes = list(pool.map(lambda w: _probe(*w, t), work))
    record(outcomes)
    settle_moves(outcomes)
    return outcomes


def record(outcomes: list[PollOutcome], now: datetime | None = None) -> None:
    """Store what the probes saw; flushes, the caller commits."""
    now = now or utcnow()
    grace = timedelta(seconds=current_app.config["SERVER_DOWN_GRACE_SECONDS"])
    by_id = {s.id: s for s in db.session.execute(
        db.select(Server).where(Server.id.in_([o.server_id for o in outcomes]))).scalars()}
    existing = {(r.server_id, r.check): r for r in db.session.execute(
        db.select(CheckResult).where(CheckResult.server_id.in_(list(by_id)), CheckResult.check == "vmm_host")
    ).scalars()}
    samples = []
    away = {name for doms in _answered(outcomes).values() for name, state in doms.items() if _active(state)}
    for o in outcomes:
        server = by_id.get(o.server_id)
        if server is None or server.status == ServerStatus.MARKED_DOWN.value:
            continue  # deleted or marked down while we probed
        result = existing.get((server.id, "vmm_host"))
        if result is None:
            result = CheckResult(server_id=server.id, check="vmm_host")
            db.session.add(result)
        result.state, result.summary, result.perfdata, result.at = o.state, o.summary, o.perfdata, now
        seen = o.observed
        if seen.ssh_ok and seen.libvirt_ok and seen.facts is not None:
            server.status = ServerStatus.UP.value
            server.last_seen, server.last_error = now, None
            server.free_memory_mb = seen.facts.free_memory_mb
            if seen.facts.interfaces:
                server.interfaces_json = json.dumps(seen.facts.interfaces)
            server.load1 = seen.load.load1 if seen.load else None
            for disk in server.disks:
                if disk.mountpoint in seen.disks:
                    disk.free_gb = seen.disks[disk.mountpoint].free_gb
            servers.set_domains(server, seen.domains)
            apply_domain_states(server, seen.domains, active_somewhere=away)
            total_disk = sum(d.size_gb for d in server.disks)
            free_disk = sum(d.free_gb or 0 for d in server.disks)
            samples.append({"server_id": server.id, "at": now, "resolution": 0,
                             "mem_used_mb": seen.facts.memory_mb - seen.facts.free_memory_mb,
                             "mem_total_mb": seen.facts.memory_mb,
                             "disk_used_gb": total_disk - free_disk, "disk_total_gb": total_disk})
        else:
            server.last_error = seen.error or o.summary
            last = server.last_seen or server.created_at
            if now - last >= grace:
                server.status = ServerStatus.DOWN.value
    if samples:
        db.session.execute(db.insert(ServerSample), samples)
    db.session.flush()


def apply_domain_states(server: Server, domains: list[dict], *, active_somewhere: set[str] = frozenset()
                        ) -> list[VM]:
    """VMs whose primary server is ``server`` follow what libvirt reports.

    A VM that is not active here but active on a server named in *active_somewhere*
    is left for :func:`settle_moves` (it moved; it is not off)."""
    by_name = {d["name"]: d["state"] for d in domains}
    changed = []
    for vm in db.session.execute(db.select(VM).where(VM.server_id == server.id)).scalars():
        if vm.state in TASK_OWNED:
            continue
        if vm.name in active_somewhere and not _active(by_name.get(vm.name)):
            continue
        new = vm_state_for(by_name.get(vm.name), vm.state).value
        if new != vm.state:
            vm.state, vm.state_changed_at = new, utcnow()
            changed.append(vm)
    return changed


def _active(domain_state: str | None) -> bool:
    """Whether a domain in this libvirt state has a QEMU (runs, or is paused)."""
    return domain_state is not None and vm_state_for(domain_state) in (VMState.RUNNING, VMState.PAUSED)


def _answered(outcomes: list[PollOutcome]) -> dict[int, dict[str, str]]:
    """Server id -> {domain name: libvirt state} for the servers whose libvirt answered."""
    return {o.server_id: {d["name"]: d["state"] for d in o.observed.domains}
            for o in outcomes if o.observed.ssh_ok and o.observed.libvirt_ok and o.observed.facts is not None}


def settle_moves(outcomes: list[PollOutcome]) -> list[str]:
    """Put VMs where libvirt runs them, from what this poll saw on every server (flushes).

    * A VM that libvirt runs on another server than Corral records, and not on
      the recorded one (which answered), is re-homed to that server: its
      server, VM disk and disk paths follow the definition there.
    * A VM held as ``migrating`` whose move task is gone (its worker died:
      :func:`portal.tasks.reconcile`) is placed the same way and takes the state
      libvirt reports; what the move left on the other servers (a domain that
      does not run, the VM's folder) is removed, but only once the VM's home
      defines it (never the only copy).

    A VM active on two servers is left as it is and logged (``check_vm`` says so). Returns
    what was done, in sentences.
    """
    seen = _answered(outcomes)
    if not seen:
        return []
    active = defaultdict(list)
    for sid, doms in seen.items():
        for name, state in doms.items():
            if _active(state):
                active[name].append(sid)
    notes = []
    candidates = db.session.execute(db.select(VM).where(
        db.or_(VM.state == VMState.MIGRATING.value, VM.name.in_(list(active))))).scalars().all()
    # a server that did not answer may hold what an interrupted move left: such VMs settle when all have
    all_answered = any(vm.state == VMState.MIGRATING.value for vm in candidates) and _every_up_server_answered(seen)
    for vm in candidates:
        migrating = vm.state == VMState.MIGRATING.value
        if migrating:
            task = moves.active_task(vm)
            if task is not None and not tasks.reconcile(task):
                continue  # the move is under way
        elif vm.state in TASK_OWNED:
            continue
        if vm.server_id not in seen:
            continue  # its server was not asked this time: nothing is known
        where = active.get(vm.name, [])
        if not migrating and (not where or vm.server_id in where):
            continue
        if migrating and _abort_orphaned_jobs(vm, where):
            notes.append(f"{vm.name}: aborted the migration its dead task had started; placed at the next poll.")
            continue
        if len(where) > 1:
            log.error("%s is active on %d servers: %s", vm.name, len(where), where)
            continue
        home = where[0] if where else vm.server_id
        if home != vm.server_id:
            server = db.session.get(Server, home)
            try:
                with servers.session_for(server) as session:
                    paths = migrate.disk_paths(session, vm.name)
                old = vm.server.hostname
                moves.rehome(vm, server, paths, how="found running there by the poll")
            except (VmmError, moves.MoveError) as exc:
                log.warning("%s runs on %s, but re-homing it failed: %s", vm.name, server.hostname, exc)
                continue
            notes.append(f"{vm.name} runs on {server.hostname}, not {old}: recorded there.")
        if migrating and not all_answered:
            continue
        if migrating and vm.name in seen[home]:
            cleaned, complete = _remove_leftovers(vm, [sid for sid in seen if sid != home])
            notes += cleaned
            if not complete:
                continue  # held as migrating: the next poll removes the rest, then settles it
        new = vm_state_for(seen[home].get(vm.name), None if migrating else vm.state)
        if new.value != vm.state:
            vm.state, vm.state_changed_at = new.value, utcnow()
    db.session.flush()
    for note in notes:
        log.info(note)
    return notes


def _abort_orphaned_jobs(vm: VM, server_ids: list[int]) -> bool:
    """libvirt goes on with a migration whose client (the worker) died: abort it where the VM is
    active. True when there was such a job (the VM's place is known only once it ended)."""
    found = False
    for sid in server_ids:
        server = db.session.get(Server, sid)
        try:
            with servers.session_for(server) as session:
                found = migrate.abort_orphaned_job(session, vm.name) or found
        except VmmError as exc:
            log.warning("checking %s's jobs on %s failed: %s", vm.name, server.hostname, exc)
            found = True  # not known: try again at the next poll
    return found


def _every_up_server_answered(seen: dict) -> bool:
    up = db.session.execute(db.select(Server.id).where(Server.status == ServerStatus.UP.value)).scalars()
    return set(up) <= set(seen)


def _remove_leftovers(vm: VM, server_ids: list[int]) -> tuple[list[str], bool]:
    """What an interrupted move left of *vm* on these servers (not its home) goes. Returns notes, and
    whether nothing is left (False: a server failed or still runs the incoming domain)."""
    notes, complete = [], True
    for sid in server_ids:
        server = db.session.get(Server, sid)
        folders = [(vms.vm_dir(vm, d), d.mountpoint) for d in server.disks
                   if not (d.shared_group and vm.disk is not None and d.shared_group == vm.disk.shared_group)]
        try:
            with servers.session_for(server) as session:
                removed = migrate.remove_leftovers(session, vm.name, folders)
        except VmmError as exc:
            notes.append(f"Removing what the move of {vm.name} left on {server.hostname} failed: {exc}")
            complete = False
            continue
        if removed:
            detail = f"after an interrupted move, removed from {server.hostname}: {', '.join(removed)}"
            actionlog.record("vm-move-cleaned", target=vm, user_id=None, detail=detail)
            notes.append(f"{vm.name}: {detail}.")
    return notes, complete


def compact_samples(now: datetime | None = None) -> int:
    """Merge old samples into coarser averages; drop the oldest. Returns rows removed (flushed, not committed)."""
    now = now or utcnow()
    removed = db.session.execute(delete(ServerSample).where(ServerSample.at < now - KEEP)).rowcount or 0
    for age, src, dst in COMPACTION:
        cutoff = now - age
        rows = db.session.execute(
            db.select(ServerSample).where(ServerSample.resolution == src, ServerSample.at < cutoff)
        ).scalars().all()
        if not rows:
            continue
        buckets: dict[tuple[int, int], list[ServerSample]] = defaultdict(list)
        for r in rows:
            at = r.at if r.at.tzinfo else r.at.replace(tzinfo=timezone.utc)
            buckets[(r.server_id, int(at.timestamp()) // dst)].append(r)
        merged = []
        for (server_id, slot), group in buckets.items():
            n = len(group)
            merged.append({
                "server_id": server_id, "resolution": dst,
                "at": datetime.fromtimestamp(slot * dst, timezone.utc),
                "mem_used_mb": sum(r.mem_used_mb for r in group) // n,
                "mem_total_mb": max(r.mem_total_mb for r in group),
                "disk_used_gb": sum(r.disk_used_gb for r in group) // n,
                "disk_total_gb": max(r.disk_total_gb for r in group),
            })
        db.session.execute(delete(ServerSample).where(ServerSample.id.in_([r.id for r in rows])))
        db.session.execute(db.insert(ServerSample), merged)
        removed += len(rows) - len(merged)
    db.session.flush()
    return removed

"""The periodic poll: health, facts, domains and graph samples of every server.

``poll_all`` probes every server that is not marked down, in parallel threads
(the probing touches no database), then records what it saw in one short
transaction: the check result the health view shows, free memory and disk,
the domains libvirt reports (VM states follow them), a graph sample; and the
server's status, which turns "down" only after a grace period of silence.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from flask import current_app
from sqlalchemy import delete

from checks.check_vmm_host import Observed, Thresholds, run_check

from . import servers
from .extensions import db
from .models import VM, CheckResult, Server, ServerSample, ServerStatus, VMState, utcnow
from .vmm.session import Target

log = logging.getLogger(__name__)

# libvirt domain state -> Corral VM state
DOMAIN_TO_VM = {
    "running": VMState.RUNNING, "blocked": VMState.RUNNING, "paused": VMState.PAUSED,
    "shutdown": VMState.RUNNING, "shutoff": VMState.OFF, "crashed": VMState.CRASHED,
    "pmsuspended": VMState.PAUSED,
}
# States the poll and the monitor never overwrite (a task owns the VM).
TASK_OWNED = {VMState.CREATING.value, VMState.PARTIAL.value, VMState.MIGRATING.value, VMState.DELETING.value}

# (age beyond which rows are merged, from resolution, to resolution)
COMPACTION = [(timedelta(hours=2), 0, 300), (timedelta(days=2), 300, 3600)]
KEEP = timedelta(days=8)


@dataclass
class PollOutcome:
    server_id: int
    state: str
    summary: str
    perfdata: str
    observed: Observed


def thresholds() -> Thresholds:
    cfg = current_app.config
    return Thresholds(cfg["MEM_FREE_WARNING"], cfg["MEM_FREE_CRITICAL"], cfg["DISK_FREE_WARNING"],
                      cfg["DISK_FREE_CRITICAL"], cfg["LOAD_WARNING"], cfg["LOAD_CRITICAL"])


def _probe(server_id: int, target: Target, mountpoints: list[str], t: Thresholds) -> PollOutcome:
    try:
        state, summary, perfdata, observed = run_check(target, mountpoints, t)
    except Exception as exc:  # one bad server must not stop the poll of the others
        log.exception("probing %s failed", target.hostname)
        observed = Observed(error=str(exc))
        state, summary, perfdata = "unknown", f"probe failed: {exc}", ""
    return PollOutcome(server_id, state, summary, perfdata, observed)


def poll_all(*, max_workers: int | None = None) -> list[PollOutcome]:
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
    return outcomes


def record(outcomes: list[PollOutcome], now: datetime | None = None) -> None:
    now = now or utcnow()
    grace = timedelta(seconds=current_app.config["SERVER_DOWN_GRACE_SECONDS"])
    by_id = {s.id: s for s in db.session.execute(
        db.select(Server).where(Server.id.in_([o.server_id for o in outcomes]))).scalars()}
    existing = {(r.server_id, r.check): r for r in db.session.execute(
        db.select(CheckResult).where(CheckResult.server_id.in_(list(by_id)), CheckResult.check == "vmm_host")
    ).scalars()}
    samples = []
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
            server.load1 = seen.load.load1 if seen.load else None
            for disk in server.disks:
                if disk.mountpoint in seen.disks:
                    disk.free_gb = seen.disks[disk.mountpoint].free_gb
            servers.set_domains(server, seen.domains)
            apply_domain_states(server, seen.domains)
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
    db.session.commit()


def apply_domain_states(server: Server, domains: list[dict]) -> list[VM]:
    """VMs whose primary server is ``server`` follow what libvirt reports."""
    by_name = {d["name"]: d["state"] for d in domains}
    changed = []
    for vm in db.session.execute(db.select(VM).where(VM.server_id == server.id)).scalars():
        if vm.state in TASK_OWNED:
            continue
        new = DOMAIN_TO_VM.get(by_name[vm.name], VMState.UNKNOWN).value if vm.name in by_name else \
            (VMState.SAVED.value if vm.state == VMState.SAVED.value else VMState.OFF.value)
        if new != vm.state:
            vm.state, vm.state_changed_at = new, utcnow()
            changed.append(vm)
    return changed


def compact_samples(now: datetime | None = None) -> int:
    """Merge old samples into coarser averages; drop the oldest. Returns rows removed."""
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
    db.session.commit()
    return removed

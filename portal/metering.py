"""Metering: each VM's state history and its usage per hour.

The history is one place: a session hook (:func:`record_changes`, after every
flush) looks at the VMs the flush touched, directly or through their disks,
LiveSync row or backups, and when what a VM is charged for changed (state,
vCPUs, memory, disk size, owner, LiveSync protection, backup storage) it
closes the VM's open :class:`VMStateInterval` and opens a new one. Whoever
changes a VM (the poll, the monitor, a job, a view) needs to do nothing.

:func:`aggregate` (run by the periodic poll) turns the history of every hour
that has ended into :class:`UsageRecord` rows, one per VM, hour and owner.
Both tables keep names and ids without foreign keys: they outlive the VM and
say who owned it at the time.

Time comes from :func:`now`, which tests replace with :func:`use_clock`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

from sqlalchemy import event, func, insert, select, update
from sqlalchemy.orm import Session

from .extensions import db
from .models import (
    VM,
    Backup,
    BackupState,
    LiveSync,
    LiveSyncState,
    MeteringCursor,
    UsageRecord,
    User,
    VirtualDisk,
    VMState,
    VMStateInterval,
    utcnow,
)

HOUR = timedelta(hours=1)
RUNNING_STATES = {VMState.RUNNING.value, VMState.PAUSED.value}
# A VM that is being created is not there yet; in every other state its disks exist.
UNDEFINED_STATES = {VMState.CREATING.value}
# Charged columns of an interval: a change in any of them starts a new one.
KEY = ("vm_name", "owner_id", "owner_name", "appliance_id", "state", "running", "vcpus", "memory_mb", "disk_gb",
       "livesync", "backup_bytes")

_clock: Callable[[], datetime] | None = None


def now() -> datetime:
    """The metering clock: whole seconds, UTC."""
    t = _clock() if _clock is not None else utcnow()
    return t.replace(microsecond=0)


@contextlib.contextmanager
def use_clock(clock: Callable[[], datetime]) -> Iterator[None]:
    """Let *clock* tell the time for metering (tests step it instead of sleeping)."""
    global _clock
    old, _clock = _clock, clock
    try:
        yield
    finally:
        _clock = old


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


# --- the state history ------------------------------------------------------

def _touched_vm_ids(session: Session) -> set[int]:
    ids: set[int] = set()
    for obj in [*session.new, *session.dirty, *session.deleted]:
        if isinstance(obj, VM):
            vm_id = obj.id
        elif isinstance(obj, (VirtualDisk, LiveSync, Backup)):
            vm_id = obj.vm_id
        else:
            continue
        if vm_id is not None:
            ids.add(vm_id)
    return ids


def _snapshots(conn, vm_ids: set[int]) -> dict[int, dict]:
    disk = (select(func.coalesce(func.sum(VirtualDisk.size_gb), 0)).where(VirtualDisk.vm_id == VM.id)
            .scalar_subquery())
    synced = (select(func.count()).where(LiveSync.vm_id == VM.id, LiveSync.state == LiveSyncState.IN_SYNC.value)
              .scalar_subquery())
    backups = (select(func.coalesce(func.sum(Backup.size_bytes), 0))
               .where(Backup.vm_id == VM.id, Backup.state == BackupState.READY.value).scalar_subquery())
    rows = conn.execute(
        select(VM.id, VM.name, VM.owner_id, User.username, VM.appliance_id, VM.state, VM.vcpus, VM.memory_mb,
               disk, synced, backups).join(User, User.id == VM.owner_id).where(VM.id.in_(vm_ids))
    ).all()
    return {r[0]: {"vm_name": r[1], "owner_id": r[2], "owner_name": r[3], "appliance_id": r[4], "state": r[5],
                   "running": r[5] in RUNNING_STATES, "vcpus": r[6], "memory_mb": r[7], "disk_gb": int(r[8]),
                   "livesync": bool(r[9]), "backup_bytes": int(r[10])} for r in rows}


CHUNK = 500  # VM ids per statement (bound parameters are limited)


def _sync_intervals(conn, vm_ids: set[int], at: datetime) -> None:
    """Close and open intervals so that each VM's open one matches what it is now (core SQL only)."""
    ids = sorted(vm_ids)
    for i in range(0, len(ids), CHUNK):
        _sync_chunk(conn, set(ids[i:i + CHUNK]), at)


def _sync_chunk(conn, vm_ids: set[int], at: datetime) -> None:
    current = _snapshots(conn, vm_ids)
    open_rows = {r.vm_id: r for r in conn.execute(
        select(VMStateInterval).where(VMStateInterval.vm_id.in_(vm_ids), VMStateInterval.ended_at.is_(None)))}
    new_rows = []
    for vm_id in vm_ids:
        snap, open_row = current.get(vm_id), open_rows.get(vm_id)
        if snap is not None and snap["state"] == VMState.MIGRATING.value:
            # A move keeps the VM as it was: a live migration runs it, a cold move does not.
            snap["running"] = bool(open_row.running) if open_row is not None else False
        if open_row is not None and snap is not None and all(getattr(open_row, k) == snap[k] for k in KEY):
            continue
        if open_row is not None and snap is not None and _aware(open_row.started_at) >= at:
            # Changed again within the same second (a row and then its disks): one interval.
            conn.execute(update(VMStateInterval).where(VMStateInterval.id == open_row.id).values(**snap))
            continue
        if open_row is not None:
            conn.execute(update(VMStateInterval).where(VMStateInterval.id == open_row.id).values(ended_at=at))
        if snap is not None:
            new_rows.append({"vm_id": vm_id, "started_at": at, "ended_at": None, **snap})
    if new_rows:
        conn.execute(insert(VMStateInterval), new_rows)


def record_changes(session: Session, _flush_context) -> None:
    """After a flush: bring the state history of the VMs it touched up to date (same transaction)."""
    vm_ids = _touched_vm_ids(session)
    if vm_ids:
        _sync_intervals(session.connection(), vm_ids, now())


def init_app(app) -> None:
    if not event.contains(Session, "after_flush", record_changes):
        event.listen(Session, "after_flush", record_changes)


def open_missing(at: datetime | None = None) -> int:
    """Open an interval for every VM that has none (VMs older than metering). Returns how many."""
    has_open = select(VMStateInterval.vm_id).where(VMStateInterval.ended_at.is_(None))
    ids = set(db.session.execute(select(VM.id).where(VM.id.not_in(has_open))).scalars())
    _sync_intervals(db.session.connection(), ids, at or now())
    return len(ids)


def history(vm_id: int) -> list[VMStateInterval]:
    return list(db.session.execute(select(VMStateInterval).where(VMStateInterval.vm_id == vm_id)
                                   .order_by(VMStateInterval.started_at, VMStateInterval.id)).scalars())


# --- hourly usage -------------------------------------------------------------

USAGE_FIELDS = ("defined_seconds", "running_seconds", "vcpu_seconds", "memory_mb_seconds", "disk_gb_seconds",
                "livesync_seconds", "backup_byte_seconds")


def _add(acc: dict, iv: VMStateInterval, seconds: int) -> None:
    if iv.state in UNDEFINED_STATES or seconds <= 0:
        return
    acc["defined_seconds"] += seconds
    acc["disk_gb_seconds"] += iv.disk_gb * seconds
    acc["backup_byte_seconds"] += iv.backup_bytes * seconds
    if iv.livesync:
        acc["livesync_seconds"] += seconds
    if iv.running:
        acc["running_seconds"] += seconds
        acc["vcpu_seconds"] += iv.vcpus * seconds
        acc["memory_mb_seconds"] += iv.memory_mb * seconds


def aggregate(until: datetime | None = None) -> int:
    """Turn every whole hour before *until* (default: now) not yet metered into usage records (flushes).

    Returns how many records were written. Hours are metered once: a cursor
    remembers where the last run stopped.
    """
    until = floor_hour(until or now())
    open_missing()
    cursor = db.session.get(MeteringCursor, 1)
    if cursor is None:
        first = db.session.execute(select(func.min(VMStateInterval.started_at))).scalar()
        if first is None:
            return 0
        cursor = MeteringCursor(id=1, until=floor_hour(_aware(first)))
        db.session.add(cursor)
    since = cursor.until
    if since >= until:
        return 0
    intervals = db.session.execute(select(VMStateInterval).where(
        VMStateInterval.started_at < until,
        db.or_(VMStateInterval.ended_at.is_(None), VMStateInterval.ended_at > since))
        .order_by(VMStateInterval.started_at, VMStateInterval.id)).scalars()
    records: dict[tuple, dict] = {}
    for iv in intervals:
        start, end = max(iv.started_at, since), min(iv.ended_at or until, until)
        hour = floor_hour(start)
        while hour < end:
            seconds = int((min(end, hour + HOUR) - max(start, hour)).total_seconds())
            key = (hour, iv.vm_id, iv.owner_id, iv.appliance_id)
            acc = records.get(key)
            if acc is None:
                acc = records[key] = defaultdict(int)
            acc["vm_name"], acc["owner_name"] = iv.vm_name, iv.owner_name
            _add(acc, iv, seconds)
            hour += HOUR
    rows = [{"hour": k[0], "vm_id": k[1], "owner_id": k[2], "appliance_id": k[3], "vm_name": acc["vm_name"],
             "owner_name": acc["owner_name"], **{f: acc[f] for f in USAGE_FIELDS}}
            for k, acc in records.items() if acc["defined_seconds"]]
    if rows:
        db.session.execute(insert(UsageRecord), rows)
    cursor.until = until
    db.session.flush()
    return len(rows)


def usage(start: datetime, end: datetime, owner_id: int | None = None) -> list[UsageRecord]:
    """Usage records of the hours in [start, end), of one owner or everyone."""
    stmt = select(UsageRecord).where(UsageRecord.hour >= start, UsageRecord.hour < end)
    if owner_id is not None:
        stmt = stmt.where(UsageRecord.owner_id == owner_id)
    return list(db.session.execute(stmt.order_by(UsageRecord.hour, UsageRecord.vm_name)).scalars())

"""Backups of VMs: who may do what, when a backup or restore makes sense, and the records.

Each function either answers a question or changes rows and flushes; the edge
(view or job) commits. Host work is in :mod:`portal.vmm.backup`.

Where backups live (:func:`store_for`): in ``corral-backups/<vm name>/`` on a
server disk, the store. It is the VM's LiveSync backup server's disk when it
has one, else the manager-configured ``BACKUP_STORE`` (``host:/mountpoint``),
else the VM's own disk; a store whose server is not up is passed over for the
VM's own disk. Push-mode backups are written by the VM's own QEMU, so a backup
for another server is written beside the VM first and then copied over,
verified, by the job.
"""

from __future__ import annotations

import posixpath
from datetime import datetime, timedelta

from .extensions import db
from .models import (VM, Backup, BackupFile, BackupKind, BackupPeriod, BackupSchedule, BackupState, Role, Server,
                     ServerDisk, ServerStatus, User, VMState, utcnow)
from .permissions import can_see_vm, is_manager
from .vmm.backup import BackupOutcome, SourceDisk, store_dir

#: VM states in which "Back up now" works: live (running, paused) or a copy while off
BACKUP_STATES = (VMState.RUNNING.value, VMState.PAUSED.value, VMState.OFF.value)


class BackupRefused(Exception):
    """A backup, restore or delete that cannot happen now; the message says why."""


# --- who ---------------------------------------------------------------------------

def can_back_up(user: User, vm: VM) -> bool:
    """Everyone who may see the VM: its owner, whatever their role, and managers."""
    return not user.disabled and can_see_vm(user, vm)


def can_restore(user: User, vm: VM) -> bool:
    """Managers, and power users for their own VMs (a restore throws away the current disks)."""
    return is_manager(user) or (user.role == Role.POWER.value and not user.disabled and vm.owner_id == user.id)


def can_delete_backup(user: User, vm: VM) -> bool:
    """Managers, and the VM's owner if a power user (the issue's rule)."""
    return can_restore(user, vm)


def can_schedule(user: User, vm: VM) -> bool:
    """A schedule commits disk space for good: managers, and power users for their own VMs."""
    return can_restore(user, vm)


# --- when --------------------------------------------------------------------------

def check_backup(vm: VM) -> None:
    if vm.state not in BACKUP_STATES:
        raise BackupRefused(f"{vm.name} is {vm.state_enum.label}; a backup is taken while it runs or is off.")
    if vm.server is None or vm.disk is None:
        raise BackupRefused(f"{vm.name} has no server disk to keep backups on.")
    configured_store()  # a broken BACKUP_STORE setting is refused here, before any work


def configured_store() -> ServerDisk | None:
    """The manager-configured store (``BACKUP_STORE``, ``host:/mountpoint``), or None when not set.

    A setting that names no registered server disk is refused with a message rather than ignored.
    """
    from flask import current_app

    spec = (current_app.config.get("BACKUP_STORE") or "").strip()
    if not spec:
        return None
    host, _, mountpoint = spec.partition(":")
    mountpoint = mountpoint.rstrip("/") or "/"
    disk = db.session.execute(
        db.select(ServerDisk).join(Server, ServerDisk.server_id == Server.id)
        .where(Server.hostname == host, ServerDisk.mountpoint == mountpoint)).scalar_one_or_none()
    if disk is None:
        raise BackupRefused(f"The backup store {spec!r} (setting BACKUP_STORE) is not a VM disk of a registered "
                            f"server; fix the setting or register that disk.")
    return disk


def store_for(vm: VM) -> ServerDisk:
    """Where the VM's next backup goes (see the module's docstring)."""
    preferred = [vm.backup_disk if vm.backup_server_id and vm.backup_disk is not None else None, configured_store()]
    for disk in preferred:
        if disk is not None and disk.server.status == ServerStatus.UP.value:
            return disk
    return vm.disk


def check_restore(vm: VM, backup: Backup) -> None:
    if backup.vm_id != vm.id:
        raise BackupRefused("That backup belongs to another VM.")
    if backup.state != BackupState.READY.value:
        raise BackupRefused(f"Backup {backup.id} is {backup.state}; only a finished backup can be restored.")
    if vm.server is None or vm.disk is None:
        raise BackupRefused(f"{vm.name} has no server; it cannot be restored.")
    if backup.server.status != ServerStatus.UP.value and backup.server_id != vm.server_id:
        raise BackupRefused(f"Backup {backup.id} is on {backup.server.hostname}, which is "
                            f"{backup.server.status}; restore when it is up.")
    if vm.state != VMState.OFF.value:
        raise BackupRefused(f"Power {vm.name} off before restoring it (it is {vm.state_enum.label}).")
    if len(backup.files) != len(vm.vdisks):
        raise BackupRefused(f"Backup {backup.id} has {len(backup.files)} disks and {vm.name} has "
                            f"{len(vm.vdisks)}; it cannot be restored onto the VM as it is now.")


def check_copy(backup: Backup) -> None:
    if backup.state != BackupState.READY.value:
        raise BackupRefused(f"Backup {backup.id} is {backup.state}; only a finished backup can be copied.")


def get_backup_or_404(vm: VM, backup_id: int) -> Backup:
    from flask import abort

    backup = db.session.get(Backup, backup_id)
    if backup is None or backup.vm_id != vm.id:
        abort(404)
    return backup


# --- the records -------------------------------------------------------------------

def list_for(vm: VM) -> list[Backup]:
    return list(db.session.execute(
        db.select(Backup).where(Backup.vm_id == vm.id).order_by(Backup.created_at.desc(), Backup.id.desc())
    ).scalars())


def incremental_parent(vm: VM, disks: list[SourceDisk], checkpoints: list[str], store: ServerDisk) -> Backup | None:
    """The backup the next one can build on, or None for a full backup.

    Incremental needs every disk in qcow2 v3, the newest ready live backup
    in the same store carrying the checkpoint libvirt still has, and disks of
    the same number and sizes as then (a grown disk starts over).
    """
    if not disks or not all(d.qcow2_v3 for d in disks):
        return None
    last = db.session.execute(
        db.select(Backup).where(Backup.vm_id == vm.id, Backup.state == BackupState.READY.value,
                                Backup.live.is_(True), Backup.checkpoint.is_not(None))
        .order_by(Backup.created_at.desc(), Backup.id.desc()).limit(1)).scalar_one_or_none()
    if last is None or last.checkpoint not in checkpoints or last.disk_id != store.id:
        return None
    if [(f.target, f.virtual_size_bytes) for f in last.files] != [(d.target, d.virtual_size) for d in disks]:
        return None
    return last


def start(vm: VM, store: ServerDisk, *, task_id: int | None, live: bool, parent: Backup | None,
          scheduled: bool = False) -> Backup:
    """Record a backup being made in ``store`` (flushes); its folder is named after its id and time."""
    backup = Backup(vm_id=vm.id, server_id=store.server_id, disk_id=store.id, path="", live=live, scheduled=scheduled,
                    kind=(BackupKind.INCREMENTAL if parent else BackupKind.FULL).value,
                    parent_id=parent.id if parent else None, task_id=task_id, state=BackupState.CREATING.value)
    db.session.add(backup)
    db.session.flush()
    backup.path = posixpath.join(store_dir(store.mountpoint, vm.name),
                                 f"{backup.created_at:%Y%m%dT%H%M%S}-{backup.id}")
    db.session.flush()
    return backup


def staging_dir(vm: VM, backup: Backup) -> str:
    """Where a backup for another server is written on the VM's own disk before it is copied over."""
    return posixpath.join(store_dir(vm.disk.mountpoint, vm.name), f".staging-{backup.id}")


def finish(backup: Backup, outcome: BackupOutcome, positions: dict[str, int]) -> None:
    """Record what the backup wrote (flushes). ``positions``: guest device -> the VM disk's position."""
    backup.checkpoint = outcome.checkpoint
    backup.size_bytes = outcome.size_bytes
    for f in outcome.files:
        backup.files.append(BackupFile(position=positions[f.target], target=f.target, path=f.path,
                                       virtual_size_bytes=f.virtual_size, size_bytes=f.size_bytes, sha256=f.sha256))
    backup.state = BackupState.READY.value
    backup.finished_at = utcnow()
    db.session.flush()


def chain(backup: Backup) -> list[Backup]:
    """The backup and the ones it builds on, newest first (a restore needs all their files)."""
    out = [backup]
    while out[-1].parent is not None:
        out.append(out[-1].parent)
    return out


def dependents(backup: Backup) -> list[Backup]:
    """The backup and every backup built on it (deleting it deletes them), oldest first."""
    out, frontier = [backup], [backup.id]
    while frontier:
        children = db.session.execute(db.select(Backup).where(Backup.parent_id.in_(frontier))).scalars().all()
        out += children
        frontier = [c.id for c in children]
    return out


def describe(backup: Backup) -> str:
    how = "live" if backup.live else "copy while off"
    return f"{backup.kind} backup {backup.id} of {backup.vm.name} ({how}, {backup.created_at:%Y-%m-%d %H:%M:%S} UTC)"


# --- schedules ---------------------------------------------------------------------

MAX_KEEP = 100


def next_run(period: str, hour: int, weekday: int, after: datetime) -> datetime:
    """The first time strictly after ``after`` (UTC) at ``hour``:00, on ``weekday`` for weekly schedules."""
    at = after.replace(hour=hour, minute=0, second=0, microsecond=0)
    while at <= after or (period == BackupPeriod.WEEKLY.value and at.weekday() != weekday):
        at += timedelta(days=1)
    return at


def schedule_for(vm: VM) -> BackupSchedule | None:
    return db.session.get(BackupSchedule, vm.id)


def set_schedule(vm: VM, *, period: str, hour: int, weekday: int, keep: int) -> BackupSchedule:
    """Create or change the VM's schedule (flushes); bad values raise :class:`BackupRefused` and change nothing."""
    if period not in {p.value for p in BackupPeriod}:
        raise BackupRefused("Choose daily or weekly backups.")
    if not 0 <= hour <= 23:
        raise BackupRefused("The hour is between 0 and 23 (UTC).")
    if not 0 <= weekday <= 6:
        raise BackupRefused("Choose a day of the week.")
    if not 1 <= keep <= MAX_KEEP:
        raise BackupRefused(f"Keep between 1 and {MAX_KEEP} scheduled backups.")
    schedule = schedule_for(vm) or BackupSchedule(vm_id=vm.id)
    schedule.period, schedule.hour, schedule.weekday, schedule.keep = period, hour, weekday, keep
    schedule.next_run_at = next_run(period, hour, weekday, utcnow())
    schedule.last_note = None
    db.session.add(schedule)
    db.session.flush()
    return schedule


def clear_schedule(vm: VM) -> bool:
    schedule = schedule_for(vm)
    if schedule is not None:
        db.session.delete(schedule)
        db.session.flush()
    return schedule is not None


def due_schedules(now: datetime) -> list[BackupSchedule]:
    return list(db.session.execute(
        db.select(BackupSchedule).where(BackupSchedule.next_run_at <= now).order_by(BackupSchedule.next_run_at)
    ).scalars())


def submit_due(now: datetime | None = None) -> list:
    """Record a backup task for every schedule that is due (flushes) and return the submissions to enqueue.

    Each due schedule moves on to its next time whatever happens; a VM that
    cannot be backed up now (busy, or in a state without backups) is noted on
    the schedule instead, and its next run is the next slot.
    """
    from . import tasks
    from .jobs.backups import back_up_vm

    now = now or utcnow()
    subs = []
    for schedule in due_schedules(now):
        vm = schedule.vm
        schedule.next_run_at = next_run(schedule.period, schedule.hour, schedule.weekday, now)
        try:
            check_backup(vm)
        except BackupRefused as exc:
            schedule.last_note = f"{now:%Y-%m-%d %H:%M} UTC: skipped. {exc}"
            continue
        sub = tasks.submit("vm-backup", back_up_vm, title=f"Scheduled backup of {vm.name}", requester_id=None,
                           target=vm, key=f"vm:{vm.id}", args=(vm.id,), kwargs={"scheduled": True})
        if sub.created:
            schedule.last_task_id, schedule.last_note = sub.task.id, None
            subs.append(sub)
        else:
            schedule.last_note = (f"{now:%Y-%m-%d %H:%M} UTC: skipped, {vm.name} was busy with "
                                  f"task {sub.task.id} ({sub.task.title}).")
    db.session.flush()
    return subs


def chain_too_long(parent: Backup | None, keep: int) -> bool:
    """A scheduled backup starts a new full chain once the current one holds ``keep`` backups, so that
    pruning (which deletes whole chains) can keep storage bounded."""
    return parent is not None and len(chain(parent)) >= keep


def prunable(vm: VM, keep: int) -> list[Backup]:
    """Scheduled backups beyond the newest ``keep`` that can go, oldest first.

    A backup goes only with everything built on it, so one that a kept or a
    manual backup builds on stays until those are gone.
    """
    scheduled = list(db.session.execute(
        db.select(Backup).where(Backup.vm_id == vm.id, Backup.scheduled.is_(True),
                                Backup.state == BackupState.READY.value)
        .order_by(Backup.created_at.desc(), Backup.id.desc())).scalars())
    kept = {b.id for b in scheduled[:keep]}
    doomed: list[Backup] = []
    for backup in reversed(scheduled[keep:]):
        if backup in doomed:
            continue
        family = dependents(backup)
        if all(b.scheduled and b.state == BackupState.READY.value and b.id not in kept for b in family):
            doomed += [b for b in family if b not in doomed]
    return doomed

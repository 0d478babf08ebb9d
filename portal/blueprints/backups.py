"""Backups area: a VM's backups, "Back up now", restore and delete."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import actionlog, backups, library, permissions
from ..extensions import db
from ..models import ACTIVE_TASK_STATES, BackupPeriod, Task
from .vms import _vm_task as vm_task

bp = Blueprint("backups", __name__, url_prefix="/vms/<int:vm_id>/backups")


def _launch(vm, kind: str, func, title: str, *args):
    """Backups take the VM's one task slot (the VM page's rule): the task's page, or back here when busy."""
    sub_task = vm_task(vm, kind, func, title, *args)
    return redirect(url_for("tasks.detail", task_id=sub_task.id) if sub_task and sub_task.state == "queued"
                    else url_for("backups.index", vm_id=vm.id))


def _load(vm_id: int, backup_id: int, allowed) -> tuple:
    """The VM (404 unless visible), the permission check (403), then its backup (404)."""
    vm = permissions.get_vm_or_404(vm_id)
    if not allowed(current_user, vm):
        abort(403)
    return vm, backups.get_backup_or_404(vm, backup_id)


@bp.route("/")
@login_required
def index(vm_id: int):
    vm = permissions.get_vm_or_404(vm_id)
    active = db.session.execute(db.select(Task).where(Task.target_type == "vm", Task.target_id == vm.id,
                                                      Task.state.in_(ACTIVE_TASK_STATES))).scalars().first()
    try:
        store, store_problem = (backups.store_for(vm) if vm.disk is not None else None), None
    except backups.BackupRefused as exc:
        store, store_problem = None, str(exc)
    return render_template("backups/index.html", vm=vm, backups=backups.list_for(vm), active=active,
                           store=store, store_problem=store_problem,
                           can_back_up=backups.can_back_up(current_user, vm),
                           can_restore=backups.can_restore(current_user, vm),
                           can_delete=backups.can_delete_backup(current_user, vm),
                           can_schedule=backups.can_schedule(current_user, vm),
                           can_copy=permissions.can_manage(current_user), schedule=backups.schedule_for(vm),
                           periods=[p.value for p in BackupPeriod],
                           weekdays=["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])


@bp.post("/new")
@login_required
def create(vm_id: int):
    from ..jobs.backups import back_up_vm

    vm = permissions.get_vm_or_404(vm_id)
    if not backups.can_back_up(current_user, vm):
        abort(403)
    try:
        backups.check_backup(vm)
    except backups.BackupRefused as exc:
        flash(str(exc), "error")
        return redirect(url_for("backups.index", vm_id=vm.id))
    return _launch(vm, "vm-backup", back_up_vm, f"Back up {vm.name}")


@bp.post("/<int:backup_id>/restore")
@login_required
def restore(vm_id: int, backup_id: int):
    from ..jobs.backups import restore_vm

    vm, backup = _load(vm_id, backup_id, backups.can_restore)
    try:
        backups.check_restore(vm, backup)
    except backups.BackupRefused as exc:
        flash(str(exc), "error")
        return redirect(url_for("backups.index", vm_id=vm.id))
    return _launch(vm, "vm-restore", restore_vm, f"Restore {vm.name} from backup {backup.id}", backup.id)


@bp.post("/<int:backup_id>/delete")
@login_required
def delete(vm_id: int, backup_id: int):
    from ..jobs.backups import delete_backup

    vm, backup = _load(vm_id, backup_id, backups.can_delete_backup)
    return _launch(vm, "vm-backup-delete", delete_backup, f"Delete backup {backup.id} of {vm.name}", backup.id)


@bp.post("/<int:backup_id>/copy-to-library")
@login_required
def copy_to_library(vm_id: int, backup_id: int):
    """Managers turn a backup into a new appliance (like copying a VM back, but from the backup's disks)."""
    from ..jobs.library import copy_backup

    vm, backup = _load(vm_id, backup_id, lambda user, _vm: permissions.can_manage(user))
    try:
        name = library.check_new_name((request.form.get("name") or "").strip())
        backups.check_copy(backup)
    except (library.LibraryError, backups.BackupRefused) as exc:
        flash(str(exc), "error")
        return redirect(url_for("backups.index", vm_id=vm.id))
    return _launch(vm, "vm-backup-copy", copy_backup, f"Copy backup {backup.id} of {vm.name} to the library as {name}",
                   backup.id, name, current_user.id)


def _int(field: str, default: int) -> int:
    try:
        return int(request.form.get(field, default))
    except (TypeError, ValueError):
        raise backups.BackupRefused(f"{field.capitalize()} must be a whole number.") from None


@bp.post("/schedule")
@login_required
def schedule(vm_id: int):
    vm = permissions.get_vm_or_404(vm_id)
    if not backups.can_schedule(current_user, vm):
        abort(403)
    try:
        if request.form.get("remove"):
            if backups.clear_schedule(vm):
                actionlog.record("vm-backup-schedule", target=vm, detail="schedule removed")
            flash(f"{vm.name} has no backup schedule now.", "info")
        else:
            sched = backups.set_schedule(vm, period=request.form.get("period", ""), hour=_int("hour", 2),
                                         weekday=_int("weekday", 6), keep=_int("keep", 7))
            actionlog.record("vm-backup-schedule", target=vm,
                             detail=f"{sched.period} at {sched.hour:02d}:00 UTC, keep {sched.keep}")
            flash(f"Next scheduled backup of {vm.name}: {sched.next_run_at:%Y-%m-%d %H:%M} UTC.", "info")
    except backups.BackupRefused as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("backups.index", vm_id=vm.id))
    db.session.commit()
    return redirect(url_for("backups.index", vm_id=vm.id))

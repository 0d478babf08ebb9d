"""LiveSync on a VM's page: protection settings, fail back, make the backup the new primary."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, request, url_for
from flask_login import current_user, login_required

from .. import actionlog, livesync, permissions, tasks
from ..extensions import db
from ..models import VM, VMState
from ..views_common import launch

bp = Blueprint("livesync", __name__, url_prefix="/vms")


@bp.app_template_global("livesync_view")
def livesync_view(vm: VM) -> livesync.View:
    return livesync.view(vm)


@bp.app_template_global("operator_failover_refusal")
def operator_failover_refusal(vm: VM) -> str | None:
    from .. import ha

    return ha.operator_refusal(vm)


@bp.app_template_global("livesync_modes")
def livesync_modes() -> dict[str, str]:
    return livesync.MODE_LABELS


@bp.app_template_global("backup_candidates")
def backup_candidates(primary_id: int | None) -> list[livesync.Candidate]:
    return livesync.backup_candidates(primary_id)


def _vm_for_change(vm_id: int) -> VM:
    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_change_settings(current_user, vm):
        abort(403)
    return vm


def _busy(vm: VM, sub) -> str:
    return f"{vm.name} is busy with task {sub.task.id} ({sub.task.title}); try again when it ends."


@bp.post("/<int:vm_id>/protection")
@login_required
def protection(vm_id: int):
    from ..jobs.livesync import protect_vm

    vm = _vm_for_change(vm_id)
    old_server, old_disk = vm.backup_server_id, vm.backup_disk_id
    raw = request.form.get("backup_server", "")
    try:
        changed = livesync.set_protection(vm, request.form.get("backup_mode", ""), int(raw) if raw.isdigit() else None)
    except livesync.LiveSyncError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    actionlog.record("vm-protection-changed", target=vm,
                     detail=f"{vm.backup_mode} on {vm.backup_server.hostname if vm.backup_server else 'none'}")
    if not changed:
        db.session.commit()
        flash(f"{vm.name}'s backup mode is now: {livesync.MODE_LABELS[vm.backup_mode]}.", "info")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    sub = tasks.submit("livesync-protect", protect_vm, title=f"LiveSync protection of {vm.name}",
                       requester_id=current_user.id, target=vm, key=f"livesync:{vm.id}",
                       args=(vm.id, old_server, old_disk))
    task = launch(sub, busy=_busy(vm, sub))
    return redirect(url_for("tasks.detail", task_id=task.id) if task else url_for("vms.detail", vm_id=vm.id))


@bp.post("/<int:vm_id>/failback")
@login_required
def failback(vm_id: int):
    from ..jobs.livesync import failback_vm

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_move_vm(current_user, vm):
        abort(403)
    view = livesync.view(vm)
    if not view.on_backup or not view.failback_ready or vm.state != VMState.RUNNING.value:
        flash(f"{vm.name} cannot fail back now: " + (view.relocate_text or "it runs on its primary.")
              + ("" if vm.state == VMState.RUNNING.value else f" It is {vm.state_enum.label}."), "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    sub = tasks.submit("livesync-failback", failback_vm, title=f"Fail back {vm.name} to {view.home}",
                       requester_id=current_user.id, target=vm, key=f"vm:{vm.id}", args=(vm.id,))
    task = launch(sub, busy=_busy(vm, sub))
    return redirect(url_for("tasks.detail", task_id=task.id) if task else url_for("vms.detail", vm_id=vm.id))


@bp.post("/<int:vm_id>/power-on-backup")
@login_required
def power_on_backup(vm_id: int):
    """Mode "LiveSync": the operator's Power on on the backup while the primary is down (the failover
    job applies the two-of-three rule again and refuses with its reason)."""
    from .. import ha

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_operate_vm(current_user, vm):
        abort(403)
    reason = ha.operator_refusal(vm)
    if reason:
        flash(f"{vm.name} cannot be powered on on its backup server: {reason}.", "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    sub = ha.submit_failover_task(vm, requester_id=current_user.id, automatic=False)
    task = launch(sub, busy=_busy(vm, sub))
    return redirect(url_for("tasks.detail", task_id=task.id) if task else url_for("vms.detail", vm_id=vm.id))


@bp.post("/<int:vm_id>/make-primary")
@login_required
def make_primary(vm_id: int):
    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_move_vm(current_user, vm):
        abort(403)
    try:
        livesync.make_primary_here(vm)
    except livesync.LiveSyncError as exc:
        db.session.rollback()
        flash(str(exc), "error")
    else:
        actionlog.record("vm-make-primary", target=vm, detail=vm.server.hostname)
        db.session.commit()
        flash(f"{vm.server.hostname} is now {vm.name}'s primary server.", "info")
    return redirect(url_for("vms.detail", vm_id=vm.id))

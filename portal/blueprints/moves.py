"""Migrate / move a VM to another server: the page listing every server's eligibility, and the form."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import moves, permissions
from ..views_common import launch

bp = Blueprint("moves", __name__, url_prefix="/vms")


def _vm_or_403(vm_id: int):
    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_move_vm(current_user, vm):
        abort(403)
    return vm


def _options(form) -> dict:
    """Per-migration settings from the form, within sane bounds; the cluster's defaults otherwise."""
    defaults = moves.default_options()

    def number(name: str, lo: int, hi: int) -> int:
        raw = (form.get(name) or "").strip()
        if not raw:
            return defaults[name]
        if not raw.isdigit() or not lo <= int(raw) <= hi:
            raise moves.MoveError(f"{name.replace('_', ' ')} must be a whole number from {lo} to {hi}.")
        return int(raw)

    return {
        "bandwidth_mibs": number("bandwidth_mibs", 0, 100000),
        "max_downtime_ms": number("max_downtime_ms", 10, 60000),
        "time_limit_s": number("time_limit_s", 10, 86400),
        "auto_converge": form.get("auto_converge") == "y" if "submitted" in form else defaults["auto_converge"],
    }


@bp.route("/<int:vm_id>/move")
@login_required
def page(vm_id: int):
    vm = _vm_or_403(vm_id)
    modes = {mode: {"problem": moves.mode_problem(vm, mode), "candidates": moves.candidates(vm, mode)}
             for mode in moves.MODES}
    return render_template("moves/page.html", vm=vm, modes=modes, labels=moves.MODES,
                           defaults=_options({}))


@bp.post("/<int:vm_id>/move")
@login_required
def submit(vm_id: int):
    vm = _vm_or_403(vm_id)
    mode = request.form.get("mode", "")
    server_id = request.form.get("server_id", type=int) or 0
    try:
        options = _options(request.form)
        cand = moves.check_target(vm, mode, server_id)
    except moves.MoveError as exc:
        flash(str(exc), "error")
        return redirect(url_for("moves.page", vm_id=vm.id)), 303
    sub = moves.submit(vm, cand, mode, options, current_user.id)
    task = launch(sub, busy=f"{vm.name} is busy with task {sub.task.id} ({sub.task.title}); try again when it ends.")
    if task is None:
        return redirect(url_for("moves.page", vm_id=vm.id)), 303
    return redirect(url_for("tasks.detail", task_id=task.id)), 303

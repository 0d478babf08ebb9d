"""A small read-only JSON API over the same permission rules as the pages."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask_login import current_user, login_required

from .. import moves, permissions, summary as summary_mod
from ..extensions import db
from ..models import VM, Task
from ..views_common import paginate
from .vms import vm_list_query

bp = Blueprint("api", __name__, url_prefix="/api")


def vm_json(vm: VM) -> dict:
    return {
        "id": vm.id, "vmid": vm.vmid, "name": vm.name, "owner": vm.owner.username, "state": vm.state,
        "memory_mb": vm.memory_mb, "vcpus": vm.vcpus, "disk_gb": vm.disk_gb,
        "server": vm.server.hostname if vm.server else None, "is_clone": vm.is_clone,
        "disk": vm.disk.mountpoint if vm.disk else None, "move": move_json(moves.running_move(vm)),
    }


def move_json(task: Task | None) -> dict | None:
    """A move under way: its task and how far it got (None: no move runs)."""
    if task is None:
        return None
    return {"task": task.id, "vm": task.target_id, "kind": task.kind, "title": task.title, "state": task.state,
            "pct": task.pct, "step": task.step, "eta_seconds": task.eta_seconds}


def task_json(task: Task) -> dict:
    return {
        "id": task.id, "kind": task.kind, "title": task.title, "state": task.state, "step": task.step,
        "pct": task.pct, "bytes_done": task.bytes_done, "bytes_total": task.bytes_total,
        "eta_seconds": task.eta_seconds, "error": task.error,
        "created_at": task.created_at.isoformat(),
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
    }


@bp.route("/summary")
@login_required
def summary():
    return jsonify(summary_mod.build(current_user).as_dict())


@bp.route("/vms")
@login_required
def vms():
    page = paginate(vm_list_query(current_user))
    return jsonify({"items": [vm_json(v) for v in page.items], "page": page.page, "pages": page.pages,
                    "total": page.total})


@bp.route("/vms/<int:vm_id>")
@login_required
def vm(vm_id: int):
    return jsonify(vm_json(permissions.get_vm_or_404(vm_id)))


@bp.route("/tasks/<int:task_id>")
@login_required
def task(task_id: int):
    return jsonify(task_json(permissions.get_task_or_404(task_id)))


@bp.route("/moves")
@login_required
def running_moves():
    """The migrations and cold moves under way that the user may see."""
    found = db.session.execute(permissions.visible_tasks(moves.running_moves_query(), current_user)).scalars()
    return jsonify({"items": [move_json(t) for t in found]})

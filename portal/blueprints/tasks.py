"""Tasks: list, page, the htmx status partial, cancel, and downloads."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, abort, flash, make_response, redirect, render_template, send_file, url_for
from flask_login import current_user, login_required

from .. import permissions, tasks as tasks_mod
from ..extensions import db
from ..models import Task, TaskState
from ..shared import shared_dir
from ..views_common import is_htmx, page_or_partial, paginate

bp = Blueprint("tasks", __name__, url_prefix="/tasks")

STOP_POLLING = 286  # htmx stops an every-Ns trigger on this status


@bp.route("/")
@login_required
def index():
    stmt = permissions.visible_tasks(db.select(Task), current_user).order_by(Task.created_at.desc(), Task.id.desc())
    return page_or_partial("tasks/index.html", "tasks/_list.html", page=paginate(stmt))


def _refreshed(task_id: int) -> Task:
    task = permissions.get_task_or_404(task_id)
    if tasks_mod.reconcile(task):
        db.session.commit()
    return task


@bp.route("/<int:task_id>")
@login_required
def detail(task_id: int):
    task = _refreshed(task_id)
    return render_template("tasks/detail.html", task=task)


@bp.route("/<int:task_id>/_status")
@login_required
def status(task_id: int):
    task = _refreshed(task_id)
    resp = make_response(render_template("tasks/_status.html", task=task))
    if task.finished:
        resp.status_code = STOP_POLLING if is_htmx() else 200
        resp.headers["HX-Trigger"] = "task-finished"
    return resp


@bp.post("/<int:task_id>/cancel")
@login_required
def cancel(task_id: int):
    task = permissions.get_task_or_404(task_id)
    if not permissions.can_cancel_task(current_user, task):
        abort(403)
    message = tasks_mod.cancel(task)
    db.session.commit()
    flash(message, "info")
    return redirect(url_for("tasks.detail", task_id=task.id))


@bp.route("/<int:task_id>/download")
@login_required
def download(task_id: int):
    task = permissions.get_task_or_404(task_id)
    if task.kind != "export-actionlog" or task.state != TaskState.SUCCEEDED.value or not task.result:
        abort(404)
    path = shared_dir("exports") / Path(task.result).name
    if not path.is_file():
        abort(404)
    return send_file(path, mimetype="text/csv", as_attachment=True, download_name=f"corral-{path.name}")

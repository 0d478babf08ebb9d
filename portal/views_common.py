"""Helpers every blueprint uses: htmx-aware rendering, pagination, filters."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from flask import Flask, current_app, flash, render_template, request
from flask_login import current_user
from htmx_flask import request as htmx_request

from . import permissions, tasks
from .extensions import db
from .models import Task


def is_htmx() -> bool:
    return bool(getattr(htmx_request, "htmx", False))


def page_or_partial(template: str, partial: str, **ctx):
    """The full page, or for htmx requests only its partial."""
    return render_template(partial if is_htmx() else template, **ctx)


def paginate(stmt, *, per_page: int | None = None):
    """Paginate a select; the page number comes from ``?page=``."""
    per_page = per_page or current_app.config["PAGE_SIZE"]
    return db.paginate(stmt, per_page=per_page, max_per_page=200, error_out=False)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_seconds(s: int | None) -> str:
    if s is None:
        return "–"
    s = int(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def ago(when: datetime | None) -> str:
    if when is None:
        return "never"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    secs = int((datetime.now(timezone.utc) - when).total_seconds())
    if secs < 5:
        return "just now"
    if secs < 60:
        return f"{secs} s ago"
    if secs < 3600:
        return f"{secs // 60} min ago"
    if secs < 86400:
        return f"{secs // 3600} h ago"
    return when.strftime("%Y-%m-%d %H:%M")


def url_with(**changes) -> str:
    """The current URL with some query arguments changed."""
    args = request.args.to_dict()
    args.update({k: v for k, v in changes.items() if v is not None})
    from flask import url_for

    return url_for(request.endpoint, **(request.view_args or {}), **args)


def start(sub: tasks.Submitted, *, not_started: Callable[[], None] | None = None) -> tuple[Task | None, str | None]:
    """Commit once, then enqueue: what :func:`launch` does, without messages (the JSON API words its own).

    Returns ``(task, None)`` for a new task; ``(the active task, "busy")`` when an
    identical one was already under way (this request's changes are rolled
    back); ``(None, problem)`` when the queue did not answer (the task is
    recorded as failed).
    """
    if not sub.created:
        db.session.rollback()
        if not_started is not None:
            not_started()
        return sub.task, "busy"
    db.session.commit()
    try:
        tasks.enqueue(sub)
    except tasks.QueueUnavailable as exc:
        if not_started is not None:
            not_started()
        db.session.commit()  # the failed task and what it left behind, as the pages will explain
        return None, str(exc)
    return sub.task, None


def launch(sub: tasks.Submitted, *, busy: str | None = None,
           not_started: Callable[[], None] | None = None) -> Task | None:
    """The edge's last step after :func:`tasks.submit`: commit once, then enqueue (:func:`start`).

    Returns the task to show, or None when the queue did not answer (the
    task is recorded as failed, the user is told what that left behind).
    When an identical task is already active, this request changes nothing
    (its pending changes are rolled back) and ``busy`` is flashed.
    ``not_started`` undoes what the request did for a task that will not
    run (removes an upload folder, puts settings back); what it changes in
    the database is committed with the failed task.
    """
    existing = sub.task.id if not sub.created else None
    title = sub.task.title
    task, problem = start(sub, not_started=not_started)
    if problem == "busy":
        flash(busy or f"That is already under way: task {existing} ({title}).", "info")
    elif problem:
        flash(f"{problem} Try again shortly.", "error")
    return task


def apply_change(change: Callable[[], str], errors: tuple[type[Exception], ...]) -> bool:
    """The edge of a form that changes rows only: run *change* (it flushes, records the action and returns
    the message), then commit and flash it; on one of *errors* roll back and flash the reason."""
    try:
        message = change()
    except errors as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return False
    db.session.commit()
    flash(message, "ok")
    return True


def submit_vm_task(vm, kind: str, func, title: str, *args) -> tasks.Submitted:
    """A task on one VM: one at a time per VM (the key ``vm:<id>``), pages and API alike."""
    return tasks.submit(kind, func, title=title, requester_id=current_user.id, target=vm, key=f"vm:{vm.id}",
                        args=(vm.id, *args))


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(bytes=human_bytes, seconds=human_seconds, ago=ago)
    app.jinja_env.globals.update(url_with=url_with, perm=permissions)

    @app.context_processor
    def nav():
        user = current_user
        if not user.is_authenticated:
            return {"nav_items": []}
        items = [("summary.index", "Summary"), ("vms.index", "VMs"), ("clusters.index", "Clusters")]
        if permissions.is_manager(user):
            items += [("servers.index", "VM Servers"), ("networks.index", "Networks"), ("library.index", "Library"),
                      ("license_keys.index", "License keys"), ("attributes.index", "Attributes"),
                      ("users.index", "Users"), ("tasks.index", "Tasks"), ("auth.actionlog", "Action log")]
        else:
            items += [("library.index", "Library"), ("tasks.index", "My tasks"), ("auth.actionlog", "My action log")]
        items += [("offerings.index", "Catalog"), ("metering.report", "Usage")]
        return {"nav_items": items}

"""Helpers every blueprint uses: htmx-aware rendering, pagination, filters."""

from __future__ import annotations

from datetime import datetime, timezone

from flask import Flask, current_app, render_template, request
from flask_login import current_user
from htmx_flask import request as htmx_request

from . import permissions
from .extensions import db


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


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(bytes=human_bytes, seconds=human_seconds, ago=ago)
    app.jinja_env.globals.update(url_with=url_with, perm=permissions)

    @app.context_processor
    def nav():
        user = current_user
        if not user.is_authenticated:
            return {"nav_items": []}
        items = [("summary.index", "Summary"), ("vms.index", "VMs")]
        if permissions.is_manager(user):
            items += [("servers.index", "VM Servers"), ("library.index", "Library"),
                      ("users.index", "Users"), ("tasks.index", "Tasks"), ("auth.actionlog", "Action log")]
        else:
            items += [("library.index", "Library"), ("tasks.index", "My tasks"), ("auth.actionlog", "My action log")]
        return {"nav_items": items}

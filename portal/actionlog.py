"""The action log: one row for everything a user does."""

from __future__ import annotations

from flask import has_request_context, request
from flask_login import current_user

from .extensions import db
from .models import ActionLog


def record(
    action: str,
    *,
    target=None,
    target_type: str | None = None,
    target_label: str | None = None,
    detail: str | None = None,
    user_id: int | None = None,
    task_id: int | None = None,
) -> ActionLog:
    """Add an action-log row (flushes, never commits).

    ``target`` may be a model instance; its type, id and a readable label are
    taken from it.
    """
    if target is not None:
        target_type = target_type or type(target).__name__.lower()
        target_label = target_label or _label(target)
    if user_id is None and has_request_context() and current_user.is_authenticated:
        user_id = current_user.id
    row = ActionLog(
        user_id=user_id,
        action=action,
        target_type=target_type,
        target_id=getattr(target, "id", None),
        target_label=target_label,
        detail=detail,
        address=request.remote_addr if has_request_context() else None,
        task_id=task_id,
    )
    db.session.add(row)
    db.session.flush()
    return row


def _label(obj) -> str:
    for attr in ("name", "username", "hostname", "title"):
        value = getattr(obj, attr, None)
        if value:
            return str(value)
    return f"#{getattr(obj, 'id', '?')}"

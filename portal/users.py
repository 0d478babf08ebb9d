"""User administration rules (flush, never commit)."""

from __future__ import annotations

import secrets

from sqlalchemy import func

from . import actionlog
from .auth_core import hash_password
from .extensions import db
from .models import VM, Role, User, VirtualDisk


class UserError(Exception):
    """A user change that cannot be made, with a message for the manager."""


def generate_password() -> str:
    return secrets.token_urlsafe(12)


def create_user(*, username: str, role: str, email: str | None, password: str,
                max_vms: int = 0, max_memory_mb: int = 0, max_disk_gb: int = 0) -> User:
    username = username.strip()
    if db.session.execute(db.select(User.id).where(func.lower(User.username) == username.lower())).first():
        raise UserError(f"A user called {username!r} exists already.")
    user = User(username=username, role=Role(role).value, email=email or None,
                password_hash=hash_password(password), max_vms=max_vms,
                max_memory_mb=max_memory_mb, max_disk_gb=max_disk_gb)
    db.session.add(user)
    db.session.flush()
    actionlog.record("user-created", target=user, detail=f"role {role}")
    return user


def managers_left_after(user: User, *, role: str, disabled: bool) -> int:
    others = db.session.execute(
        db.select(func.count(User.id)).where(User.role == Role.MANAGER.value, User.disabled.is_(False),
                                             User.id != user.id)
    ).scalar_one()
    return others + (1 if role == Role.MANAGER.value and not disabled else 0)


def update_user(user: User, *, role: str, email: str | None, disabled: bool,
                max_vms: int, max_memory_mb: int, max_disk_gb: int) -> None:
    if managers_left_after(user, role=role, disabled=disabled) == 0:
        raise UserError("Corral needs at least one active manager; that change would leave none.")
    changes = []
    for attr, value in (("role", role), ("email", email or None), ("disabled", disabled),
                        ("max_vms", max_vms), ("max_memory_mb", max_memory_mb), ("max_disk_gb", max_disk_gb)):
        if getattr(user, attr) != value:
            changes.append(f"{attr}: {getattr(user, attr)} -> {value}")
            setattr(user, attr, value)
    if disabled and "disabled: False -> True" in changes:
        user.session_version += 1  # end the user's sessions now
    if changes:
        actionlog.record("user-updated", target=user, detail="; ".join(changes))


def reset_password(user: User) -> str:
    password = generate_password()
    user.password_hash = hash_password(password)
    user.session_version += 1
    actionlog.record("password-reset", target=user)
    return password


def usage_by_user(user_ids: list[int]) -> dict[int, tuple[int, int, int]]:
    """(VMs, memory MB, disk GB) per user, in two grouped queries."""
    if not user_ids:
        return {}
    vm_rows = db.session.execute(
        db.select(VM.owner_id, func.count(VM.id), func.coalesce(func.sum(VM.memory_mb), 0))
        .where(VM.owner_id.in_(user_ids)).group_by(VM.owner_id)
    ).all()
    disk_rows = dict(db.session.execute(
        db.select(VM.owner_id, func.coalesce(func.sum(VirtualDisk.size_gb), 0))
        .join(VirtualDisk, VirtualDisk.vm_id == VM.id)
        .where(VM.owner_id.in_(user_ids)).group_by(VM.owner_id)
    ).all())
    out = {uid: (0, 0, 0) for uid in user_ids}
    for uid, count, mem in vm_rows:
        out[uid] = (count, int(mem), int(disk_rows.get(uid, 0)))
    return out

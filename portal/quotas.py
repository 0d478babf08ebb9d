"""Power-user quotas: VM count, memory and disk, reserved atomically.

``reserve`` first bumps the owner's ``quota_serial`` with an UPDATE. That takes
the user's row lock on PostgreSQL and the database write lock on SQLite, both
held until the caller commits, so concurrent reservations for one user run one
after another and each sees the VMs the previous one added.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, update

from .extensions import db
from .models import VM, Role, User, VirtualDisk


class QuotaExceeded(Exception):
    """A request would take a user past one of their quotas."""


@dataclass(frozen=True)
class Usage:
    vms: int
    memory_mb: int
    disk_gb: int


@dataclass(frozen=True)
class QuotaLine:
    label: str
    used: int
    limit: int | None  # None: unlimited
    unit: str

    @property
    def pct(self) -> int:
        if not self.limit:
            return 0
        return min(100, round(100 * self.used / self.limit))


def usage(user_id: int) -> Usage:
    vms, memory = db.session.execute(
        db.select(func.count(VM.id), func.coalesce(func.sum(VM.memory_mb), 0)).where(VM.owner_id == user_id)
    ).one()
    disk = db.session.execute(
        db.select(func.coalesce(func.sum(VirtualDisk.size_gb), 0))
        .join(VM, VM.id == VirtualDisk.vm_id)
        .where(VM.owner_id == user_id)
    ).scalar_one()
    return Usage(vms=vms, memory_mb=int(memory), disk_gb=int(disk))


def lines(user: User, used: Usage | None = None) -> list[QuotaLine]:
    used = used or usage(user.id)
    limited = user.role == Role.POWER.value
    return [
        QuotaLine("VMs", used.vms, user.max_vms if limited else None, ""),
        QuotaLine("Memory", used.memory_mb, user.max_memory_mb if limited else None, "MB"),
        QuotaLine("Disk", used.disk_gb, user.max_disk_gb if limited else None, "GB"),
    ]


def check(user: User, used: Usage, *, vms: int, memory_mb: int, disk_gb: int) -> None:
    if user.role != Role.POWER.value:
        if user.role == Role.MANAGER.value:
            return
        raise QuotaExceeded("Regular users cannot create VMs.")
    problems = []
    if used.vms + vms > user.max_vms:
        problems.append(f"VMs {used.vms} + {vms} > {user.max_vms}")
    if used.memory_mb + memory_mb > user.max_memory_mb:
        problems.append(f"memory {used.memory_mb} + {memory_mb} MB > {user.max_memory_mb} MB")
    if used.disk_gb + disk_gb > user.max_disk_gb:
        problems.append(f"disk {used.disk_gb} + {disk_gb} GB > {user.max_disk_gb} GB")
    if problems:
        raise QuotaExceeded(f"Quota exceeded for {user.username}: " + "; ".join(problems) + ".")


def reserve(user_id: int, *, vms: int = 1, memory_mb: int = 0, disk_gb: int = 0) -> User:
    """Lock the owner's quota and check that the request fits.

    Must run inside the transaction that then adds (or re-assigns) the VM
    rows; the lock is released when the caller commits or rolls back.
    """
    db.session.execute(
        update(User).where(User.id == user_id).values(quota_serial=User.quota_serial + 1)
    )
    user = db.session.get(User, user_id, populate_existing=True)
    check(user, usage(user_id), vms=vms, memory_mb=memory_mb, disk_gb=disk_gb)
    return user

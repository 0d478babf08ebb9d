"""Figures for the Summary page and its JSON twin, scoped to what a user may see."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func

from . import livesync, permissions, quotas
from .extensions import db
from .models import ACTIVE_TASK_STATES, VM, BackupMode, Server, ServerStatus, Task, TaskState, User, VMState, utcnow


@dataclass
class Summary:
    servers: dict[str, int] = field(default_factory=dict)
    vms: dict[str, int] = field(default_factory=dict)
    vms_total: int = 0
    tasks_running: int = 0
    tasks_queued: int = 0
    tasks_failed_day: int = 0
    quota: list[quotas.QuotaLine] = field(default_factory=list)
    livesync: livesync.Counts = field(default_factory=livesync.Counts)

    def as_dict(self) -> dict:
        return {
            "servers": self.servers,
            "vms": self.vms,
            "vms_total": self.vms_total,
            "tasks": {"running": self.tasks_running, "queued": self.tasks_queued,
                      "failed_last_day": self.tasks_failed_day},
            "quota": [{"label": q.label, "used": q.used, "limit": q.limit, "unit": q.unit} for q in self.quota],
            "livesync": dataclasses.asdict(self.livesync),
        }


def build(user: User) -> Summary:
    s = Summary()
    counts = dict(db.session.execute(db.select(Server.status, func.count()).group_by(Server.status)).all())
    s.servers = {st.value: counts.get(st.value, 0) for st in ServerStatus}

    vm_stmt = permissions.visible_vms(db.select(VM.state, func.count()).group_by(VM.state), user)
    by_state = dict(db.session.execute(vm_stmt).all())
    s.vms = {st.value: by_state[st.value] for st in VMState if by_state.get(st.value)}
    s.vms_total = sum(by_state.values())

    day_ago = utcnow() - timedelta(days=1)
    task_stmt = permissions.visible_tasks(
        db.select(Task.state, func.count())
        .where((Task.state.in_(ACTIVE_TASK_STATES)) | ((Task.state == TaskState.FAILED.value) & (Task.created_at >= day_ago)))
        .group_by(Task.state),
        user,
    )
    t = dict(db.session.execute(task_stmt).all())
    s.tasks_running = t.get(TaskState.RUNNING.value, 0)
    s.tasks_queued = t.get(TaskState.QUEUED.value, 0)
    s.tasks_failed_day = t.get(TaskState.FAILED.value, 0)
    s.quota = quotas.lines(user)
    protected = permissions.visible_vms(db.select(VM), user).where(VM.backup_mode != BackupMode.NONE.value)
    s.livesync = livesync.counts(db.session.execute(protected).scalars().all())
    return s

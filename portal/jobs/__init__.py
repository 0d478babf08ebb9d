"""RQ job functions, one module per area.

Every job is declared with :func:`task_job`: RQ calls it with a task id (and
other primitives); the wrapper opens an application context, marks the task
running, hands the job a :class:`Progress` to report through, and records the
outcome on the Task row, which outlives Redis.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import traceback

from flask import Flask
from rq import get_current_job

from ..extensions import db
from ..models import Task, TaskState, utcnow
from ..tasks import append_log, finish

log = logging.getLogger(__name__)

_app: Flask | None = None
_app_pid: int | None = None  # the process whose DB connections the app's pool holds


def set_app(app: Flask) -> None:
    """Let a worker hand its application to the jobs it forks."""
    global _app, _app_pid
    _app, _app_pid = app, os.getpid()


def get_app() -> Flask:
    if _app is None:
        from .. import create_app

        set_app(create_app())
    return _app


def _forget_inherited_connections() -> None:
    """In a forked work horse, drop (without closing) the parent's pooled connections."""
    global _app_pid
    if _app_pid != os.getpid():
        db.engine.dispose(close=False)
        _app_pid = os.getpid()


class TaskCancelled(Exception):
    """Raised inside a job when its user asked to cancel it."""


class Progress:
    """What a job reports: steps, percent, bytes and ETA, log lines."""

    MIN_WRITE_INTERVAL = 0.5  # seconds between byte-progress writes

    def __init__(self, task_id: int):
        self.task_id = task_id
        self.job = get_current_job()
        self._step_started = time.monotonic()
        self._last_write = 0.0

    @property
    def task(self) -> Task:
        task = db.session.get(Task, self.task_id)
        if task is None:
            raise LookupError(f"task {self.task_id} no longer exists")
        return task

    def _save(self, task: Task) -> None:
        db.session.commit()
        self._last_write = time.monotonic()
        if self.job is not None:
            self.job.meta.update(
                step=task.step, pct=task.pct, message=task.step,
                bytes_done=task.bytes_done, bytes_total=task.bytes_total,
            )
            self.job.save_meta()

    def check_cancel(self) -> None:
        db.session.expire_all()
        if self.task.cancel_requested:
            raise TaskCancelled()

    def step(self, name: str, pct: int | None = None) -> None:
        """Start a named step; checks for cancellation first."""
        self.check_cancel()
        task = self.task
        task.step = name
        if pct is not None:
            task.pct = max(0, min(100, int(pct)))
        task.bytes_done = task.bytes_total = task.eta_seconds = None
        append_log(task, name)
        self._step_started = time.monotonic()
        self._save(task)

    def bytes(self, done: int, total: int, *, pct_from: int | None = None, pct_to: int | None = None,
              force: bool = False) -> None:
        """Byte progress within the current step, mapped onto [pct_from, pct_to]."""
        now = time.monotonic()
        if not force and done < total and now - self._last_write < self.MIN_WRITE_INTERVAL:
            return
        self.check_cancel()
        task = self.task
        task.bytes_done, task.bytes_total = done, total
        frac = done / total if total else 1.0
        lo = task.pct if pct_from is None else pct_from
        hi = 100 if pct_to is None else pct_to
        if pct_from is not None or pct_to is not None:
            task.pct = int(lo + (hi - lo) * frac)
        elapsed = now - self._step_started
        task.eta_seconds = int(elapsed * (total - done) / done) if done and elapsed > 0 else None
        self._save(task)

    def items(self, done: int, total: int, *, pct_from: int, pct_to: int, noun: str = "items") -> None:
        """Progress in countable things (rows, disks): percent and ETA, no bytes."""
        now = time.monotonic()
        if done < total and now - self._last_write < self.MIN_WRITE_INTERVAL:
            return
        self.check_cancel()
        task = self.task
        frac = done / total if total else 1.0
        task.pct = int(pct_from + (pct_to - pct_from) * frac)
        task.step = f"{task.step.split(' (')[0]} ({done} of {total} {noun})" if task.step else None
        elapsed = now - self._step_started
        task.eta_seconds = int(elapsed * (total - done) / done) if done and elapsed > 0 else None
        self._save(task)

    def log(self, line: str) -> None:
        task = self.task
        append_log(task, line)
        self._save(task)


def task_job(fn):
    """Declare ``fn(progress, *args)`` as an RQ job called ``job(task_id, *args)``."""

    @functools.wraps(fn)
    def runner(task_id: int, *args, **kwargs):
        app = get_app()
        with app.app_context():
            _forget_inherited_connections()
            task = db.session.get(Task, task_id)
            if task is None:
                log.warning("task %s vanished before it ran", task_id)
                return None
            if task.finished:
                return None
            task.state = TaskState.RUNNING.value
            task.started_at = task.started_at or utcnow()
            append_log(task, "Started.")
            db.session.commit()
            progress = Progress(task_id)
            try:
                result = fn(progress, *args, **kwargs)
            except TaskCancelled:
                db.session.rollback()
                finish(progress.task, TaskState.CANCELLED)
                db.session.commit()
                return None
            except Exception as exc:
                db.session.rollback()
                job = get_current_job()
                task = progress.task
                if job is not None and (job.retries_left or 0) > 0:
                    append_log(task, f"Attempt failed: {exc}; retrying.")
                    task.state = TaskState.QUEUED.value
                else:
                    for line in traceback.format_exc().splitlines()[-6:]:
                        append_log(task, line)
                    finish(task, TaskState.FAILED, error=str(exc) or type(exc).__name__)
                db.session.commit()
                raise
            finish(progress.task, TaskState.SUCCEEDED, result=None if result is None else str(result))
            db.session.commit()
            return result

    return runner

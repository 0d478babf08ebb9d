"""Tasks: durable rows for background work, and the one enqueue helper.

A view calls :func:`submit` as its last step: it records the Task row and an
action-log row, commits, and enqueues the RQ job whose id is derived from the
task (``<prefix>-task-<id>``). A task may carry an ``active key`` (by default
kind + target): while a task with that key is queued or running, submitting
again returns the same task, so a double click enqueues once. The key is a
unique column, so two racing requests cannot both create a task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import redis
from flask import current_app
from rq import Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from sqlalchemy.exc import IntegrityError

from . import actionlog
from .extensions import db, queues
from .models import ACTIVE_TASK_STATES, Task, TaskState, utcnow

log = logging.getLogger(__name__)


class QueueUnavailable(Exception):
    """Redis could not take the job; the task was marked failed."""


@dataclass
class Submitted:
    task: Task
    created: bool  # False: an identical task was already active


def default_key(kind: str, target) -> str | None:
    if target is None:
        return None
    return f"{kind}:{type(target).__name__.lower()}:{target.id}"


def submit(
    kind: str,
    func,
    *,
    title: str,
    requester_id: int | None,
    target=None,
    key: str | None = "default",
    args: tuple = (),
    kwargs: dict | None = None,
    area: str = "default",
    retries: int = 0,
    retry_interval: int = 10,
    timeout: int | None = None,
    depends_on: Job | str | None = None,
) -> Submitted:
    """Record, commit and enqueue a task running ``func(task_id, *args)``."""
    if key == "default":
        key = default_key(kind, target)
    if key is not None:
        existing = _active_with_key(key)
        if existing is not None:
            return Submitted(existing, False)
    task = Task(
        kind=kind,
        title=title,
        target_type=type(target).__name__.lower() if target is not None else None,
        target_id=getattr(target, "id", None),
        requester_id=requester_id,
        state=TaskState.QUEUED.value,
        active_key=key,
        log="",
    )
    db.session.add(task)
    try:
        db.session.flush()
        task.job_id = f"{current_app.config['QUEUE_PREFIX']}-task-{task.id}"
        actionlog.record(f"task:{kind}", target=target, detail=title, user_id=requester_id, task_id=task.id)
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        existing = _active_with_key(key) if key else None
        if existing is None:
            raise
        return Submitted(existing, False)

    cfg = current_app.config
    try:
        queues.queue(area).enqueue(
            func,
            task.id,
            *args,
            **(kwargs or {}),
            job_id=task.job_id,
            job_timeout=timeout or cfg["TASK_TIMEOUT_SECONDS"],
            result_ttl=cfg["TASK_RESULT_TTL_SECONDS"],
            failure_ttl=cfg["TASK_FAILURE_TTL_SECONDS"],
            retry=Retry(max=retries, interval=retry_interval) if retries else None,
            depends_on=depends_on,
            description=f"{kind}: {title}",
        )
    except redis.RedisError as exc:
        finish(task, TaskState.FAILED, error=f"The task queue is unavailable ({exc}); nothing was started.")
        db.session.commit()
        raise QueueUnavailable(str(exc)) from exc
    return Submitted(task, True)


def _active_with_key(key: str) -> Task | None:
    return db.session.execute(
        db.select(Task).where(Task.active_key == key, Task.state.in_(ACTIVE_TASK_STATES))
    ).scalar_one_or_none()


def append_log(task: Task, line: str) -> None:
    stamp = utcnow().strftime("%H:%M:%S")
    task.log = (task.log or "") + f"{stamp} {line}\n"


def finish(task: Task, state: TaskState, *, error: str | None = None, result: str | None = None) -> None:
    """Mark a task ended (flushes)."""
    task.state = state.value
    task.active_key = None
    task.finished_at = utcnow()
    task.eta_seconds = None
    if state is TaskState.SUCCEEDED:
        task.pct = 100
        task.step = "Done"
    if error:
        task.error = error
        append_log(task, f"ERROR: {error}")
    if result is not None:
        task.result = result
    append_log(task, f"Task {state.value}.")
    db.session.flush()


def cancel(task: Task) -> str:
    """Cancel a queued task now, or ask a running one to stop at its next step.

    Returns a sentence for the user. Flushes; the caller commits.
    """
    if task.finished:
        return f"Task {task.id} has already {task.state}."
    if task.state == TaskState.QUEUED.value:
        try:
            Job.fetch(task.job_id, connection=queues.redis).cancel()
        except NoSuchJobError:
            pass
        finish(task, TaskState.CANCELLED)
        return f"Task {task.id} was cancelled before it started."
    task.cancel_requested = True
    append_log(task, "Cancellation requested.")
    db.session.flush()
    return f"Task {task.id} will stop at its next step and undo what it started."


_DEAD_JOB_STATES = {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}


def reconcile(task: Task, *, grace: timedelta = timedelta(seconds=30)) -> bool:
    """Mark a task failed when its job died without saying so (worker killed).

    Returns True when it changed the task. Flushes; the caller commits.
    """
    if task.finished or not task.job_id:
        return False
    try:
        status = Job.fetch(task.job_id, connection=queues.redis).get_status(refresh=True)
    except NoSuchJobError:
        status = None
    except redis.RedisError:
        return False
    if status in _DEAD_JOB_STATES or (status is None and utcnow() - task.created_at > grace):
        finish(task, TaskState.FAILED, error="The worker running this task stopped before it finished.")
        _abandoned(task)
        return True
    return False


def _abandoned(task: Task) -> None:
    """What a task that died leaves behind: a VM it was creating is partially created."""
    if task.kind == "vm-create" and task.target_type == "vm":
        from .models import VM, VMState

        vm = db.session.get(VM, task.target_id)
        if vm is not None and vm.state == VMState.CREATING.value:
            vm.state = VMState.PARTIAL.value

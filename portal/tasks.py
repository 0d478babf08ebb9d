"""Tasks: durable rows for background work, and the one enqueue helper.

A view calls :func:`submit` to record the Task row and an action-log row
(it flushes, never commits); the edge then commits once and calls
:func:`enqueue`, which puts the RQ job (id ``<prefix>-task-<id>``) on the
queue. Enqueueing after the commit means a worker never sees a task the
database does not have yet; a queue that does not answer fails the task and
leaves its target in a state the pages explain. A task may carry an ``active key`` (by default
kind + target): while a task with that key is queued or running, submitting
again returns the same task, so a double click enqueues once. The key is a
unique column, so two racing requests cannot both create a task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
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
    func: Callable | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    retries: int = 0
    retry_interval: int = 10
    timeout: int | None = None


def default_key(kind: str, target) -> str | None:
    if target is None:
        return None
    return f"{kind}:{type(target).__name__.lower()}:{target.id}"


def submit(
    kind: str,
    func: Callable,
    *,
    title: str,
    requester_id: int | None,
    target=None,
    key: str | None = "default",
    args: tuple = (),
    kwargs: dict | None = None,
    retries: int = 0,
    retry_interval: int = 10,
    timeout: int | None = None,
) -> Submitted:
    """Record a task that will run ``func(task_id, *args)`` (flushes; the caller commits, then :func:`enqueue`)."""
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
    except IntegrityError:
        # A racing twin committed the same key first: its task does the work, and
        # this request's pending changes go with the rollback (it is "busy").
        db.session.rollback()
        existing = _active_with_key(key) if key else None
        if existing is None:
            raise
        return Submitted(existing, False)
    task.job_id = f"{current_app.config['QUEUE_PREFIX']}-task-{task.id}"
    actionlog.record(f"task:{kind}", target=target, detail=title, user_id=requester_id, task_id=task.id)
    db.session.flush()
    return Submitted(task, True, func, tuple(args), dict(kwargs or {}), retries, retry_interval, timeout)


def enqueue(sub: Submitted) -> None:
    """Put a recorded, committed task on the queue (nothing to do for an already active twin).

    When Redis does not answer, the task is marked failed, whatever it was to
    act on is left in a state the pages explain (:func:`_abandoned`), and
    :class:`QueueUnavailable` carries the sentence for the user. Flushes; the
    caller commits that outcome.
    """
    if not sub.created:
        return
    cfg = current_app.config
    task = sub.task
    try:
        queues.queue().enqueue(
            sub.func,
            task.id,
            *sub.args,
            **sub.kwargs,
            job_id=task.job_id,
            job_timeout=sub.timeout or cfg["TASK_TIMEOUT_SECONDS"],
            result_ttl=cfg["TASK_RESULT_TTL_SECONDS"],
            failure_ttl=cfg["TASK_FAILURE_TTL_SECONDS"],
            retry=Retry(max=sub.retries, interval=sub.retry_interval) if sub.retries else None,
            description=f"{task.kind}: {task.title}",
        )
    except redis.RedisError as exc:
        finish(task, TaskState.FAILED, error=f"The task queue is unavailable ({exc}); nothing was started.")
        consequence = _abandoned(task)
        raise QueueUnavailable(" ".join(filter(None, [
            "The task queue is not answering; nothing was started.", consequence]))) from exc


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
        consequence = _abandoned(task)
        if consequence:
            append_log(task, consequence)
        return True
    return False


def _abandoned(task: Task) -> str | None:
    """What a task that never ran or died leaves behind, said in a sentence.

    A VM it was creating is partially created (its page offers Delete). A VM
    it was moving stays marked migrating until the next server poll finds where
    libvirt runs it (:func:`portal.monitoring.settle_moves`). Flushes.
    """
    from .moves import TASK_KINDS

    if task.kind in TASK_KINDS.values() and task.target_type == "vm":
        from .models import VM, VMState

        vm = db.session.get(VM, task.target_id)
        if vm is not None and vm.state == VMState.MIGRATING.value:
            return (f"{vm.name}'s move was interrupted: it stays marked migrating until the next server poll "
                    "finds where libvirt runs it and removes what the move left on the other server.")
    if task.kind == "vm-create" and task.target_type == "vm":
        from .models import VM, VMState

        vm = db.session.get(VM, task.target_id)
        if vm is not None and vm.state == VMState.CREATING.value:
            vm.state = VMState.PARTIAL.value
            db.session.flush()
            return f"{vm.name} is recorded as partially created; delete it to remove it."
    if task.kind in ("cluster-create", "cluster-add-computes") and task.target_type == "virtualcluster":
        from .models import VM, ClusterMember, VMState

        made = db.session.execute(db.select(VM).join(ClusterMember, ClusterMember.vm_id == VM.id).where(
            ClusterMember.cluster_id == task.target_id, VM.state == VMState.CREATING.value)).scalars().all()
        for vm in made:
            vm.state = VMState.PARTIAL.value
        db.session.flush()
        if made:
            return (f"{', '.join(vm.name for vm in made)} {'is' if len(made) == 1 else 'are'} recorded as partially "
                    "created; delete the cluster (or remove those computes) to remove what was made.")
    return None

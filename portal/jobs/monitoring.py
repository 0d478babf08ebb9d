"""The periodic poll, scheduled through RQ's scheduler (``corral worker`` runs it)."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from flask import current_app
from rq.registry import ScheduledJobRegistry

from .. import backups, livesync_watch, metering, metrics, monitoring, rebalance, tasks
from ..extensions import db, queues
from . import get_app

log = logging.getLogger(__name__)


def _poll_job_id(slot: int) -> str:
    return f"{current_app.config['QUEUE_PREFIX']}-poll-{slot}"


def schedule_next_poll(delay: float | None = None) -> str:
    """Schedule the next poll; the job id names its time slot, so racing schedulers agree."""
    every = current_app.config["POLL_SECONDS"]
    delay = every if delay is None else delay
    slot = int((time.time() + delay) // every)
    job_id = _poll_job_id(slot)
    queues.queue().enqueue_in(timedelta(seconds=delay), poll_servers, job_id=job_id,
                              result_ttl=300, failure_ttl=86400, job_timeout=max(60, every * 4),
                              description="poll every VM server")
    return job_id


def ensure_poll_scheduled() -> bool:
    """Called when a worker starts: schedule a poll unless one is pending."""
    prefix = f"{current_app.config['QUEUE_PREFIX']}-poll-"
    registry = ScheduledJobRegistry(queue=queues.queue())
    if any(job_id.startswith(prefix) for job_id in registry.get_job_ids()):
        return False
    if any(job_id.startswith(prefix) for job_id in queues.queue().get_job_ids()):
        return False
    schedule_next_poll(delay=0)
    return True


def poll_servers(reschedule: bool = True) -> int:
    """Poll every server once, compact old graph samples, schedule the next poll.

    The job is the edge: what the poll recorded and the compaction are one commit.
    """
    app = get_app()
    with app.app_context():
        try:
            started = time.monotonic()
            outcomes = monitoring.poll_all()
            monitoring.compact_samples()
            metering.aggregate()
            due = backups.submit_due() + rebalance.auto_step()
            db.session.commit()
            for sub in due:
                try:
                    tasks.enqueue(sub)
                except tasks.QueueUnavailable:
                    log.warning("task %s (%s) could not be queued", sub.task.id, sub.task.title)
                db.session.commit()
            try:
                livesync_watch.poll_once(app)
            except Exception:  # the poll's own work is done and committed; LiveSync is looked at again next time
                log.exception("LiveSync round of the poll failed")
            metrics.observe_poll(time.monotonic() - started)
            log.info("polled %d server(s)", len(outcomes))
            return len(outcomes)
        finally:
            if reschedule:
                schedule_next_poll()

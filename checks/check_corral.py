"""check_corral: is Corral's task machinery healthy? (Nagios plugin)

Jobs waiting in Corral's RQ queues, RQ workers serving those queues, how long
the oldest task still queued has waited, and how many tasks failed in the last
hour (the last two from the Task rows in the database). Redis not answering,
the database not answering, or no worker at all is CRITICAL. The portal can
run the same :class:`Corral` resource in-process through :func:`run_check`.

    check_corral [-w JOBS] [-c JOBS] [--age-warning S] [--age-critical S]
                 [--failed-warning N] [--failed-critical N] [-t SECONDS] [-v]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import timedelta

import nagiosplugin
import redis
from rq import Queue, Worker
from sqlalchemy import func
from sqlalchemy.exc import SQLAlchemyError

from checks import PluginArgumentParser
from portal.extensions import db, queues
from portal.models import Task, TaskState, utcnow

FAILED_WINDOW = timedelta(hours=1)


@dataclass
class Thresholds:
    """Alert when a value is above the warning/critical number (Nagios ranges)."""

    queue_warning: int = 20  # jobs waiting in the queues
    queue_critical: int = 100
    age_warning: int = 600  # seconds the oldest queued task has waited
    age_critical: int = 3600
    failed_warning: int = 0  # tasks failed in the last hour
    failed_critical: int = 5


@dataclass
class Observed:
    """What one probe saw."""

    redis_error: str | None = None
    db_error: str | None = None
    queue_depth: int | None = None
    workers: list[str] = field(default_factory=list)
    oldest_queued_s: int | None = None
    failed_1h: int | None = None


def measure_queues() -> tuple[int, list[str]]:
    """Jobs waiting in Corral's queues and the names of the workers serving them."""
    depth, workers = 0, set()
    for name in queues.all_names():
        queue = Queue(name, connection=queues.redis)
        depth += queue.count
        workers.update(w.name for w in Worker.all(queue=queue))
    return depth, sorted(workers)


def measure_tasks() -> tuple[int, int]:
    """Seconds the oldest queued task has waited (0: none queued); tasks failed in the last hour."""
    now = utcnow()
    oldest = db.session.execute(
        db.select(func.min(Task.created_at)).where(Task.state == TaskState.QUEUED.value)
    ).scalar()
    failed = db.session.execute(
        db.select(func.count(Task.id)).where(
            Task.state == TaskState.FAILED.value,
            func.coalesce(Task.finished_at, Task.created_at) >= now - FAILED_WINDOW,
        )
    ).scalar_one()
    age = max(0, int((now - oldest).total_seconds())) if oldest is not None else 0
    return age, failed


class Corral(nagiosplugin.Resource):
    """Needs an application context (``main`` opens one; the portal has its own)."""

    def __init__(self):
        self.observed = Observed()

    @property
    def name(self) -> str:
        return "CORRAL"

    def probe(self):
        seen = self.observed
        try:
            seen.queue_depth, seen.workers = measure_queues()
        except redis.RedisError as exc:
            seen.redis_error = f"Redis at {_redis_location(queues.redis)} is not answering: {exc}"
            yield nagiosplugin.Metric("redis", 0, context="up")
        else:
            yield nagiosplugin.Metric("queue_depth", seen.queue_depth, min=0, context="queue_depth")
            yield nagiosplugin.Metric("workers", len(seen.workers), min=0, context="workers")
        try:
            seen.oldest_queued_s, seen.failed_1h = measure_tasks()
        except SQLAlchemyError as exc:
            db.session.rollback()
            seen.db_error = f"the database is not answering: {getattr(exc, 'orig', None) or exc}"
            yield nagiosplugin.Metric("database", 0, context="up")
        else:
            yield nagiosplugin.Metric("oldest_queued", seen.oldest_queued_s, "s", min=0, context="oldest_queued")
            yield nagiosplugin.Metric("failed_1h", seen.failed_1h, min=0, context="failed_1h")


def _redis_location(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


class UpContext(nagiosplugin.Context):
    """Redis or the database: 0 is CRITICAL, with what went wrong."""

    def __init__(self):
        super().__init__("up")

    def evaluate(self, metric, resource):
        seen = resource.observed
        hint = seen.redis_error if metric.name == "redis" else seen.db_error
        return self.result_cls(nagiosplugin.Critical, hint, metric)

    def performance(self, metric, resource):
        return None


class WorkersContext(nagiosplugin.ScalarContext):
    """No worker serving Corral's queues is CRITICAL: nothing would ever run."""

    def __init__(self):
        super().__init__("workers", critical="1:", fmt_metric="{value} worker(s)")

    def evaluate(self, metric, resource):
        if metric.value < 1:
            return self.result_cls(nagiosplugin.Critical, "no RQ worker serves Corral's queues", metric)
        return super().evaluate(metric, resource)


class CorralSummary(nagiosplugin.Summary):
    def __init__(self, resource: Corral):
        self.resource = resource

    def ok(self, results):
        seen = self.resource.observed
        return (f"{seen.queue_depth} job(s) queued, {len(seen.workers)} worker(s), "
                f"oldest queued task waited {seen.oldest_queued_s} s, "
                f"{seen.failed_1h} task(s) failed in the last hour")

    def problem(self, results):
        return "; ".join(str(r) for r in results.most_significant)


def build_check(t: Thresholds | None = None) -> tuple[nagiosplugin.Check, Corral]:
    t = t or Thresholds()
    resource = Corral()
    check = nagiosplugin.Check(
        resource,
        UpContext(),
        nagiosplugin.ScalarContext("queue_depth", f"{t.queue_warning}", f"{t.queue_critical}",
                                   fmt_metric="{value} job(s) queued"),
        WorkersContext(),
        nagiosplugin.ScalarContext("oldest_queued", f"{t.age_warning}", f"{t.age_critical}",
                                   fmt_metric="oldest queued task waited {value} s"),
        nagiosplugin.ScalarContext("failed_1h", f"{t.failed_warning}", f"{t.failed_critical}",
                                   fmt_metric="{value} task(s) failed in the last hour"),
        CorralSummary(resource),
    )
    return check, resource


def run_check(t: Thresholds | None = None) -> tuple[str, str, str]:
    """Run the check in-process, in the current app context: (state name, summary line, perfdata)."""
    check, _ = build_check(t)
    check()
    return check.state.text, check.summary_str, " ".join(p for p in check.perfdata if p)


def parser() -> argparse.ArgumentParser:
    p = PluginArgumentParser(prog="check_corral", description=__doc__.splitlines()[0], status_name="CORRAL")
    p.add_argument("-w", "--warning", type=int, default=20, help="warn above this many queued jobs")
    p.add_argument("-c", "--critical", type=int, default=100, help="critical above this many queued jobs")
    p.add_argument("--age-warning", type=int, default=600,
                   help="warn when the oldest queued task has waited more than this many seconds")
    p.add_argument("--age-critical", type=int, default=3600)
    p.add_argument("--failed-warning", type=int, default=0,
                   help="warn when more than this many tasks failed in the last hour")
    p.add_argument("--failed-critical", type=int, default=5)
    p.add_argument("-t", "--timeout", type=int, default=30)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


@nagiosplugin.guarded(verbose=0)
def main(argv=None):
    args = parser().parse_args(argv)
    from portal import create_app

    t = Thresholds(args.warning, args.critical, args.age_warning, args.age_critical,
                   args.failed_warning, args.failed_critical)
    check, _ = build_check(t)
    with create_app().app_context():
        check.main(args.verbose, args.timeout)


if __name__ == "__main__":
    main()

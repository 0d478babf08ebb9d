"""Prometheus metrics at ``/metrics``: computed at scrape time from the database and Redis, so every
gunicorn worker, RQ worker and the monitor (one machine or several) report through one place.

Events that happen in other processes (login failures, poll cycles, the monitor's connections)
are recorded in Redis with :func:`incr` and :func:`set_gauge`; never raising, never blocking
the work that records them. The scrape renders everything with ``prometheus_client``.
Access: ``Authorization: Bearer <METRICS_TOKEN>``, or a client address in ``METRICS_ALLOW``
(comma-separated addresses or networks; loopback by default).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time

import redis
from flask import Blueprint, Response, abort, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from rq.job import Job
from sqlalchemy import func

from .extensions import csrf, db, queues
from .models import VM, LiveSync, Server, Task

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)
csrf.exempt(bp)

COUNTERS = {"login_failures": "Failed logins (wrong password, unknown user, or throttled)",
            "poll_cycles": "Completed poll cycles"}
GAUGES = {"poll_cycle_seconds": "Duration of the last poll cycle",
          "monitor_connections": "libvirt event connections the monitor holds open"}


def _key(kind: str) -> str:
    return f"{current_app.config['QUEUE_PREFIX']}:metrics:{kind}"


def incr(name: str, amount: float = 1) -> None:
    try:
        queues.redis.hincrbyfloat(_key("counters"), name, amount)
    except redis.RedisError as exc:
        log.debug("metric %s not recorded: %s", name, exc)


def set_gauge(name: str, value: float) -> None:
    try:
        queues.redis.hset(_key("gauges"), name, value)
    except redis.RedisError as exc:
        log.debug("metric %s not recorded: %s", name, exc)


def observe_poll(seconds: float) -> None:
    set_gauge("poll_cycle_seconds", seconds)
    incr("poll_cycles")


def _task_seconds():
    if db.engine.dialect.name == "sqlite":
        return (func.julianday(Task.finished_at) - func.julianday(Task.started_at)) * 86400.0
    return func.extract("epoch", Task.finished_at - Task.started_at)


class Collector:
    """Yields every family at scrape time (the registry calls ``collect``)."""

    def collect(self):
        ns = "corral"
        g = GaugeMetricFamily(f"{ns}_servers", "VM servers by state", labels=["state"])
        for state, n in db.session.execute(db.select(Server.status, func.count()).group_by(Server.status)):
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(f"{ns}_vms", "VMs by state and server", labels=["state", "server"])
        rows = db.session.execute(db.select(VM.state, Server.hostname, func.count()).select_from(VM)
                                  .outerjoin(Server, VM.server_id == Server.id).group_by(VM.state, Server.hostname))
        for state, host, n in rows:
            g.add_metric([state, host or ""], n)
        yield g
        g = GaugeMetricFamily(f"{ns}_livesync", "Protected VMs by LiveSync state", labels=["state"])
        for state, n in db.session.execute(db.select(LiveSync.state, func.count()).group_by(LiveSync.state)):
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily(f"{ns}_tasks", "Tasks by kind and state (outcome, once finished)",
                              labels=["kind", "state"])
        for kind, state, n in db.session.execute(db.select(Task.kind, Task.state, func.count())
                                                 .group_by(Task.kind, Task.state)):
            g.add_metric([kind, state], n)
        yield g
        s = SummaryMetricFamily(f"{ns}_task_duration_seconds", "Run time of finished tasks by kind and outcome",
                                labels=["kind", "outcome"])
        for kind, state, n, total in db.session.execute(
                db.select(Task.kind, Task.state, func.count(), func.sum(_task_seconds()))
                .where(Task.finished_at.is_not(None), Task.started_at.is_not(None)).group_by(Task.kind, Task.state)):
            s.add_metric([kind, state], count_value=n, sum_value=float(total or 0))
        yield s
        db.session.rollback()
        yield from self._queue()
        yield from self._recorded(ns)

    def _queue(self):
        depth = GaugeMetricFamily("corral_queue_depth", "Jobs waiting in the queue", labels=["queue"])
        age = GaugeMetricFamily("corral_queue_oldest_job_age_seconds", "Age of the oldest waiting job",
                                labels=["queue"])
        up = GaugeMetricFamily("corral_redis_up", "Whether Redis answered this scrape")
        try:
            queue = queues.queue()
            ids = queue.get_job_ids(0, 0)
            depth.add_metric([queue.name], queue.count)
            oldest = Job.fetch(ids[0], connection=queues.redis).enqueued_at if ids else None
            age.add_metric([queue.name], max(0.0, time.time() - oldest.timestamp()) if oldest else 0.0)
            up.add_metric([], 1)
        except (redis.RedisError, Exception) as exc:  # noqa: BLE001 - a vanished job or Redis: report, not fail
            log.warning("queue metrics unavailable: %s", exc)
            up.add_metric([], 0)
        yield from (depth, age, up)

    def _recorded(self, ns: str):
        try:
            counters = queues.redis.hgetall(_key("counters"))
            gauges = queues.redis.hgetall(_key("gauges"))
        except redis.RedisError:
            counters, gauges = {}, {}
        for name, text in COUNTERS.items():
            c = CounterMetricFamily(f"{ns}_{name}", text)
            c.add_metric([], float(counters.get(name.encode(), 0)))
            yield c
        for name, text in GAUGES.items():
            if name.encode() in gauges:
                yield GaugeMetricFamily(f"{ns}_{name}", text, value=float(gauges[name.encode()]))


def _allowed() -> bool:
    token = current_app.config.get("METRICS_TOKEN")
    header = request.headers.get("Authorization", "")
    if token and header.lower().startswith("bearer ") and hmac.compare_digest(header[7:].strip(), token):
        return True
    try:
        addr = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    for item in str(current_app.config.get("METRICS_ALLOW") or "").split(","):
        item = item.strip()
        if item:
            try:
                if addr in ipaddress.ip_network(item, strict=False):
                    return True
            except ValueError:
                log.warning("METRICS_ALLOW has %r, which is not an address or network", item)
    return False


@bp.get("/metrics")
def scrape():
    if not _allowed():
        abort(403)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

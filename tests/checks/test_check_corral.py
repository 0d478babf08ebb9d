"""check_corral as Nagios runs it, against a real redis-server and real worker processes."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
from rq import Worker

from checks.check_corral import Thresholds, run_check
from portal import tasks
from portal.extensions import db, queues
from portal.jobs.accounts import export_actionlog
from portal.models import Task, utcnow
from tests.checks.conftest import run_plugin
from tests.conftest import free_port, make_task, make_user, start_task

pytestmark = pytest.mark.usefixtures("no_poll")

PERF = {"queue_depth", "workers", "oldest_queued", "failed_1h"}


@pytest.fixture
def no_poll(monkeypatch):
    """Workers schedule no server poll, so the queue holds only what a test puts there."""
    monkeypatch.setenv("CORRAL_POLL_SECONDS", "0")


def wait_for_worker(app, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with app.app_context():
        while not Worker.all(queue=queues.queue()):
            assert time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.1)


def _queued_tasks(app, n: int) -> list[int]:
    with app.app_context():
        user = make_user("pat")
        return [start_task(tasks.submit("export-actionlog", export_actionlog, title=f"export {i}",
                                        requester_id=user.id, key=f"export:{i}", args=(user.id,))).task.id
                for i in range(n)]


def _finished_task(state: str, ago: timedelta) -> None:
    task = make_task(None, state=state)
    task.created_at = task.finished_at = utcnow() - ago
    db.session.commit()


def test_ok_with_a_worker_and_an_empty_queue(app, worker):
    wait_for_worker(app)
    run = run_plugin("check_corral")
    assert (run.code, run.name, run.state) == (0, "CORRAL", "OK"), run.stdout
    assert set(run.perfdata) == PERF
    assert run.perfdata["queue_depth"] == "0;20;100;0"
    assert run.value("workers") == 1
    assert run.perfdata["oldest_queued"].startswith("0s;600;3600")
    assert run.value("failed_1h") == 0
    assert "0 job(s) queued, 1 worker(s)" in run.summary


def test_no_worker_is_critical(app):
    run = run_plugin("check_corral")
    assert (run.code, run.state) == (2, "CRITICAL")
    assert "no RQ worker serves Corral's queues" in run.summary
    assert run.value("workers") == 0 and run.value("queue_depth") == 0


def test_queue_depth_thresholds_with_a_hung_worker(app, worker):
    """A worker that is registered but takes no jobs: only the queue depth alerts."""
    wait_for_worker(app)
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        task_ids = _queued_tasks(app, 3)
        with app.app_context():
            # Redis may already have handed one job to the stopped worker's pending BLPOP.
            depth = queues.queue().count
        assert depth in (2, 3)
        run = run_plugin("check_corral", "-w", "0", "-c", "5")
        assert (run.code, run.state) == (1, "WARNING"), run.stdout
        assert run.summary == f"{depth} job(s) queued (outside range 0:0)"
        assert run.perfdata["queue_depth"] == f"{depth};0;5;0"
        assert run.value("workers") == 1

        run = run_plugin("check_corral", "-w", "0", "-c", "1")
        assert (run.code, run.state) == (2, "CRITICAL"), run.stdout
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    # The worker resumes and empties the queue: OK again.
    deadline = time.monotonic() + 60
    with app.app_context():
        while db.session.execute(db.select(db.func.count(Task.id)).where(
                Task.id.in_(task_ids), Task.state == "succeeded")).scalar_one() < 3:
            assert time.monotonic() < deadline, "the worker did not run the queued tasks"
            db.session.rollback()
            time.sleep(0.2)
    assert run_plugin("check_corral", "-w", "0", "-c", "1").state == "OK"


def test_oldest_queued_task_age(app, worker):
    """A task left queued (its job lost with Redis, say) ages into WARNING, then CRITICAL."""
    wait_for_worker(app)
    with app.app_context():
        task = make_task(None, state="queued")
        task.created_at = utcnow() - timedelta(minutes=10)
        db.session.commit()
    run = run_plugin("check_corral", "--age-warning", "60", "--age-critical", "3600")
    assert (run.code, run.state) == (1, "WARNING"), run.stdout
    assert 600 <= run.value("oldest_queued") < 700
    assert "oldest queued task waited" in run.summary
    assert run_plugin("check_corral", "--age-warning", "60", "--age-critical", "300").state == "CRITICAL"


def test_failed_tasks_in_the_last_hour(app, worker):
    wait_for_worker(app)
    with app.app_context():
        _finished_task("failed", timedelta(minutes=10))
        _finished_task("failed", timedelta(minutes=50))
        _finished_task("failed", timedelta(hours=2))  # too old to count
        _finished_task("succeeded", timedelta(minutes=5))
        _finished_task("cancelled", timedelta(minutes=5))
    run = run_plugin("check_corral", "--failed-warning", "1", "--failed-critical", "5")
    assert (run.code, run.state) == (1, "WARNING"), run.stdout
    assert run.value("failed_1h") == 2
    assert "2 task(s) failed in the last hour" in run.summary
    run = run_plugin("check_corral", "--failed-warning", "0", "--failed-critical", "1")
    assert (run.code, run.state) == (2, "CRITICAL")


def test_redis_unreachable_is_critical(app):
    env = dict(os.environ, CORRAL_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    run = run_plugin("check_corral", env=env)
    assert (run.code, run.state) == (2, "CRITICAL")
    assert "Redis at 127.0.0.1" in run.summary and "not answering" in run.summary
    # The database part still reports.
    assert set(run.perfdata) == {"oldest_queued", "failed_1h"}


@pytest.mark.parametrize("args", [["-w", "notanumber"], ["--no-such-option"]])
def test_bad_arguments_are_unknown(app, args):
    run = run_plugin("check_corral", *args)
    assert (run.code, run.name, run.state) == (3, "CORRAL", "UNKNOWN")
    assert "usage: check_corral" in run.stderr


def test_run_check_in_process(app, worker):
    """What the portal would call: the same resource, in the portal's app context."""
    wait_for_worker(app)
    with app.app_context():
        _finished_task("failed", timedelta(minutes=1))
        state, summary, perfdata = run_check(Thresholds(failed_warning=0, failed_critical=5))
    assert state == "warning"
    assert summary == "1 task(s) failed in the last hour (outside range 0:0)"
    assert "failed_1h=1;0;5;0" in perfdata.split()
    assert "workers=1;;1:;0" in perfdata.split()

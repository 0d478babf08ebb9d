"""The task pipeline end to end: real redis-server, real worker processes."""

from __future__ import annotations

import csv
import io
import threading

from rq.job import Job

from portal import tasks
from portal.extensions import db, queues
from portal.jobs.accounts import export_actionlog
from portal.models import ActionLog, Task, TaskState, User
from portal.shared import shared_dir
from tests.conftest import make_user, run_worker_burst, start_task


def _seed_log(user, n: int) -> None:
    for i in range(n):
        db.session.add(ActionLog(user_id=user.id, action=f"act{i}", target_label=f"t{i}", detail="x"))
    db.session.commit()


def _record(user):
    return tasks.submit("export-actionlog", export_actionlog, title="export", requester_id=user.id,
                        key=f"export-actionlog:{user.id}:own", args=(user.id,))


def _submit(user):
    return start_task(_record(user))


def test_worker_process_runs_a_multi_step_task_to_completion(app):
    with app.app_context():
        user = make_user("pat")
        other = make_user("otto")
        _seed_log(user, 1200)  # several batches: bytes progress is reported
        _seed_log(other, 3)
        task_id = _submit(user).task.id
        assert db.session.get(Task, task_id).state == "queued"

    run_worker_burst()

    with app.app_context():
        task = db.session.get(Task, task_id)
        assert task.state == TaskState.SUCCEEDED.value, task.log
        assert task.pct == 100
        assert task.active_key is None and task.finished_at and task.started_at
        for step in ("Counting entries", "Writing entries", "Checksumming"):
            assert step in task.log
        assert "1201 entries to export" in task.log  # 1200 seeded + the submission itself
        job = Job.fetch(task.job_id, connection=queues.redis)
        assert job.meta["step"] == "Checksumming" and job.meta["pct"] == 92
        path = str(shared_dir("exports") / task.result)
        rows = list(csv.reader(io.StringIO(open_text(path))))
        assert len(rows) == 1 + 1201  # header + only the user's own entries
        assert {r[1] for r in rows[1:]} == {"pat"}


def test_double_submit_enqueues_once(app):
    with app.app_context():
        user = make_user("pat")
        first = _submit(user)
        second = _submit(user)
        assert first.created and not second.created
        assert first.task.id == second.task.id
        assert queues.queue().count == 1


def test_concurrent_submits_create_one_task(app):
    with app.app_context():
        user_id = make_user("pat").id
    results, errors = [], []

    def go():
        try:
            with app.app_context():
                results.append(_submit(db.session.get(User, user_id)).task.id)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Task.id))).scalar_one() == 1
        assert queues.queue().count == 1


def test_after_a_task_ends_the_same_key_may_run_again(app):
    with app.app_context():
        user = make_user("pat")
        first = _submit(user).task.id
    run_worker_burst()
    with app.app_context():
        second = _submit(db.session.get(Task, first).requester)
        assert second.created and second.task.id != first


def test_cancel_queued_task_never_runs(app):
    with app.app_context():
        user = make_user("pat")
        task = _submit(user).task
        message = tasks.cancel(task)
        db.session.commit()
        assert "cancelled before it started" in message
        task_id = task.id
    run_worker_burst()
    with app.app_context():
        task = db.session.get(Task, task_id)
        assert task.state == "cancelled"
        assert "Started." not in task.log


def _queued_task(app) -> int:
    """A queued task row for a job run in-process."""
    with app.app_context():
        user = make_user("pat")
        task = Task(kind="t", title="t", requester_id=user.id, state="queued", log="")
        db.session.add(task)
        db.session.commit()
        return task.id


def test_cancel_running_task_stops_at_next_step(app):
    """A running job sees cancel_requested at its next step and ends cancelled."""
    from portal.jobs import Progress, task_job

    task_id = _queued_task(app)
    seen = []

    @task_job
    def two_steps(progress: Progress):
        progress.step("one", 10)
        # The user presses Cancel while step one runs (another session).
        with app.app_context():
            t = db.session.get(Task, task_id)
            tasks.cancel(t)
            db.session.commit()
        seen.append("one")
        progress.step("two", 50)
        seen.append("two")

    import portal.jobs as jobs_mod

    jobs_mod.set_app(app)
    two_steps(task_id)
    assert seen == ["one"]
    with app.app_context():
        t = db.session.get(Task, task_id)
        assert t.state == "cancelled" and t.active_key is None
        assert "Cancellation requested." in t.log


def test_failing_job_records_error_and_log(app):
    from portal.jobs import task_job

    @task_job
    def boom(progress):
        progress.step("Preparing", 20)
        raise RuntimeError("disk /var/lib/corral/disk1 is full")

    import portal.jobs as jobs_mod

    jobs_mod.set_app(app)
    task_id = _queued_task(app)
    try:
        boom(task_id)
    except RuntimeError:
        pass
    with app.app_context():
        t = db.session.get(Task, task_id)
        assert t.state == "failed"
        assert t.error == "disk /var/lib/corral/disk1 is full"
        assert "RuntimeError" in t.log and "Preparing" in t.log


def test_task_whose_worker_died_is_reconciled_as_failed(app):
    """A job stopped behind the task's back (worker killed) marks the task failed."""
    with app.app_context():
        user = make_user("pat")
        task = _submit(user).task
        job = Job.fetch(task.job_id, connection=queues.redis)
        task.state = "running"
        db.session.commit()
        job.set_status("failed")  # what RQ records when a work horse is killed
        assert tasks.reconcile(task)
        db.session.commit()
        assert task.state == "failed" and "stopped before it finished" in task.error


def test_submit_records_without_committing(app):
    """The edge decides: a view that rolls back after submit leaves no task, no log row, no job."""
    with app.app_context():
        user = make_user("pat")
        sub = _record(user)
        assert sub.created and sub.task.id is not None
        db.session.rollback()
        assert db.session.execute(db.select(db.func.count(Task.id))).scalar_one() == 0
        assert db.session.execute(db.select(db.func.count(ActionLog.id))
                                  .where(ActionLog.action == "task:export-actionlog")).scalar_one() == 0
        assert queues.queue().count == 0


def test_queue_down_marks_task_failed_and_says_so(app):
    app.config["REDIS_URL"] = "redis://127.0.0.1:1/0"
    with app.app_context():
        user = make_user("pat")
        try:
            _submit(user)
        except tasks.QueueUnavailable:
            db.session.commit()  # the edge records the failure
        else:
            raise AssertionError("expected QueueUnavailable")
        task = db.session.execute(db.select(Task)).scalar_one()
        assert task.state == "failed" and "queue is unavailable" in task.error
        assert task.active_key is None


def test_action_log_records_task_submission(app):
    with app.app_context():
        user = make_user("pat")
        task = _submit(user).task
        row = db.session.execute(db.select(ActionLog).where(ActionLog.task_id == task.id)).scalar_one()
        assert row.user_id == user.id and row.action == "task:export-actionlog"


def open_text(path: str) -> str:
    with open(path, newline="") as fh:
        return fh.read()

"""The edge of every background operation: record (flush), commit once, then enqueue.

A queue that does not answer is real here: the app points at a loopback port
where no Redis listens.
"""

from __future__ import annotations

from portal import tasks
from portal.extensions import db
from portal.jobs.vms import create_vm
from portal.models import VM, Role, Task, VMState
from tests.conftest import csrf_token, free_port, log_in_client, make_server, make_user, make_vm


def _queue_down(app) -> None:
    app.config["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"


def test_a_create_that_cannot_be_enqueued_leaves_the_vm_partially_created(app):
    _queue_down(app)
    with app.app_context():
        owner = make_user("pat", Role.POWER)
        vm = make_vm(owner, server=make_server(), state=VMState.CREATING.value)
        sub = tasks.submit("vm-create", create_vm, title=f"Create VM {vm.name}", requester_id=owner.id,
                           target=vm, args=(vm.id,))
        db.session.commit()
        try:
            tasks.enqueue(sub)
        except tasks.QueueUnavailable as exc:
            message = str(exc)
            db.session.commit()
        else:
            raise AssertionError("expected QueueUnavailable")
        assert "nothing was started" in message and "partially created" in message
        db.session.expire_all()
        assert vm.state == VMState.PARTIAL.value
        task = db.session.get(Task, sub.task.id)
        assert task.state == "failed" and task.active_key is None


def test_power_request_with_the_queue_down_says_so_and_changes_nothing(app, client):
    _queue_down(app)
    with app.app_context():
        vm_id = make_vm(make_user("rita"), server=make_server(), state=VMState.OFF.value).id
    log_in_client(client, "rita")
    resp = client.post(f"/vms/{vm_id}/power/start", data={"csrf_token": csrf_token(client, f"/vms/{vm_id}")},
                       follow_redirects=True)
    body = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "The task queue is not answering; nothing was started." in body
    with app.app_context():
        assert db.session.get(VM, vm_id).state == VMState.OFF.value
        task = db.session.execute(db.select(Task).where(Task.kind == "vm-start")).scalar_one()
        assert task.state == "failed" and "queue is unavailable" in task.error


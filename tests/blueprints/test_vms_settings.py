"""VM settings over HTTP: who may resize, and the bounds every resize meets.

Settings are a manager's or a power user's (own VMs, within quota) action; a
regular user operates the VMs they were given but cannot grow them. Every size
is also bounded by what the VM's server can hold. Refused requests change
nothing: no row, no task, no action-log entry.
"""

from __future__ import annotations

import pytest

from portal.extensions import db
from portal.models import VM, ActionLog, Role, Task, User
from tests.conftest import log_in_client, make_server, make_user, make_vm


@pytest.fixture
def setup(app):
    """A server (64 GiB memory, 800 GB free), a manager, a power user and a regular user, each with an off VM."""
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        server = make_server("srvset")
        disk_id = server.disks[0].id
        boss = make_user("boss", Role.MANAGER, email="boss@example.org")
        pow_ = make_user("pow", Role.POWER, max_vms=5, max_memory_mb=10 ** 7, max_disk_gb=10 ** 5)
        reg = make_user("reg")
        ids = {
            "server": server.id,
            "boss": boss.id,
            "powvm": make_vm(pow_, "powvm", server=server, disk_id=disk_id, memory_mb=512, disk_gb=10).id,
            "regvm": make_vm(reg, "regvm", server=server, disk_id=disk_id, memory_mb=512, disk_gb=10).id,
        }
    return ids


def _snapshot(app, vm_id: int) -> tuple:
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        tasks = db.session.execute(db.select(db.func.count(Task.id))).scalar_one()
        logs = db.session.execute(db.select(db.func.count(ActionLog.id))
                                  .where(ActionLog.action == "vm-settings-changed")).scalar_one()
        return vm.memory_mb, vm.vcpus, [d.size_gb for d in vm.vdisks], tasks, logs


def _post(client, vm_id: int, memory_mb: int, vcpus: int, disk: int, follow: bool = False):
    return client.post(f"/vms/{vm_id}/settings", data={"memory_mb": memory_mb, "vcpus": vcpus, "disk-0": disk},
                       follow_redirects=follow)


def test_regular_user_cannot_resize_own_vm(app, client, setup):
    log_in_client(client, "reg")
    before = _snapshot(app, setup["regvm"])
    # The defect: a regular user grew their own VM without any bound (memory up to 4 TiB, disks to any size).
    r = _post(client, setup["regvm"], 1 << 22, 8, 16384)
    assert r.status_code == 403
    r = _post(client, setup["regvm"], 1024, 2, 20)
    assert r.status_code == 403
    assert _snapshot(app, setup["regvm"]) == before


def test_regular_user_still_operates_own_vm(app, client, setup):
    """Operating (power, console) stays the owner's right; only resizing moved."""
    log_in_client(client, "reg")
    assert client.get(f"/vms/{setup['regvm']}/_console").status_code == 200
    state = client.get(f"/vms/{setup['regvm']}/_state").get_data(as_text=True)
    assert 'data-action="start"' in state


def test_regular_users_page_says_who_changes_settings(app, client, setup):
    log_in_client(client, "reg")
    html = client.get(f"/vms/{setup['regvm']}").get_data(as_text=True)
    assert 'data-testid="settings-unavailable"' in html
    assert "Settings are changed by a manager or a power user" in html
    assert 'href="mailto:boss@example.org">boss</a>' in html
    assert 'name="memory_mb"' not in html  # no form that would only answer 403


def test_power_user_and_manager_see_the_form(app, setup):
    for username, vm in (("pow", "powvm"), ("boss", "regvm")):
        client = app.test_client()
        log_in_client(client, username)
        html = client.get(f"/vms/{setup[vm]}").get_data(as_text=True)
        assert 'name="memory_mb"' in html and "settings-unavailable" not in html, username


def test_power_user_resizes_own_vm_within_bounds(app, client, setup):
    log_in_client(client, "pow")
    r = _post(client, setup["powvm"], 1024, 2, 20)
    assert r.status_code == 302 and "/tasks/" in r.headers["Location"]
    memory, vcpus, disks, _, logs = _snapshot(app, setup["powvm"])
    assert (memory, vcpus, disks, logs) == (1024, 2, [20], 1)


@pytest.mark.parametrize("memory_mb, disk, message", [
    (65537, 10, "65537 MB of memory do not fit on srvset: it has 65536 MB in all."),
    (1 << 22, 10, "4194304 MB of memory do not fit on srvset"),
    (512, 811, "801 GB of new disk do not fit on srvset:/var/lib/corral/disk1: it has 800 GB free."),
    (512, 16385, "Each disk needs a size between 1 and 16384 GB."),
])
@pytest.mark.parametrize("username, vm", [("pow", "powvm"), ("boss", "regvm")])
def test_sizes_are_bounded_by_the_server(app, setup, username, vm, memory_mb, disk, message):
    """Within quota (power user) or without one (manager), the server's memory and free disk still bound a resize."""
    client = app.test_client()
    log_in_client(client, username)
    before = _snapshot(app, setup[vm])
    r = _post(client, setup[vm], memory_mb, 1, disk, follow=True)
    assert message in r.get_data(as_text=True)
    assert _snapshot(app, setup[vm]) == before


def test_growth_within_free_space_counts_only_the_growth(app, client, setup):
    """A 10 GB disk grown to 810 GB adds 800 GB: exactly what is free."""
    log_in_client(client, "boss")
    r = _post(client, setup["regvm"], 512, 1, 810)
    assert r.status_code == 302 and "/tasks/" in r.headers["Location"]
    assert _snapshot(app, setup["regvm"])[2] == [810]


def test_power_user_quota_still_applies(app, client, setup):
    with app.app_context():
        db.session.execute(db.update(User).where(User.username == "pow").values(max_memory_mb=1024))
        db.session.commit()
    log_in_client(client, "pow")
    before = _snapshot(app, setup["powvm"])
    r = _post(client, setup["powvm"], 2048, 1, 10, follow=True)
    assert "Quota exceeded for pow" in r.get_data(as_text=True)
    assert _snapshot(app, setup["powvm"]) == before


def test_power_user_cannot_resize_someone_elses_vm(app, client, setup):
    log_in_client(client, "pow")
    before = _snapshot(app, setup["regvm"])
    assert _post(client, setup["regvm"], 1024, 1, 10).status_code == 404
    assert _snapshot(app, setup["regvm"]) == before


def test_settings_whose_task_cannot_start_are_put_back(app, client, setup):
    """The queue does not answer (nothing listens on that port): the sizes stay as they were."""
    from tests.conftest import free_port

    app.config["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    log_in_client(client, "pow")
    r = _post(client, setup["powvm"], 1024, 2, 20, follow=True)
    assert "The task queue is not answering; nothing was started." in r.get_data(as_text=True)
    memory, vcpus, disks, _tasks, _logs = _snapshot(app, setup["powvm"])
    assert (memory, vcpus, disks) == (512, 1, [10])
    with app.app_context():
        task = db.session.execute(db.select(Task).where(Task.kind == "vm-settings")).scalar_one()
        assert task.state == "failed"


def test_settings_while_another_task_runs_change_nothing(app, client, setup):
    from portal import tasks
    from portal.jobs.vms import power_vm

    with app.app_context():
        vm = db.session.get(VM, setup["powvm"])
        busy = tasks.submit("vm-start", power_vm, title="Power on", requester_id=setup["boss"], target=vm,
                            key=f"vm:{vm.id}", args=(vm.id, "start"))
        db.session.commit()  # recorded, never enqueued: it stays "queued"
        busy_id = busy.task.id
    log_in_client(client, "pow")
    before = _snapshot(app, setup["powvm"])
    r = _post(client, setup["powvm"], 1024, 2, 20, follow=True)
    assert f"is busy with task {busy_id}" in r.get_data(as_text=True)
    assert _snapshot(app, setup["powvm"]) == before

"""check_livesync judges the state Corral's monitor keeps, by the rule the pages use (portal.livesync.view)."""

from __future__ import annotations

import pytest

from portal import livesync
from portal.extensions import db
from portal.models import BackupMode
from tests.checks.conftest import run_plugin
from tests.conftest import make_server, make_user, make_vm


@pytest.fixture
def protected(app):
    with app.app_context():
        a, b = make_server("srv-a"), make_server("srv-b")
        vm = make_vm(make_user("owner"), "m1", server=a, state="running", disk_gb=10)
        vm.disk_id = a.disks[0].id
        livesync.set_protection(vm, BackupMode.LIVESYNC_FAILOVER.value, b.id)
        make_vm(vm.owner, "plain", server=a, state="running")
        db.session.commit()
        return vm.id


@pytest.mark.parametrize("state,code,words", [
    ("in_sync", 0, "m1: in sync with srv-b"),
    ("syncing", 1, "m1: syncing 42 % (0.04 of 0.10 GiB) to srv-b"),
    ("broken", 2, "m1: broken since"),
    ("unprotected", 2, "m1: unprotected (no mirror yet)"),
])
def test_states(app, protected, state, code, words):
    from portal.models import VM

    with app.app_context():
        ls = db.session.get(VM, protected).livesync
        ls.state, ls.progress_pct, ls.bytes_done, ls.bytes_total = state, 42, 42 << 20, 100 << 20
        if state == "broken":
            livesync.mark_broken(ls, "export gone")
        db.session.commit()
    run = run_plugin("check_livesync", "-N", "m1")
    assert (run.code, run.name) == (code, "LIVESYNC")
    assert run.summary.startswith(words), run.summary
    assert run.perfdata["sync"].split(";")[0] == "42%"


def test_running_on_its_backup_is_critical(app, protected):
    from portal.models import VM

    with app.app_context():
        vm = db.session.get(VM, protected)
        livesync.mark_in_sync(vm.livesync, 1 << 30)
        vm.server_id, vm.backup_server_id = vm.backup_server_id, vm.server_id
        db.session.commit()
    run = run_plugin("check_livesync", "-N", "m1")
    assert run.code == 2 and "running on its backup server srv-b, not on its primary srv-a" in run.summary


def test_unknown_and_unprotected_vms_are_unknown(app, protected):
    assert run_plugin("check_livesync", "-N", "nosuch").code == 3
    run = run_plugin("check_livesync", "-N", "plain")
    assert run.code == 3 and "has no backup mode" in run.summary

"""check_vm: Corral's idea of a VM against libvirt's, with a real domain on a bed server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from checks.check_vm import run_check
from portal.extensions import db
from portal.models import VM, Server
from tests.bed.guest import appliance_domain_xml, serial_log_path
from tests.checks.conftest import run_plugin
from tests.conftest import make_server, make_user, make_vm

NAME = "chkvm"


@pytest.fixture
def appliance_domain(bed, registered_server, appliance_image, domain_type, tmp_path):
    """The test appliance defined and started on the registered server as domain ``NAME``."""
    s = registered_server
    _remove_domain(bed, s)
    disk = Path(s.images_dir_host) / f"{NAME}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(appliance_image), "-F", "qcow2",
                    str(disk)], check=True, capture_output=True, timeout=60)
    xml = tmp_path / "domain.xml"
    xml.write_text(appliance_domain_xml(NAME, f"{s.images_dir}/{NAME}.qcow2", domain_type=domain_type,
                                        bridge=None))
    bed.virsh(s.index, "define", str(xml))
    bed.virsh(s.index, "start", NAME)
    yield NAME
    _remove_domain(bed, s)
    disk.unlink(missing_ok=True)
    s.host_path(serial_log_path(NAME)).unlink(missing_ok=True)


def _remove_domain(bed, s) -> None:
    bed.virsh(s.index, "destroy", NAME, check=False)
    bed.virsh(s.index, "undefine", NAME, check=False)


def _vm_on(app, hostname: str, state: str) -> None:
    with app.app_context():
        server = db.session.execute(db.select(Server).where(Server.hostname == hostname)).scalar_one()
        make_vm(make_user("owner"), NAME, server=server, state=state)


def _set_state(app, state: str) -> None:
    with app.app_context():
        db.session.execute(db.select(VM).where(VM.name == NAME)).scalar_one().state = state
        db.session.commit()


@pytest.mark.bed
def test_vm_state_against_libvirt(app, bed, registered_server, appliance_domain):
    s = registered_server
    _vm_on(app, s.name, "running")

    run = run_plugin("check_vm", "-N", NAME)
    assert (run.code, run.name, run.state) == (0, "VM", "OK"), run.stdout
    assert run.summary == f"{NAME} running on {s.name} (running), as Corral expects"
    assert run.perfdata == {"state_match": "1;;;0;1"}

    bed.virsh(s.index, "destroy", NAME)
    run = run_plugin("check_vm", "-N", NAME)
    assert (run.code, run.state) == (2, "CRITICAL"), run.stdout
    assert run.summary == f"Corral expects {NAME} running, but libvirt on {s.name} reports shut off"
    assert run.perfdata == {"state_match": "0;;;0;1"}

    _set_state(app, "off")
    run = run_plugin("check_vm", "-N", NAME)
    assert (run.code, run.state) == (0, "OK"), run.stdout
    assert "shut off" in run.summary

    # The same resource in-process (as the portal would call it), through the other states.
    bed.virsh(s.index, "start", NAME)
    with app.app_context():
        state, summary, perfdata = run_check(NAME)
    assert (state, perfdata) == ("critical", "state_match=0;;;0;1"), summary
    assert summary == f"Corral expects {NAME} off, but libvirt on {s.name} reports running"

    bed.virsh(s.index, "suspend", NAME)
    _set_state(app, "paused")
    with app.app_context():
        assert run_check(NAME) == ("warning", f"{NAME} is paused on {s.name}, as Corral knows",
                                   "state_match=1;;;0;1")
        _set_state(app, "migrating")
        state, summary, _ = run_check(NAME)
        assert state == "warning"
        assert summary == f"{NAME} is migrating (a task owns it); libvirt on {s.name} reports paused"

    _remove_domain(bed, s)
    _set_state(app, "saved")
    with app.app_context():
        assert run_check(NAME)[:2] == ("ok", f"{NAME} saved on {s.name} (not defined), as Corral expects")


@pytest.mark.bed
def test_unreachable_server_is_critical(app, bed, registered_server):
    s = registered_server
    _vm_on(app, s.name, "running")
    bed.stop_sshd(s.index)
    try:
        run = run_plugin("check_vm", "-N", NAME)
    finally:
        bed.start_sshd(s.index)
    assert (run.code, run.state) == (2, "CRITICAL"), run.stdout
    assert run.summary.startswith(f"cannot ask {s.name} about {NAME}: libvirtd on {s.name} is not answering")
    assert run.perfdata == {}


def test_unknown_vm_is_unknown(app):
    run = run_plugin("check_vm", "-N", "nosuchvm")
    assert (run.code, run.name, run.state) == (3, "VM", "UNKNOWN")
    assert run.summary == "Corral knows no VM called 'nosuchvm'"


@pytest.mark.parametrize("args", [[], ["-N", "x", "-t", "soon"]])
def test_bad_arguments_are_unknown(app_env, args):
    run = run_plugin("check_vm", *args)
    assert (run.code, run.name, run.state) == (3, "VM", "UNKNOWN")
    assert "usage: check_vm" in run.stderr


def test_states_that_need_no_server(app):
    """A VM a task is still creating, or one whose server is marked down, is a WARNING, unasked."""
    with app.app_context():
        owner = make_user("owner")
        make_vm(owner, "newvm", state="creating")
        down = make_server("maint1", status="marked_down")
        make_vm(owner, "downvm", server=down, state="running")
        make_vm(owner, "lostvm", state="off")
        assert run_check("newvm") == ("warning", "newvm is creating and has no server yet", "")
        assert run_check("downvm") == ("warning", "maint1 (server of downvm) is marked down; not asked", "")
        assert run_check("lostvm")[0] == "unknown"

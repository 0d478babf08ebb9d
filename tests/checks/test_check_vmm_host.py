"""check_vmm_host as Nagios runs it, against a real bed server (sshd, libvirtd)."""

from __future__ import annotations

import pytest

from checks.check_vmm_host import Thresholds, run_check
from portal import servers
from portal.extensions import db
from portal.models import Server
from tests.checks.conftest import run_plugin

# The host is shared with other work: judge the plumbing, not this machine's load.
RELAXED = ["--disk-warning", "0.1", "--disk-critical", "0.01", "--load-warning", "1000", "--load-critical", "2000"]


@pytest.mark.bed
def test_healthy_server_is_ok(registered_server):
    run = run_plugin("check_vmm_host", "-H", registered_server.name, "-w", "0.1", "-c", "0.01", *RELAXED)
    assert (run.code, run.name, run.state) == (0, "VMM_HOST", "OK"), run.stdout
    disk = f"disk_free {registered_server.disk_dir}"
    assert {"mem_free", disk, "load1"} <= set(run.perfdata)
    assert 0 < run.value("mem_free") <= 100 and 0 < run.value(disk) <= 100
    assert run.perfdata["mem_free"].endswith("%;0.1:;0.01:;0;100")
    assert "MB free" in run.summary and "domain(s)" in run.summary


@pytest.mark.bed
def test_memory_thresholds_warn(registered_server):
    run = run_plugin("check_vmm_host", "-H", registered_server.name, "-w", "99.9", "-c", "0.1", *RELAXED)
    assert (run.code, run.state) == (1, "WARNING"), run.stdout
    assert "memory free" in run.summary and "99.9:" in run.summary


@pytest.mark.bed
def test_libvirtd_stopped_is_critical(bed, registered_server):
    bed.stop_libvirtd(registered_server.index)
    try:
        run = run_plugin("check_vmm_host", "-H", registered_server.name, *RELAXED)
    finally:
        bed.start_libvirtd(registered_server.index)
    assert (run.code, run.state) == (2, "CRITICAL"), run.stdout
    assert run.summary.startswith("libvirtd down: ")


@pytest.mark.bed
def test_sshd_stopped_is_critical(bed, registered_server):
    bed.stop_sshd(registered_server.index)
    try:
        run = run_plugin("check_vmm_host", "-H", registered_server.name, *RELAXED)
    finally:
        bed.start_sshd(registered_server.index)
    assert (run.code, run.state) == (2, "CRITICAL"), run.stdout
    assert run.summary.startswith("ssh down: ") and "unreachable" in run.summary


def test_unknown_server_is_unknown(app):
    run = run_plugin("check_vmm_host", "-H", "no-such-server")
    assert (run.code, run.state) == (3, "UNKNOWN")
    assert "Corral knows no server called 'no-such-server'" in run.stdout


@pytest.mark.parametrize("args", [["-H", "bed1", "-w", "notanumber"], []])
def test_bad_arguments_are_unknown(app_env, args):
    run = run_plugin("check_vmm_host", *args)
    assert (run.code, run.state) == (3, "UNKNOWN"), run.stdout + run.stderr


@pytest.mark.bed
def test_run_check_in_process(app, registered_server):
    """The portal's poll calls the same code: same verdict, with what it observed."""
    with app.app_context():
        server = db.session.execute(db.select(Server).where(Server.hostname == registered_server.name)).scalar_one()
        target, mountpoints = servers.target_for(server), [d.mountpoint for d in server.disks]
    state, summary, perfdata, observed = run_check(target, mountpoints, Thresholds(99.9, 0.1, 0.1, 0.01, 1000, 2000))
    assert state == "warning", summary
    assert observed.ssh_ok and observed.libvirt_ok and observed.facts.hostname == registered_server.name
    assert registered_server.disk_dir in observed.disks
    assert "mem_free=" in perfdata

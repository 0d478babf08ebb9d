"""check_vmm_host as Nagios runs it, against a real bed server (sshd, libvirtd),
and the portal's health view judging by the very same rules."""

from __future__ import annotations

import pytest

from checks.check_vmm_host import build_check, parser
from portal import monitoring, servers
from portal.extensions import db
from portal.models import Server
from portal.vmm import health
from portal.vmm.facts import DiskFacts, HostFacts, LoadFacts
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
def test_portal_probe_of_a_bed_server(app, registered_server):
    """The portal's poll calls health.check: same probe, same verdict, with what it observed."""
    with app.app_context():
        server = db.session.execute(db.select(Server).where(Server.hostname == registered_server.name)).scalar_one()
        target, mountpoints = servers.target_for(server), [d.mountpoint for d in server.disks]
    t = health.Thresholds(99.9, 0.1, 0.1, 0.01, 1000, 2000)
    verdict, observed = health.check(target, mountpoints, t)
    assert verdict.status is health.Status.WARNING, verdict.summary
    assert observed.ssh_ok and observed.libvirt_ok and observed.facts.hostname == registered_server.name
    assert registered_server.disk_dir in observed.disks
    assert "mem_free=" in verdict.perfdata
    assert _plugin_says(observed, t) == (verdict.status.text, verdict.summary, verdict.perfdata)


def _facts(memory_mb: int, free_mb: int) -> HostFacts:
    return HostFacts(cpus=1, cores_per_cpu=2, hyperthreading=False, memory_mb=memory_mb, free_memory_mb=free_mb,
                     nics=1, nic_names=["eth0"], mhz=2000, hypervisor_vendor="QEMU", hypervisor_type="QEMU (TCG)",
                     hypervisor_version="7.2.0 (libvirt 9.0.0)", kvm_capable=False, hostname="h1")


def _seen(free_mb=800, disks=(("/d1", 100, 50),), disk_errors=None, load1=0.5, **kw) -> health.Observed:
    return health.Observed(ssh_ok=True, libvirt_ok=True, facts=_facts(1000, free_mb),
                           disks={mp: DiskFacts(mp, size, free, True) for mp, size, free in disks},
                           disk_errors=dict(disk_errors or {}), load=LoadFacts(load1, 0.4, 0.3, 2),
                           domains=[{"name": "vm1", "uuid": "u", "state": "running"}], **kw)


def _plugin_says(observed: health.Observed, t: health.Thresholds) -> tuple[str, str, str]:
    """The Nagios plugin's state, summary and perfdata for what a probe saw (no probing again)."""
    check, _ = build_check(None, [], t, observed=observed)
    check()
    return check.state.text, check.summary_str, " ".join(p for p in check.perfdata if p)


SEEN = {
    "healthy": _seen(),
    "memory low": _seen(free_mb=80),
    "memory critical": _seen(free_mb=10),
    "disk full and load high": _seen(disks=(("/d1", 100, 7), ("/d 2", 100, 1)), load1=9.0),
    "disk missing": _seen(disk_errors={"/d9": "/d9 does not exist on h1 (create or mount it first)."}),
    "libvirtd down": health.Observed(ssh_ok=True, error="libvirtd on h1 is not answering"),
    "ssh down": health.Observed(error="h1 (10.0.0.1:22) is unreachable: Connection refused."),
}


@pytest.mark.parametrize("case", list(SEEN))
def test_the_portal_sees_exactly_what_nagios_sees(case):
    """The health view stores health.assess's verdict; the plugin prints the same state, line and perfdata."""
    t = health.Thresholds()
    verdict = health.assess(SEEN[case], t)
    assert _plugin_says(SEEN[case], t) == (verdict.status.text, verdict.summary, verdict.perfdata)


def test_verdicts_in_words():
    t = health.DEFAULTS
    assert health.assess(SEEN["healthy"], t).summary == "800 of 1000 MB free; /d1 50 of 100 GB free; load 0.50; 1 domain(s)"
    assert health.assess(SEEN["healthy"], t).perfdata == \
        "'disk_free /d1'=50.0%;10:;5:;0;100 load1=0.25;4;8;0 mem_free=80.0%;10:;5:;0;100"
    low = health.assess(SEEN["memory low"], t)
    assert (low.status, low.summary) == (health.Status.WARNING, "8.0% memory free (outside range 10:)")
    full = health.assess(SEEN["disk full and load high"], t)
    assert full.status is health.Status.CRITICAL
    assert full.summary == "disk_free /d 2 1.0% (outside range 5:)"
    assert health.assess(SEEN["disk missing"], t).summary.startswith("disk /d9 down: /d9 does not exist")
    assert health.assess(SEEN["ssh down"], t).summary == "ssh down: h1 (10.0.0.1:22) is unreachable: Connection refused."


def test_threshold_defaults_live_in_one_place(app):
    """The plugin's arguments and the portal's settings both start from health.DEFAULTS."""
    args = parser().parse_args(["-H", "x"])
    assert health.Thresholds(args.warning, args.critical, args.disk_warning, args.disk_critical,
                             args.load_warning, args.load_critical) == health.DEFAULTS
    with app.app_context():
        assert monitoring.thresholds() == health.DEFAULTS
        app.config["MEM_FREE_WARNING"] = 25
        assert monitoring.thresholds().mem_warning == 25.0

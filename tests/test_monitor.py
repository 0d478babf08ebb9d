"""The monitor process follows libvirt lifecycle events into the database and the UI;
the poll records what it saw; one rule maps libvirt's domain states to VM states."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from portal import monitoring
from portal.extensions import db
from portal.models import VM, CheckResult, Role, Server, VMState
from portal.monitor import Monitor
from portal.vmm import health
from portal.vmm.domains import DomainState
from portal.vmm.events import DomainEvent
from portal.vmm.facts import HostFacts
from tests.bed.guest import appliance_domain_xml
from tests.conftest import PASSWORD, make_server, make_user, make_vm, register_bed_server, stop_process


@pytest.mark.parametrize(("domain", "current", "expected"), [
    ("running", "off", VMState.RUNNING), ("blocked", "running", VMState.RUNNING),
    ("shutdown", "running", VMState.RUNNING), ("paused", "running", VMState.PAUSED),
    ("pmsuspended", "running", VMState.PAUSED), ("crashed", "running", VMState.CRASHED),
    ("shutoff", "running", VMState.OFF), ("saved", "running", VMState.SAVED),
    ("undefined", "running", VMState.OFF), (None, "running", VMState.OFF),
    # libvirt lists a managed save as "shutoff": a saved VM stays saved while its domain is off or gone
    ("shutoff", "saved", VMState.SAVED), (None, "saved", VMState.SAVED),
    ("undefined", "saved", VMState.OFF),  # undefining takes the save image with it
    ("unknown", "off", VMState.UNKNOWN), ("no-such-state", "off", VMState.UNKNOWN),
])
def test_one_rule_for_domain_states(domain, current, expected):
    assert monitoring.vm_state_for(domain, current) is expected


def test_the_poll_keeps_a_saved_vm_saved(app):
    """The poll used to turn a saved VM off within 30 s: libvirt lists its domain as shut off."""
    with app.app_context():
        server = make_server()
        vm = make_vm(make_user("pat"), "sv1", server=server, state="saved")
        other = make_vm(make_user("sam"), "sv2", server=server, state="running")
        changed = monitoring.apply_domain_states(server, [{"name": "sv1", "uuid": "u1", "state": "shutoff"},
                                                          {"name": "sv2", "uuid": "u2", "state": "shutoff"}])
        assert (vm.state, other.state) == ("saved", "off") and changed == [other]


def _healthy(server_id: int) -> monitoring.PollOutcome:
    facts = HostFacts(cpus=1, cores_per_cpu=2, hyperthreading=False, memory_mb=4000, free_memory_mb=3000, nics=1,
                      nic_names=["eth0"], mhz=2000, hypervisor_vendor="QEMU", hypervisor_type="QEMU (TCG)",
                      hypervisor_version="7.2.0", kvm_capable=False, hostname="h")
    seen = health.Observed(ssh_ok=True, libvirt_ok=True, facts=facts,
                           domains=[{"name": "d1", "uuid": "u", "state": "running"}])
    return monitoring.PollOutcome(server_id, "ok", "3000 of 4000 MB free", "mem_free=75.0%", seen)


def test_record_leaves_the_commit_to_its_caller(app):
    """record flushes what the poll saw; the job commits it once (a rollback undoes it)."""
    with app.app_context():
        sid = make_server(status="down").id
        db.session.commit()
        monitoring.record([_healthy(sid)])
        assert db.session.get(Server, sid).free_memory_mb == 3000
        assert db.session.execute(db.select(CheckResult)).scalar_one().state == "ok"  # flushed
        db.session.rollback()
        assert db.session.execute(db.select(CheckResult)).scalar_one_or_none() is None
        assert db.session.get(Server, sid).status == "down"


def test_monitor_applies_an_event_without_a_connection(app):
    """An event for a server the hub does not watch (any more) patches the domain list from the event."""
    with app.app_context():
        server = make_server()
        sid = server.id
        vm_id = make_vm(make_user("pat"), "ev1", server=server, state="off").id
        db.session.commit()
    monitor = Monitor(app)
    try:
        monitor.apply(DomainEvent(sid, "ev1", "u-ev1", DomainState.RUNNING, time.time()))
        with app.app_context():
            assert db.session.get(VM, vm_id).state == "running"
            assert db.session.get(Server, sid).domains == [{"name": "ev1", "uuid": "u-ev1", "state": "running"}]
        monitor.apply(DomainEvent(sid, "ev1", "u-ev1", DomainState.UNDEFINED, time.time()))
        with app.app_context():
            assert db.session.get(VM, vm_id).state == "off" and db.session.get(Server, sid).domains == []
    finally:
        monitor.hub.close()


def wait_for(fn, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def monitor_proc(app, tmp_path):
    with open(tmp_path / "monitor.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "portal", "monitor", "--refresh", "1"],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        yield proc
        stop_process(proc)


@pytest.mark.bed
def test_monitor_follows_domain_events(app, client, monitor_proc, bed_servers, appliance_image, domain_type):
    bs = bed_servers[1]
    sid = register_bed_server(app, bs)
    with app.app_context():
        owner = make_user("pat", Role.REGULAR)
        vm_id = make_vm(owner, "mon1", server=db.session.get(Server, sid), state="off").id
    disk = f"{bs.images_dir}/mon1.qcow2"
    subprocess.run(["cp", str(appliance_image), str(bs.host_path(disk))], check=True)
    xml = appliance_domain_xml("mon1", disk, domain_type=domain_type)
    virsh = ["virsh", "-c", bs.uri_tcp]

    def vm_state():
        with app.app_context():
            return db.session.get(VM, vm_id).state

    def server_domains():
        with app.app_context():
            return db.session.get(Server, sid).domains

    try:
        # Wait until the monitor has subscribed (it lists the server's domains on connect).
        wait_for(lambda: server_domains() is not None and
                 db_last_error(app, sid) is None, "the monitor to connect")
        time.sleep(0.5)
        subprocess.run([*virsh, "create", "/dev/stdin"], input=xml, text=True, check=True, capture_output=True)
        wait_for(lambda: vm_state() == "running", "the VM to show running")
        app.config["TEST_CLIENT_SENDS_CSRF"] = True
        client.post("/login", data={"username": "pat", "password": PASSWORD})
        assert "running" in client.get(f"/vms/{vm_id}", headers={"HX-Request": "true"}).get_data(as_text=True)
        subprocess.run([*virsh, "suspend", "mon1"], check=True, capture_output=True)
        wait_for(lambda: vm_state() == "paused", "the VM to show paused")
        subprocess.run([*virsh, "resume", "mon1"], check=True, capture_output=True)
        wait_for(lambda: vm_state() == "running", "the VM to run again")
        subprocess.run([*virsh, "destroy", "mon1"], check=True, capture_output=True)
        wait_for(lambda: vm_state() == "off", "the VM to show off")
        assert not [d for d in server_domains() if d["name"] == "mon1"]  # transient domain is gone
    finally:
        subprocess.run([*virsh, "destroy", "mon1"], capture_output=True)
        bs.host_path(disk).unlink(missing_ok=True)
    assert monitor_proc.poll() is None


def db_last_error(app, sid):
    with app.app_context():
        return db.session.get(Server, sid).last_error


@pytest.mark.bed
def test_monitor_reconnects_when_a_server_returns(app, bed, monitor_proc, bed_servers, appliance_image, domain_type):
    bs = bed_servers[1]
    sid = register_bed_server(app, bs)
    with app.app_context():
        make_vm(make_user("pat"), "mon2", server=db.session.get(Server, sid), state="off")
    wait_for(lambda: db_domains_known(app, sid), "the first subscription")
    bed.stop_libvirtd(2)
    try:
        wait_for(lambda: db_last_error(app, sid), "the monitor to notice the closed connection")
    finally:
        bed.start_libvirtd(2)
    disk = f"{bs.images_dir}/mon2.qcow2"
    subprocess.run(["cp", str(appliance_image), str(bs.host_path(disk))], check=True)
    virsh = ["virsh", "-c", bs.uri_tcp]
    try:
        time.sleep(2.5)  # let the monitor's 1 s refresh resubscribe
        subprocess.run([*virsh, "create", "/dev/stdin"], input=appliance_domain_xml("mon2", disk, domain_type=domain_type),
                       text=True, check=True, capture_output=True)

        def state():
            with app.app_context():
                return db.session.execute(db.select(VM.state).where(VM.name == "mon2")).scalar_one()

        wait_for(lambda: state() == "running", "events after the reconnect")
    finally:
        subprocess.run([*virsh, "destroy", "mon2"], capture_output=True)
        bs.host_path(disk).unlink(missing_ok=True)


def db_domains_known(app, sid):
    with app.app_context():
        return db.session.get(Server, sid).domains_json is not None

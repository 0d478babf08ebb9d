"""portal.vmm.domains against a bed server's real libvirtd: define, power, undefine, errors.

The guest is a diskless domain: SeaBIOS finds nothing to boot and waits, so
it starts at once, costs no disk, and ignores the ACPI power button, which is
exactly the guest the shutdown loop has to give up on. A guest that does shut
down on the button (the test appliance) is covered end to end in
tests/test_vm_lifecycle.py.
"""

from __future__ import annotations

import uuid

import libvirt
import pytest

from portal.vmm import domains
from portal.vmm.domain import DomainSpec, render
from portal.vmm.domains import DomainState
from portal.vmm.errors import VmmError
from portal.vmm.session import SSHSession, Target

NAME = "t-dom"


def test_libvirt_states_in_words():
    assert domains.state_from_libvirt(libvirt.VIR_DOMAIN_RUNNING) is DomainState.RUNNING
    assert domains.state_from_libvirt(libvirt.VIR_DOMAIN_SHUTOFF) is DomainState.SHUTOFF
    assert domains.state_from_libvirt(libvirt.VIR_DOMAIN_PMSUSPENDED) is DomainState.PMSUSPENDED
    assert domains.state_from_libvirt(libvirt.VIR_DOMAIN_NOSTATE) is DomainState.UNKNOWN
    assert domains.state_from_libvirt(99) is DomainState.UNKNOWN
    assert [s.value for s in DomainState] == ["running", "blocked", "paused", "shutdown", "shutoff", "crashed",
                                              "pmsuspended", "saved", "undefined", "unknown"]


@pytest.fixture
def session(bed_servers):
    """A session to the first bed server: SSH with the bed's key, libvirt over its TCP socket."""
    bs = bed_servers[0]
    target = Target(hostname=bs.name, address=bs.address, port=bs.ssh_port, host_key=bs.host_key_public,
                    key_file=bs.client_key, known_hosts=bs.known_hosts, libvirt_uri=bs.uri_tcp)
    with SSHSession(target) as s:
        yield s
        dom = domains.find(s, NAME)
        if dom is not None:  # what a failed test left behind
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)


@pytest.fixture
def defined(session, domain_type):
    domains.undefine(session, NAME)  # a leftover of an interrupted run has another UUID
    domains.define(session, render(DomainSpec(name=NAME, uuid=str(uuid.uuid4()), memory_mb=64,
                                              domain_type=domain_type)))
    return NAME


def _listed(session) -> dict:
    return {d["name"]: d for d in domains.list_domains(session.libvirt())}


@pytest.mark.bed
def test_define_power_through_every_action_and_undefine(session, defined):
    listed = _listed(session)[NAME]
    assert listed["state"] == "shutoff" and uuid.UUID(listed["uuid"])
    assert domains.state(session, NAME) is DomainState.SHUTOFF

    steps = [("start", DomainState.RUNNING), ("pause", DomainState.PAUSED), ("resume", DomainState.RUNNING),
             ("reboot", DomainState.RUNNING), ("save", DomainState.SAVED), ("restore", DomainState.RUNNING),
             ("poweroff", DomainState.SHUTOFF)]
    for action, expected in steps:
        assert domains.power(session, NAME, action) is expected, action
        assert domains.state(session, NAME) is expected, action
    assert _listed(session)[NAME]["state"] == "shutoff"

    # Undefining a running domain stops it first; a saved one loses its save image with it.
    domains.power(session, NAME, "start")
    domains.power(session, NAME, "save")
    assert domains.undefine(session, NAME) is True
    assert domains.state(session, NAME) is DomainState.UNDEFINED and NAME not in _listed(session)
    assert domains.undefine(session, NAME) is False  # deleting twice is fine


@pytest.mark.bed
def test_undefine_stops_a_running_domain(session, defined):
    domains.power(session, NAME, "start")
    assert domains.undefine(session, NAME) is True
    assert domains.find(session, NAME) is None


@pytest.mark.bed
def test_shutdown_presses_again_then_gives_up_on_a_guest_that_ignores_the_button(session, defined):
    domains.power(session, NAME, "start")
    heard: list[str] = []
    with pytest.raises(VmmError, match=f"{NAME} did not shut down within 1 s; use Power off"):
        domains.power(session, NAME, "shutdown", log=heard.append, presses=2, interval=0.5)
    assert heard == ["No reaction to power button press 1; pressing again.",
                     "No reaction to power button press 2; pressing again."]
    assert domains.state(session, NAME) is DomainState.RUNNING


@pytest.mark.bed
def test_shutdown_stops_waiting_when_cancelled(session, defined):
    class Cancelled(Exception):
        pass

    def cancel() -> None:
        raise Cancelled

    domains.power(session, NAME, "start")
    with pytest.raises(Cancelled):
        domains.power(session, NAME, "shutdown", check=cancel)
    assert domains.state(session, NAME) is DomainState.RUNNING  # the job stopped waiting; the VM is as it was


@pytest.mark.bed
def test_errors_name_the_server(session, defined, bed_servers):
    host = bed_servers[0].name
    with pytest.raises(VmmError, match=f"no-such is not defined on {host}"):
        domains.lookup(session, "no-such")
    with pytest.raises(VmmError, match=f"no-such is not defined on {host}"):
        domains.power(session, "no-such", "start")
    with pytest.raises(VmmError, match=f"resume of {NAME} failed on {host}"):
        domains.power(session, NAME, "resume")  # it is not running
    with pytest.raises(VmmError, match="unknown power action 'explode'"):
        domains.power(session, NAME, "explode")
    with pytest.raises(VmmError, match=f"defining the VM on {host} failed"):
        domains.define(session, "<domain type='qemu'><name>broken</name></domain>")
    assert domains.state(session, NAME) is DomainState.SHUTOFF  # nothing happened to it


@pytest.mark.bed
def test_serial_log_removal(session, bed_servers):
    bs = bed_servers[0]
    log = "/var/log/libvirt/qemu/t-dom.serial.log"
    bs.host_path(log).write_text("boot\n" + "x" * 100 + "\nCORRAL-HB 1\n")
    domains.remove_serial_log(session, log)
    assert not bs.host_path(log).exists()

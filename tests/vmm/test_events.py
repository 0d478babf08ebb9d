"""portal.vmm.events against a bed server's real libvirtd: lifecycle events, domain
lists over the watched connection, and what the hub says when libvirtd goes away.

The guest is diskless (SeaBIOS waits for a boot device), so it starts at once
and costs nothing; the second bed server is the one whose libvirtd is stopped.
"""

from __future__ import annotations

import queue
import time
import uuid

import libvirt
import pytest

from portal.vmm.domain import DomainSpec, render
from portal.vmm.domains import DomainState
from portal.vmm.events import ConnectionEvent, DomainEvent, EventHub, event_state
from portal.vmm.session import Target

NAME = "t-evt"


def test_lifecycle_events_in_words():
    assert event_state(libvirt.VIR_DOMAIN_EVENT_STARTED, 0) is DomainState.RUNNING
    assert event_state(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED) \
        is DomainState.SHUTOFF
    assert event_state(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED) is DomainState.SAVED
    assert event_state(libvirt.VIR_DOMAIN_EVENT_UNDEFINED, 0) is DomainState.UNDEFINED
    assert event_state(999, 0) is DomainState.UNKNOWN


def _target(bs) -> Target:
    return Target(hostname=bs.name, address=bs.address, libvirt_uri=bs.uri_tcp)


@pytest.fixture
def hub():
    h = EventHub()
    yield h
    h.close()


def _next(hub: EventHub, kind: type, timeout: float = 30.0, **match):
    """The next event of *kind* whose fields match (others are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = hub.events.get(timeout=0.2)
        except queue.Empty:
            continue
        if isinstance(event, kind) and all(getattr(event, k) == v for k, v in match.items()):
            return event
    pytest.fail(f"no {kind.__name__} {match} within {timeout} s")


@pytest.mark.bed
def test_events_and_domains_of_a_watched_server(hub, bed_servers, domain_type):
    bs = bed_servers[0]
    assert hub.domains(1) is None  # not watched
    assert hub.watch(1, _target(bs)) is True
    assert _next(hub, ConnectionEvent, key=1).connected
    assert NAME not in {d["name"] for d in hub.domains(1)}
    conn = libvirt.open(bs.uri_tcp)
    try:
        dom = conn.defineXML(render(DomainSpec(name=NAME, uuid=str(uuid.uuid4()), memory_mb=64,
                                               domain_type=domain_type)))
        assert _next(hub, DomainEvent, domain=NAME).state is DomainState.SHUTOFF  # defined
        dom.create()
        started = _next(hub, DomainEvent, domain=NAME, state=DomainState.RUNNING)
        assert started.key == 1 and started.uuid == dom.UUIDString()
        assert {"name": NAME, "uuid": dom.UUIDString(), "state": "running"} in hub.domains(1)
        dom.destroy()
        _next(hub, DomainEvent, domain=NAME, state=DomainState.SHUTOFF)
        dom.undefine()
        _next(hub, DomainEvent, domain=NAME, state=DomainState.UNDEFINED)
        assert NAME not in {d["name"] for d in hub.domains(1)}
    finally:
        try:
            leftover = conn.lookupByName(NAME)
            if leftover.isActive():
                leftover.destroy()
            leftover.undefine()
        except libvirt.libvirtError:
            pass
        conn.close()
    hub.unwatch(1)
    assert hub.watching() == set() and hub.domains(1) is None


@pytest.mark.bed
def test_a_server_whose_libvirtd_stops_and_returns(hub, bed, bed_servers):
    bs = bed_servers[1]
    assert hub.watch(2, _target(bs))
    _next(hub, ConnectionEvent, key=2, connected=True)
    bed.stop_libvirtd(bs.index)
    try:
        deadline = time.monotonic() + 30
        while 2 in hub.watching() and time.monotonic() < deadline:
            hub.prune_dead()  # what the monitor's reconcile does when no close callback came
            time.sleep(0.2)
        assert 2 not in hub.watching() and hub.domains(2) is None
        while not hub.events.empty():  # the close callback's event, if it came
            hub.events.get_nowait()
        assert hub.watch(2, _target(bs)) is False
        refused = _next(hub, ConnectionEvent, key=2, connected=False, timeout=5)
        assert refused.error.startswith(f"libvirtd on {bs.name} is not answering")
    finally:
        bed.start_libvirtd(bs.index)
    assert hub.watch(2, _target(bs)) is True
    assert isinstance(hub.domains(2), list)

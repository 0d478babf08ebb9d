"""libvirt domains on a VM server: list, define, power actions, undefine.

Jobs and checks call these instead of the libvirt API so that libvirt's
numbers and exceptions stay here: states come back as :class:`DomainState`,
failures as :class:`~portal.vmm.errors.VmmError` naming the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

import libvirt

from .errors import VmmError
from .session import HostSession, Target, open_session

SHUTDOWN_PRESSES = 12  # ACPI power button presses ...
PRESS_INTERVAL = 10.0  # ... this many seconds apart

ACTIONS = ("start", "restore", "shutdown", "poweroff", "reboot", "pause", "resume", "save")


class DomainState(StrEnum):
    """What a domain is doing, in words; ``saved`` and ``undefined`` are Corral's, not libvirt's numbers."""

    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # shutting down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    SAVED = "saved"  # shut off with a managed save image
    UNDEFINED = "undefined"
    UNKNOWN = "unknown"


_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}

# what each action leaves the domain in
_RESULT = {
    "start": DomainState.RUNNING, "restore": DomainState.RUNNING, "reboot": DomainState.RUNNING,
    "resume": DomainState.RUNNING, "shutdown": DomainState.SHUTOFF, "poweroff": DomainState.SHUTOFF,
    "pause": DomainState.PAUSED, "save": DomainState.SAVED,
}


def state_from_libvirt(code: int) -> DomainState:
    """libvirt's ``virDomainState`` number in words (``unknown`` for numbers newer libvirts may add)."""
    return _STATES.get(code, DomainState.UNKNOWN)


def list_domains(conn: libvirt.virConnect) -> list[dict]:
    """Every domain on the connection as ``{"name", "uuid", "state"}`` with the state as a string."""
    out = []
    for dom in conn.listAllDomains():
        state, _reason = dom.state()
        out.append({"name": dom.name(), "uuid": dom.UUIDString(), "state": state_from_libvirt(state).value})
    return out


def listed_state(target: Target, name: str) -> str | None:
    """The domain's state on *target* as the poll lists it, or None when it is not defined there;
    VmmError when the server cannot be asked (for callers outside vmm, e.g. the checks)."""
    try:
        with open_session(target) as session:
            found = [d["state"] for d in list_domains(session.libvirt()) if d["name"] == name]
    except libvirt.libvirtError as exc:
        raise VmmError(f"listing the domains of {target.hostname} failed: {exc.get_error_message()}") from exc
    return found[0] if found else None


def _host(session: HostSession) -> str:
    return session.target.hostname


def lookup(session: HostSession, name: str) -> libvirt.virDomain:
    """The domain called *name*; a VmmError naming the server when it is not defined there."""
    try:
        return session.libvirt().lookupByName(name)
    except libvirt.libvirtError as exc:
        raise VmmError(f"{name} is not defined on {_host(session)}: {exc.get_error_message()}") from exc


def find(session: HostSession, name: str) -> libvirt.virDomain | None:
    """The domain called *name*, or None when the server has no such domain."""
    try:
        return session.libvirt().lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VmmError(f"looking up {name} on {_host(session)} failed: {exc.get_error_message()}") from exc


def state(session: HostSession, name: str) -> DomainState:
    """The domain's state, ``saved`` for a shut-off domain with a managed save image, ``undefined`` if absent."""
    dom = find(session, name)
    if dom is None:
        return DomainState.UNDEFINED
    found = state_from_libvirt(dom.state()[0])
    if found is DomainState.SHUTOFF and dom.hasManagedSaveImage():
        return DomainState.SAVED
    return found


def define(session: HostSession, xml: str) -> None:
    """Define (or redefine, same name and UUID) a domain from its XML."""
    try:
        session.libvirt().defineXML(xml)
    except libvirt.libvirtError as exc:
        raise VmmError(f"defining the VM on {_host(session)} failed: {exc.get_error_message()}") from exc


def power(session: HostSession, name: str, action: str, *, check: Callable[[], None] | None = None,
          log: Callable[[str], None] | None = None, presses: int = SHUTDOWN_PRESSES,
          interval: float = PRESS_INTERVAL) -> DomainState:
    """Carry out a power *action* on the domain and return the state it leaves it in.

    ``shutdown`` presses the ACPI power button every *interval* seconds, up to
    *presses* times, because a guest that is still booting misses the event.
    *check* is called while waiting and may raise to stop waiting (a cancelled job);
    *log* hears about each unanswered press.
    """
    if action not in _RESULT:
        raise VmmError(f"unknown power action {action!r}")
    dom = lookup(session, name)
    try:
        if action in ("start", "restore"):
            dom.create()  # a managed save image is restored automatically
        elif action == "shutdown":
            _shutdown(dom, name, check or (lambda: None), log or (lambda _m: None), presses, interval)
        elif action == "poweroff":
            dom.destroy()
        elif action == "reboot":
            dom.reboot()
        elif action == "pause":
            dom.suspend()
        elif action == "resume":
            dom.resume()
        else:  # save
            dom.managedSave()
    except libvirt.libvirtError as exc:
        raise VmmError(f"{action} of {name} failed on {_host(session)}: {exc.get_error_message()}") from exc
    return _RESULT[action]


def _shutdown(dom: libvirt.virDomain, name: str, check: Callable[[], None], log: Callable[[str], None],
              presses: int, interval: float) -> None:
    for attempt in range(presses):
        if not dom.isActive():
            return
        dom.shutdown()
        if _wait_shutoff(dom, interval, check):
            return
        log(f"No reaction to power button press {attempt + 1}; pressing again.")
    raise VmmError(f"{name} did not shut down within {presses * interval:g} s; use Power off.")


def _wait_shutoff(dom: libvirt.virDomain, timeout: float, check: Callable[[], None]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
            return True
        check()
        time.sleep(0.5)
    return dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF


def undefine(session: HostSession, name: str) -> bool:
    """Stop the domain if it runs and undefine it with its managed save image, NVRAM and
    checkpoint metadata (backups leave checkpoints; libvirt refuses to undefine past them).

    Returns False when there was no such domain (deleting is idempotent).
    """
    dom = find(session, name)
    if dom is None:
        return False
    try:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                          | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError as exc:
        raise VmmError(f"undefining {name} on {_host(session)} failed: {exc.get_error_message()}") from exc
    return True


def remove_serial_log(session: HostSession, log_path: str) -> None:
    session.run(["rm", "-f", "--", log_path], check=False)

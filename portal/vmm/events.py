"""Subscribe to libvirt domain lifecycle events on many servers.

:class:`EventHub` runs libvirt's default event loop in one thread, keeps a
connection per server with a lifecycle callback and keep-alives, notices
closed connections, and hands every event to the caller as a plain
:class:`DomainEvent` through a thread-safe queue. :meth:`EventHub.domains`
lists a watched server's domains over the same connection, so the caller
never touches libvirt.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import libvirt

from .domains import DomainState, list_domains
from .errors import LibvirtUnavailable, VmmError
from .loop import ensure_event_loop
from .session import Target, connect_libvirt

log = logging.getLogger(__name__)

# lifecycle event -> the state the domain is in afterwards
EVENT_STATE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: DomainState.UNDEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: DomainState.PMSUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: DomainState.CRASHED,
}


def event_state(event: int, detail: int) -> DomainState:
    """The state a lifecycle event leaves the domain in (a managed save is ``saved``)."""
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED:
        return DomainState.SAVED
    return EVENT_STATE.get(event, DomainState.UNKNOWN)


@dataclass(frozen=True)
class DomainEvent:
    key: int  # the caller's id for the server
    domain: str
    uuid: str
    state: DomainState
    at: float


@dataclass(frozen=True)
class BlockJobEvent:
    """A block job (e.g. LiveSync's mirror) of a domain changed: completed, failed, cancelled or ready."""

    key: int
    domain: str
    dev: str
    status: str  # "completed", "failed", "cancelled", "ready"
    at: float


BLOCK_JOB_STATUS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "cancelled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}


@dataclass(frozen=True)
class ConnectionEvent:
    key: int
    connected: bool
    error: str | None = None


class EventHub:
    def __init__(self) -> None:
        ensure_event_loop()
        self.events: queue.Queue = queue.Queue()
        self._conns: dict[int, libvirt.virConnect] = {}
        self._targets: dict[int, Target] = {}
        self._lock = threading.Lock()

    def watching(self) -> set[int]:
        with self._lock:
            return set(self._conns)

    def connection(self, key: int) -> libvirt.virConnect | None:
        with self._lock:
            return self._conns.get(key)

    def domains(self, key: int) -> list[dict] | None:
        """The watched server's domains (as :func:`~portal.vmm.domains.list_domains`);
        None when it is not watched. A connection that fails while listing is a VmmError."""
        conn = self.connection(key)
        if conn is None:
            return None
        try:
            return list_domains(conn)
        except libvirt.libvirtError as exc:
            raise VmmError(f"listing domains on {self._name(key)} failed: {exc.get_error_message()}") from exc

    def _name(self, key: int) -> str:
        with self._lock:
            target = self._targets.get(key)
        return target.hostname if target is not None else f"server {key}"

    def watch(self, key: int, target: Target) -> bool:
        """Connect and subscribe; False (and a ConnectionEvent) when the server does not answer."""
        try:
            conn = connect_libvirt(target)
        except LibvirtUnavailable as exc:
            self.events.put(ConnectionEvent(key, False, str(exc)))
            return False
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError:
            pass  # a connection without keep-alive support is still watched (close callback, prune_dead)

        def on_lifecycle(_conn, dom, event, detail, _opaque):
            self.events.put(DomainEvent(key, dom.name(), dom.UUIDString(), event_state(event, detail), time.time()))

        def on_close(_conn, reason, _opaque):
            self.events.put(ConnectionEvent(key, False, f"connection closed (reason {reason})"))
            with self._lock:
                if self._conns.get(key) is _conn:
                    del self._conns[key]

        def on_block_job(_conn, dom, disk, _type, status, _opaque):
            self.events.put(BlockJobEvent(key, dom.name(), disk, BLOCK_JOB_STATUS.get(status, str(status)),
                                          time.time()))

        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, on_block_job, None)
        try:
            conn.registerCloseCallback(on_close, None)
        except libvirt.libvirtError:
            pass
        with self._lock:
            old = self._conns.pop(key, None)
            self._conns[key] = conn
            self._targets[key] = target
        if old is not None:
            _close(old)
        self.events.put(ConnectionEvent(key, True))
        return True

    def unwatch(self, key: int) -> None:
        with self._lock:
            conn = self._conns.pop(key, None)
            self._targets.pop(key, None)
        if conn is not None:
            _close(conn)

    def prune_dead(self) -> list[int]:
        """Drop connections that died without a close callback; return their keys."""
        dead = []
        with self._lock:
            for key, conn in list(self._conns.items()):
                try:
                    alive = conn.isAlive()
                except libvirt.libvirtError:
                    alive = False
                if not alive:
                    dead.append(key)
                    del self._conns[key]
        return dead

    def close(self) -> None:
        for key in list(self.watching()):
            self.unwatch(key)


def _close(conn: libvirt.virConnect) -> None:
    """Close a watched connection; its event callbacks go with it."""
    try:
        conn.close()
    except libvirt.libvirtError:
        pass

"""Subscribe to libvirt domain lifecycle events on many servers.

:class:`EventHub` runs libvirt's default event loop in one thread, keeps a
connection per server with a lifecycle callback and keep-alives, notices
closed connections, and hands every event to the caller as a plain
:class:`DomainEvent` through a thread-safe queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import libvirt

from .errors import LibvirtUnavailable
from .loop import ensure_event_loop
from .session import Target, connect_libvirt

log = logging.getLogger(__name__)

# lifecycle event -> the state the domain is in afterwards
EVENT_STATE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "shutoff",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "running",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "running",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "shutoff",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


@dataclass(frozen=True)
class DomainEvent:
    key: int  # the caller's id for the server
    domain: str
    uuid: str
    state: str  # running, paused, shutoff, saved, crashed, shutdown, undefined, ...
    at: float


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
            pass  # the test driver has no keep-alive

        def on_lifecycle(_conn, dom, event, detail, _opaque):
            state = EVENT_STATE.get(event, "unknown")
            if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED:
                state = "saved"
            self.events.put(DomainEvent(key, dom.name(), dom.UUIDString(), state, time.time()))

        def on_close(_conn, reason, _opaque):
            self.events.put(ConnectionEvent(key, False, f"connection closed (reason {reason})"))
            with self._lock:
                if self._conns.get(key) is _conn:
                    del self._conns[key]

        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
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
    try:
        conn.domainEventDeregisterAny  # noqa: B018 - callbacks go with the connection
        conn.close()
    except libvirt.libvirtError:
        pass

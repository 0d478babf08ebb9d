"""The monitor process: libvirt events from every up server into the database.

Every few seconds it reconciles its subscriptions with the servers table
(new servers, servers marked down or deleted, connections that died). Each
lifecycle event updates the VM of that name on that server and the server's
domain list at once, so htmx panels polling once a second show the change.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import libvirt
from flask import Flask

from checks.check_vmm_host import list_domains

from . import monitoring, servers
from .extensions import db
from .models import VM, Server, ServerStatus, VMState, utcnow
from .vmm.events import ConnectionEvent, DomainEvent, EventHub
from .vmm.session import HostSession

log = logging.getLogger(__name__)


class _Conn(HostSession):
    """A HostSession around an existing libvirt connection (for list_domains)."""

    def __init__(self, target, conn):
        super().__init__(target)
        self._conn = conn

    def _run(self, *a, **k):  # pragma: no cover - never used for commands
        raise RuntimeError("no commands through the monitor")

    put = get = _run

    def close(self):
        pass  # the hub owns the connection


class Monitor:
    def __init__(self, app: Flask, *, refresh_seconds: float = 5.0):
        self.app = app
        self.refresh_seconds = refresh_seconds
        self.hub = EventHub()
        self.stop = threading.Event()
        self.events_applied = 0

    def reconcile(self) -> None:
        """Subscribe to up servers; drop marked-down and deleted ones; retry dead ones."""
        with self.app.app_context():
            rows = db.session.execute(
                db.select(Server).where(Server.status != ServerStatus.MARKED_DOWN.value)).scalars().all()
            wanted = {s.id: servers.target_for(s) for s in rows}
            db.session.rollback()
        self.hub.prune_dead()
        for key in self.hub.watching() - set(wanted):
            self.hub.unwatch(key)
        for key, target in wanted.items():
            if key not in self.hub.watching():
                if self.hub.watch(key, target):
                    self._refresh_domains(key, target)

    def _refresh_domains(self, key: int, target) -> None:
        conn = self.hub.connection(key)
        if conn is None:
            return
        try:
            domains = list_domains(_Conn(target, conn))
        except libvirt.libvirtError as exc:
            log.warning("listing domains on %s failed: %s", target.hostname, exc)
            return
        with self.app.app_context():
            server = db.session.get(Server, key)
            if server is None:
                return
            servers.set_domains(server, domains)
            monitoring.apply_domain_states(server, domains)
            db.session.commit()

    def apply(self, event) -> None:
        with self.app.app_context():
            server = db.session.get(Server, event.key)
            if server is None:
                return
            if isinstance(event, ConnectionEvent):
                if not event.connected:
                    server.last_error = event.error
                    db.session.commit()
                return
            servers.set_domains(server, self._domains_after(server, event))
            vm = db.session.execute(
                db.select(VM).where(VM.name == event.domain, VM.server_id == server.id)).scalar_one_or_none()
            if vm is not None and vm.state not in monitoring.TASK_OWNED:
                new = {"saved": VMState.SAVED, "undefined": VMState.OFF}.get(event.state) or \
                    monitoring.DOMAIN_TO_VM.get(event.state, VMState.UNKNOWN)
                if vm.state != new.value:
                    vm.state, vm.state_changed_at = new.value, utcnow()
            db.session.commit()
            self.events_applied += 1

    def _domains_after(self, server: Server, event: DomainEvent) -> list[dict]:
        """The server's domains now: listed afresh (a destroyed transient domain
        sends no "undefined" event), or patched from the event if listing fails."""
        conn = self.hub.connection(event.key)
        if conn is not None:
            try:
                return list_domains(_Conn(None, conn))
            except libvirt.libvirtError:
                pass
        domains = [d for d in server.domains if d["name"] != event.domain]
        if event.state != "undefined":
            domains.append({"name": event.domain, "uuid": event.uuid, "state": event.state})
        return domains

    def run(self, *, max_seconds: float | None = None) -> None:
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        next_reconcile = 0.0
        while not self.stop.is_set() and (deadline is None or time.monotonic() < deadline):
            now = time.monotonic()
            if now >= next_reconcile:
                try:
                    self.reconcile()
                except Exception:  # a database hiccup must not end monitoring
                    log.exception("reconciling subscriptions failed")
                next_reconcile = now + self.refresh_seconds
            try:
                event = self.hub.events.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if isinstance(event, DomainEvent | ConnectionEvent):
                    self.apply(event)
            except Exception:
                log.exception("applying %s failed", event)
        self.hub.close()

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

from flask import Flask

from . import metrics, monitoring, servers
from .extensions import db
from .models import VM, Server, ServerStatus, utcnow
from .vmm.domains import DomainState
from .vmm.errors import VmmError
from .livesync_watch import Watcher
from .ha import Witness
from .vmm.events import BlockJobEvent, ConnectionEvent, DomainEvent, EventHub

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, app: Flask, *, refresh_seconds: float = 5.0):
        self.app = app
        self.refresh_seconds = refresh_seconds
        self.hub = EventHub()
        self.stop = threading.Event()
        self.events_applied = 0
        self.livesync = Watcher(app)
        self.witness = Witness(app)

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
        with self.app.app_context():
            metrics.set_gauge("monitor_connections", len(self.hub.watching()))

    def _refresh_domains(self, key: int, target) -> None:
        try:
            domains = self.hub.domains(key)
        except VmmError as exc:
            log.warning("listing domains on %s failed: %s", target.hostname, exc)
            return
        if domains is None:
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
                new = monitoring.vm_state_for(event.state, vm.state)
                if vm.state != new.value:
                    vm.state, vm.state_changed_at = new.value, utcnow()
            db.session.commit()
            self.events_applied += 1

    def _domains_after(self, server: Server, event: DomainEvent) -> list[dict]:
        """The server's domains now: listed afresh (a destroyed transient domain
        sends no "undefined" event), or patched from the event if listing fails."""
        try:
            listed = self.hub.domains(event.key)
        except VmmError:
            listed = None
        if listed is not None:
            return listed
        domains = [d for d in server.domains if d["name"] != event.domain]
        if event.state != DomainState.UNDEFINED:
            domains.append({"name": event.domain, "uuid": event.uuid, "state": event.state})
        return domains

    def run(self, *, max_seconds: float | None = None) -> None:
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        next_reconcile = 0.0
        self.livesync.start()
        self.witness.start()
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
                elif isinstance(event, BlockJobEvent):
                    with self.app.app_context():
                        self.livesync.block_job(event)
            except Exception:
                log.exception("applying %s failed", event)
        self.livesync.stop.set()
        self.witness.stop.set()
        self.hub.close()

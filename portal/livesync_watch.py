"""The monitor's LiveSync watcher: keeps every protected VM's sync state current, within seconds.

Runs in its own thread of the monitor process (a stuck server must not hold up libvirt events).
Each round (every second) it reads the mirror jobs of every running protected VM on its primary,
one thread per primary server (a primary gone silent delays only its own VMs):

* progress of a sync -> "syncing N %" with bytes; every disk ready -> "in sync";
* the mirror gone (its job failed: the export died, its server reset the connection) -> "broken";
* a mirror that stopped moving with a guest write pending for ``STALL_SECONDS`` (the backup went
  silent: its writes, and so the guest's, would hang for good) -> "broken" is recorded and committed
  FIRST, then the mirror target is yanked so the guest writes on the primary alone;
* a broken copy whose backup server answers again -> a resync task (at most every ``RETRY_SECONDS``).

It never acts on a VM whose primary does not answer (that is failover's business, portal/ha.py), and
never marks a copy in sync unless every disk's mirror is in its ready phase.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from datetime import timedelta

from flask import Flask

from . import livesync, servers
from .extensions import db
from .models import (ACTIVE_TASK_STATES, VM, LiveSync, LiveSyncState, Server, ServerStatus, Task, TaskState, VMState,
                     utcnow)
from .vmm import livesync as ls_vmm
from .vmm.errors import VmmError
from .vmm.session import HostSession

log = logging.getLogger(__name__)

STALL_SECONDS = 4.0
RETRY_SECONDS = 10.0
FAILED_BACKOFF = timedelta(seconds=60)


class Watcher:
    def __init__(self, app: Flask, *, interval: float = 1.0):
        self.app = app
        self.interval = interval
        self.stop = threading.Event()
        self._sessions: dict[int, HostSession] = {}
        self._seen: dict[tuple[int, str], tuple[int, int, float]] = {}  # (vm, dev) -> (cur, end, since)
        self._retry_at: dict[int, float] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="livesync-check")
        self._checks: dict[int, concurrent.futures.Future] = {}  # server id -> its check under way
        self.rounds = 0

    # --- sessions -------------------------------------------------------------
    def _session(self, server: Server) -> HostSession:
        s = self._sessions.get(server.id)
        if s is None:
            s = self._sessions[server.id] = servers.session_for(server)
            ls_vmm.keep_alive(s)  # a primary that goes silent must not hang the watcher for good
        return s

    def _drop(self, server_id: int) -> None:
        s = self._sessions.pop(server_id, None)
        if s is not None:
            s.close()

    # --- one round --------------------------------------------------------------
    def round(self, *, wait: float | None = None) -> None:
        """Check every running protected VM, each primary server's VMs in their own thread, so a primary
        gone silent (its calls hang until the keep-alive gives up, ~20 s) delays only its own VMs. A
        server whose previous check still runs is skipped this round. Waits for the checks this round
        started, at most *wait* seconds (None: until they end)."""
        with self.app.app_context():
            rows = db.session.execute(
                db.select(VM).join(LiveSync).where(VM.state == VMState.RUNNING.value)).scalars().all()
            by_server: dict[int, list[int]] = {}
            for vm in rows:
                if livesync.protected(vm) and vm.server is not None and vm.server.status == ServerStatus.UP.value:
                    by_server.setdefault(vm.server_id, []).append(vm.id)
            db.session.rollback()
        started = []
        for server_id, vm_ids in by_server.items():
            running = self._checks.get(server_id)
            if running is not None and not running.done():
                continue  # that server is slow to answer: the others go on
            self._checks[server_id] = self._pool.submit(self._check_server, server_id, vm_ids)
            started.append(self._checks[server_id])
        if started:
            concurrent.futures.wait(started, timeout=wait)
        self.rounds += 1

    def _check_server(self, server_id: int, vm_ids: list[int]) -> None:
        with self.app.app_context():
            for vm_id in vm_ids:
                vm = db.session.get(VM, vm_id)
                if vm is None or vm.server_id != server_id or vm.state != VMState.RUNNING.value:
                    continue
                try:
                    self._check(vm)
                except VmmError as exc:
                    log.info("LiveSync watch of %s: %s", vm.name, exc)
                    self._drop(server_id)
                    db.session.rollback()
                    return  # the rest of this server's VMs next round, on a new connection
                except Exception:  # a database hiccup must not end watching
                    log.exception("LiveSync watch of %s failed", vm.name)
                    db.session.rollback()
            db.session.rollback()

    def _busy(self, vm: VM) -> bool:
        return db.session.execute(db.select(Task.id).where(
            Task.active_key == f"livesync:{vm.id}", Task.state.in_(ACTIVE_TASK_STATES))).first() is not None

    def _failed_lately(self, vm: VM) -> bool:
        """The last resync failed less than ``FAILED_BACKOFF`` ago: wait (no task every 10 s)."""
        last = db.session.execute(db.select(Task).where(
            Task.kind == "livesync-resync", Task.target_type == "vm", Task.target_id == vm.id)
            .order_by(Task.id.desc()).limit(1)).scalar_one_or_none()
        return (last is not None and last.state == TaskState.FAILED.value and last.finished_at is not None
                and utcnow() - last.finished_at < FAILED_BACKOFF)

    def _check(self, vm: VM) -> None:
        ls = vm.livesync
        state = ls.state
        if state in (LiveSyncState.BROKEN.value, LiveSyncState.UNPROTECTED.value):
            self._maybe_resync(vm)
            return
        if state not in (LiveSyncState.SYNCING.value, LiveSyncState.IN_SYNC.value):
            return
        primary = self._session(vm.server)
        jobs = ls_vmm.mirror_status(primary, vm.name)
        now = time.monotonic()
        if not jobs:
            # No mirror because the VM's QEMU is gone (crash, primary dying): the copy is as good as it
            # was; leave the row to failover (portal/ha.py), whose rule needs it in sync.
            if not ls_vmm.domain_active(primary, vm.name):
                return
            if not self._busy(vm):
                livesync.mark_broken(ls, f"the mirror to {vm.backup_server.hostname} stopped "
                                         "(the backup server or its export went away)")
                db.session.commit()
                log.warning("LiveSync of %s broken: mirror gone", vm.name)
            return
        stalled = []
        for j in jobs:
            key = (vm.id, j.dev)
            cur, _end, since = self._seen.get(key, (-1, -1, now))
            if j.cur != cur or j.cur >= j.end:
                since = now
            self._seen[key] = (j.cur, j.end, since)
            if j.cur < j.end and now - since >= STALL_SECONDS:
                stalled.append(j.dev)
        if stalled:
            # The replica is stale from now on: say so durably before touching the mirror.
            livesync.mark_broken(ls, f"{vm.backup_server.hostname} stopped answering "
                                     f"(writes to {', '.join(stalled)} stalled {STALL_SECONDS:g} s)")
            db.session.commit()
            log.warning("LiveSync of %s broken: backup silent; yanking the mirror", vm.name)
            ls_vmm.mirror_yank(primary, vm.name)
            self._retry_at[vm.id] = now + RETRY_SECONDS
            return
        total, done = sum(j.end for j in jobs), sum(j.cur for j in jobs)
        if len(jobs) == len(vm.vdisks) and all(j.ready for j in jobs):
            if state != LiveSyncState.IN_SYNC.value:
                livesync.mark_in_sync(ls, total)
                db.session.commit()
        elif state == LiveSyncState.SYNCING.value and (done, total) != (ls.bytes_done, ls.bytes_total):
            livesync.mark_syncing(ls, done, total)
            db.session.commit()

    def block_job(self, event) -> None:
        """libvirt says a mirror job failed or ended: a copy in sync or syncing is stale from now on
        (a stop Corral asked for marked it so already)."""
        if event.status not in ("failed", "completed", "cancelled"):
            return
        vm = db.session.execute(db.select(VM).where(VM.name == event.domain, VM.server_id == event.key)
                                ).scalar_one_or_none()
        if vm is None or vm.livesync is None or not livesync.protected(vm):
            return
        if vm.livesync.state in (LiveSyncState.IN_SYNC.value, LiveSyncState.SYNCING.value):
            livesync.mark_broken(vm.livesync, f"the mirror of {event.dev} to {vm.backup_server.hostname} "
                                              f"{event.status} (the backup server or its export went away)")
            db.session.commit()
            log.warning("LiveSync of %s broken: block job %s %s", vm.name, event.dev, event.status)

    def _maybe_resync(self, vm: VM) -> None:
        """A broken copy: resync once the backup server answers again (and no resync is under way)."""
        from .jobs.livesync import enqueue_resync

        now = time.monotonic()
        if now < self._retry_at.get(vm.id, 0) or self._busy(vm) or self._failed_lately(vm):
            return
        self._retry_at[vm.id] = now + RETRY_SECONDS
        backup = vm.backup_server
        if backup is None or backup.status == ServerStatus.MARKED_DOWN.value:
            return
        if not ls_vmm.port_open(backup.address, backup.ssh_port):
            return
        log.info("LiveSync of %s: %s answers; resyncing", vm.name, backup.hostname)
        enqueue_resync(vm, why="resync")

    def close(self) -> None:
        """Stop checking: the checks under way end first (one stuck on a silent server ends when its
        connection's keep-alive gives up), so nothing acts after this returns; then the connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for key in list(self._sessions):
            self._drop(key)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.round(wait=self.interval)
            except Exception:  # a database hiccup must not end watching
                log.exception("LiveSync watch round failed")
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        self.close()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="livesync-watch", daemon=True)
        t.start()
        return t


def poll_once(app: Flask) -> None:
    """One round from the periodic poll: states stay current (and resyncs start) without the monitor."""
    watcher = Watcher(app)
    try:
        watcher.round()
    finally:
        watcher.close()

"""The serial console of every running VM, read once and shown to any number of viewers.

A :class:`ConsoleFollower` (a thread in ``corral monitor``) follows the serial
log of each running VM: one reader thread per server, holding one session and
reading every followed log of that server with one command per tick, and
appending what is new to a bounded Redis buffer per VM. A viewer's htmx poll
reads that buffer in the request (one Redis round trip): no job, no SSH, so
the cost on the servers does not grow with the number of people watching.

The buffer is a Redis hash ``{data, offset, source}``; ``source`` names the
server and log file it came from, so a VM that moved (or a new VM that got a
deleted VM's id) never shows another log's lines.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis
from flask import Flask, current_app

from . import servers, vms
from .extensions import db, queues
from .models import VM, Server, ServerStatus, VMState
from .vmm import console as vmm_console
from .vmm.errors import VmmError
from .vmm.session import HostSession, Target, open_session

log = logging.getLogger(__name__)

BUFFER_BYTES = 8192  # what a viewer sees at most: the tail of the log
BUFFER_TTL = 7 * 24 * 3600  # a buffer nobody writes to any more (a VM off for a week) goes away
TICK_SECONDS = 1.0  # how often each followed log is read (viewers poll every 2 s)
ALIVE_TTL = 10  # seconds: the page says when no follower has been seen for that long
RETRY_TICKS = 5  # after a server failed to answer, ticks to wait before trying again
SWEEP_TICKS = 300  # how often buffers of deleted VMs are removed
FOLLOWED_STATES = (VMState.RUNNING.value, VMState.PAUSED.value, VMState.MIGRATING.value)


def buffer_key(prefix: str, vm_id: int | str) -> str:
    return f"{prefix}:console:{vm_id}"


def alive_key(prefix: str) -> str:
    return f"{prefix}:console-follower"


def source_of(vm: VM) -> str:
    return f"{vm.server_id}:{vms.serial_log_path(vm)}"


@dataclass(frozen=True)
class ConsoleView:
    text: str | None  # the log's tail; None when nothing was read for this VM yet
    follower_running: bool


def view(vm: VM) -> ConsoleView:
    """What a viewer sees: the VM's buffer, read in one Redis round trip."""
    prefix = current_app.config["QUEUE_PREFIX"]
    pipe = queues.redis.pipeline(transaction=False)
    pipe.hmget(buffer_key(prefix, vm.id), "data", "source")
    pipe.exists(alive_key(prefix))
    (data, source), alive = pipe.execute()
    if data is None or vm.server_id is None or source.decode() != source_of(vm):
        return ConsoleView(None, bool(alive))
    return ConsoleView(data.decode(errors="replace"), bool(alive))


# --- the follower (runs in ``corral monitor``) ------------------------------------

@dataclass
class _Log:
    """One followed serial log and what its buffer holds."""

    vm_id: int
    path: str
    source: str
    offset: int = 0
    data: bytes = b""


class _ServerReader(threading.Thread):
    """Reads the followed logs of one server every tick, on one session it keeps.

    A log the follower no longer wants (its VM stopped) is read once more, so
    the last lines the guest printed reach the buffer, then dropped. With
    nothing left to follow the reader ends.
    """

    def __init__(self, target: Target, store: _Store, tick: float, stop: threading.Event):
        super().__init__(name=f"console-{target.hostname}", daemon=True)
        self.target, self.store, self.tick, self.halt = target, store, tick, stop
        self._lock = threading.Lock()
        self._wanted: dict[int, tuple[str, str]] = {}  # vm id -> (log path, source)
        self._logs: dict[int, _Log] = {}
        self._session: HostSession | None = None
        self._pause = 0
        self._last_error: str | None = None
        self.finished = False

    def follow(self, logs: dict[int, tuple[str, str]]) -> bool:
        """Set what to follow; False when this reader has ended (start another)."""
        with self._lock:
            if self.finished:
                return False
            self._wanted = dict(logs)
            return True

    def following(self) -> set[int]:
        with self._lock:
            return set(self._logs) | set(self._wanted)

    def run(self) -> None:
        try:
            while not self.halt.is_set() and self._step():
                self.halt.wait(self.tick)
        finally:
            with self._lock:
                self.finished = True
            self._close()

    def _step(self) -> bool:
        """One tick; False when there is nothing left to follow."""
        with self._lock:
            wanted = self._wanted
            if not wanted and not self._logs:
                self.finished = True
                return False
        for vm_id, (path, source) in wanted.items():
            known = self._logs.get(vm_id)
            if known is None or known.source != source:
                self._logs[vm_id] = self.store.load(vm_id, path, source)
        if self._pause:  # the server failed lately: do not retry at every tick
            self._pause -= 1
        else:
            self._read(list(self._logs.values()))
        for vm_id in set(self._logs) - set(wanted):  # read a last time above; now let go
            del self._logs[vm_id]
        return True

    def _read(self, logs: list[_Log]) -> None:
        try:
            if self._session is None:
                self._session = open_session(self.target)
            chunks = vmm_console.read_new(self._session, [(lg.path, lg.offset) for lg in logs], BUFFER_BYTES)
        except VmmError as exc:
            self._failed(str(exc))
            return
        if self._last_error is not None:
            log.info("reading serial logs on %s works again", self.target.hostname)
            self._last_error = None
        for lg, chunk in zip(logs, chunks):
            if chunk is not None and (chunk.data or chunk.offset != lg.offset):
                lg.data, lg.offset = (lg.data + chunk.data)[-BUFFER_BYTES:], chunk.offset
                self.store.save(lg)

    def _failed(self, message: str) -> None:
        if message != self._last_error:
            log.warning("reading serial logs on %s failed: %s", self.target.hostname, message)
        self._last_error = message
        self._pause = RETRY_TICKS
        self._close()

    def _close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


class _Store:
    """The Redis buffers (no Flask: readers run outside any app context)."""

    def __init__(self, client: redis.Redis, prefix: str):
        self.redis, self.prefix = client, prefix

    def load(self, vm_id: int, path: str, source: str) -> _Log:
        """Resume where an earlier follower stopped (same log), else start afresh."""
        data, offset, stored = self.redis.hmget(buffer_key(self.prefix, vm_id), "data", "offset", "source")
        if stored is not None and stored.decode() == source:
            return _Log(vm_id, path, source, int(offset), data or b"")
        return _Log(vm_id, path, source)

    def save(self, lg: _Log) -> None:
        key = buffer_key(self.prefix, lg.vm_id)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"data": lg.data, "offset": lg.offset, "source": lg.source})
        pipe.expire(key, BUFFER_TTL)
        pipe.execute()

    def sweep(self, existing: Callable[[set[int]], set[int]]) -> None:
        """Remove the buffers of VMs that no longer exist."""
        keys = {int(k.rsplit(b":", 1)[1]): k for k in self.redis.scan_iter(buffer_key(self.prefix, "*"), count=1000)
                if k.rsplit(b":", 1)[1].isdigit()}
        gone = set(keys) - existing(set(keys))
        if gone:
            self.redis.delete(*(keys[vm_id] for vm_id in gone))

    def alive(self) -> None:
        self.redis.set(alive_key(self.prefix), 1, ex=ALIVE_TTL)


class ConsoleFollower:
    """Keeps one reader per server with running VMs, in step with the database."""

    def __init__(self, app: Flask, *, tick: float = TICK_SECONDS, sweep_ticks: int = SWEEP_TICKS):
        self.app, self.tick, self.sweep_ticks = app, tick, sweep_ticks
        self.stop = threading.Event()
        with app.app_context():
            self.store = _Store(queues.redis, app.config["QUEUE_PREFIX"])
        self._readers: dict[int, _ServerReader] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> ConsoleFollower:
        self._thread = threading.Thread(target=self.run, name="console-follower", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5) -> None:
        self.stop.set()
        for thread in [self._thread, *list(self._readers.values())]:
            if thread is not None and thread.is_alive():
                thread.join(timeout)

    def run(self) -> None:
        ticks = 0
        while not self.stop.is_set():
            try:
                self.sync()
                if ticks % self.sweep_ticks == 0:
                    self.store.sweep(self._existing)
            except Exception:  # a database or Redis hiccup must not end following
                log.exception("following serial consoles failed")
            ticks += 1
            self.stop.wait(self.tick)

    def following(self) -> set[int]:
        """Ids of the VMs whose logs are being read (for tests and diagnostics)."""
        return set().union(*(r.following() for r in list(self._readers.values()) if not r.finished))

    def sync(self) -> None:
        """Hand each server's reader the running VMs it should follow."""
        wanted = self._wanted()
        self.store.alive()
        for sid in set(self._readers) | set(wanted):
            target, logs = wanted.get(sid, (None, {}))
            reader = self._readers.get(sid)
            if reader is not None and reader.follow(logs):
                continue
            if target is None:  # nothing to follow there and its reader has ended
                self._readers.pop(sid, None)
                continue
            reader = _ServerReader(target, self.store, self.tick, self.stop)
            reader.follow(logs)
            self._readers[sid] = reader
            reader.start()

    def _wanted(self) -> dict[int, tuple[Target, dict[int, tuple[str, str]]]]:
        """Running VMs by server (servers marked down excepted): target and (log path, source) per VM."""
        with self.app.app_context():
            rows = db.session.execute(
                db.select(VM).join(Server, VM.server_id == Server.id)
                .where(VM.state.in_(FOLLOWED_STATES), Server.status != ServerStatus.MARKED_DOWN.value)
            ).scalars().all()
            wanted: dict[int, tuple[Target, dict[int, tuple[str, str]]]] = {}
            for vm in rows:
                _, logs = wanted.setdefault(vm.server_id, (servers.target_for(vm.server), {}))
                logs[vm.id] = (vms.serial_log_path(vm), source_of(vm))
            db.session.rollback()
        return wanted

    def _existing(self, vm_ids: set[int]) -> set[int]:
        with self.app.app_context():
            found = set(db.session.execute(db.select(VM.id).where(VM.id.in_(vm_ids))).scalars())
            db.session.rollback()
        return found

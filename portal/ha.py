"""LiveSync failover: the two-of-three rule (primary, backup, Corral) and the witness loop.

The witness runs in a thread of the monitor. About every ``HA_LEASE_INTERVAL_SECONDS`` it renews the
lease of every server that holds a protected VM or its copy by calling that server's agent
(portal/vmm/agent.py; installed over SSH when it does not answer or runs an old config), telling it
which protected domains run there. An agent that hears neither Corral nor any peer for
``HA_FENCE_AFTER_SECONDS`` destroys its protected domains itself (self-fencing).

A protected VM may start on its backup server only when every one of these holds (:func:`assess`):
the copy is in sync; Corral has not renewed the primary's lease for ``HA_TAKEOVER_SECONDS`` (and it
tried); the primary's sshd (the way Corral reaches its libvirtd) does not answer; the backup's agent
answers and has not heard the primary's agent for ``HA_TAKEOVER_SECONDS`` either; and the backup's
export has no live client. So Corral alone (its view) or the backup alone never decide, and Corral
being down decides nothing: nobody fails over, and a primary that hears its backup keeps running.

Mode "LiveSync + automatic failover" submits the failover job at once; mode "LiveSync" waits for the
operator's Power on (the VM page offers it), and the job applies the same rule again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import logging
import socket
import threading
import time
from dataclasses import dataclass

from flask import Flask, current_app

from . import servers, tasks
from .extensions import db
from .models import ACTIVE_TASK_STATES, VM, BackupMode, LiveSyncState, Server, ServerStatus, Task, VMState
from .vmm import domains, fence
from .vmm.errors import VmmError

log = logging.getLogger(__name__)


#: VM states in which a dead primary means the VM should run on its backup (not off, saved, moving).
FAILS_OVER = {VMState.RUNNING.value, VMState.PAUSED.value, VMState.UNKNOWN.value, VMState.CRASHED.value}


class FailoverRefused(Exception):
    """The two-of-three rule does not allow starting the VM on its backup (the message says why)."""


def _secret(*parts) -> str:
    key = str(current_app.config["SECRET_KEY"]).encode()
    return hmac.new(key, "/".join(["corral-agent", *map(str, parts)]).encode(), hashlib.sha256).hexdigest()


def protected_vms() -> list[VM]:
    return list(db.session.execute(
        db.select(VM).where(VM.backup_mode != BackupMode.NONE.value, VM.backup_server_id.is_not(None))).scalars())


def agent_config(server: Server, vms: list[VM]) -> fence.AgentConfig:
    """The agent's config for *server*: its secret, and one pair secret per server it pairs with."""
    cfg = current_app.config
    peers = sorted({(v.backup_server if v.server_id == server.id else v.server) for v in vms
                    if server.id in (v.server_id, v.backup_server_id)} - {None}, key=lambda s: s.id)
    return fence.AgentConfig(
        address=server.address, port=int(cfg["HA_AGENT_PORT"]), secret=_secret(server.id),
        fence_after=float(cfg["HA_FENCE_AFTER_SECONDS"]),
        peers=tuple((p.address, int(cfg["HA_AGENT_PORT"]), _secret(*sorted((server.id, p.id)))) for p in peers),
        libvirt_uri="qemu:///system")


def tcp_answers(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Facts:
    """What the witness knows about a VM's primary and backup at one moment."""
    lease_age: float  # seconds since Corral last renewed the primary's lease (tried all along)
    primary_ssh: bool  # the primary's sshd answers
    backup_answers: bool  # the backup's agent answered Corral just now
    backup_peer_age: float | None  # seconds since the backup's agent last heard the primary's (None: never)
    live_clients: int | None  # live NBD clients on the backup's export (None: not asked)


def assess(vm: VM, facts: Facts, takeover: float) -> str | None:
    """None when the VM may start on its backup now; otherwise the reason it may not."""
    ls = vm.livesync
    if ls is None or ls.state != LiveSyncState.IN_SYNC.value:
        return "its copy on the backup server is not in sync"
    if facts.lease_age < takeover:
        return f"Corral heard the primary's agent {facts.lease_age:.1f} s ago"
    if facts.primary_ssh:
        return "the primary server still answers SSH"
    if not facts.backup_answers:
        return "the backup server's agent does not answer"
    if facts.backup_peer_age is not None and facts.backup_peer_age < takeover:
        return f"the backup heard the primary {facts.backup_peer_age:.1f} s ago"
    if facts.live_clients is None or facts.live_clients > 0:
        return "the primary still writes to the backup's copy"
    return None


class Witness:
    """The monitor's lease loop and failover detection (one thread)."""

    def __init__(self, app: Flask):
        self.app = app
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.renewed: dict[int, float] = {}  # server id -> monotonic time of the last renewed lease
        self.answers: dict[int, dict] = {}  # server id -> the agent's last answer
        self.installed_at: dict[int, float] = {}
        self.marked_down: set[int] = set()
        self.checked: set[tuple[int, int, int]] = set()  # (server, vm, epoch) whose stale definition is gone
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lease")
        self.slow_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ha-slow")
        self._slow: concurrent.futures.Future | None = None
        self.rounds = 0

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="ha-witness", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        interval = float(self.app.config["HA_LEASE_INTERVAL_SECONDS"])
        while not self.stop.is_set():
            try:
                with self.app.app_context():
                    self.round()
            except Exception:  # a database hiccup must not end the witness
                log.exception("HA witness round failed")
            self.stop.wait(interval)
        self.pool.shutdown(wait=False)
        self.slow_pool.shutdown(wait=False)

    def lease_age(self, server_id: int) -> float:
        return time.monotonic() - self.renewed.get(server_id, self.started)

    def round(self) -> None:
        """Renew every lease (in parallel, bounded by the lease timeout), then hand the slow work
        (installing agents over SSH, undefining stale copies, deciding failovers) to a second thread:
        nothing slow may delay a lease, or a primary that hears nobody else would fence itself."""
        vms = protected_vms()
        involved = {s.id: s for v in vms for s in (v.server, v.backup_server)
                    if s is not None and s.status != ServerStatus.MARKED_DOWN.value}
        protect = {sid: sorted(v.name for v in vms if v.server_id == sid) for sid in involved}
        configs = {sid: agent_config(s, vms) for sid, s in involved.items()}
        futures = {sid: self.pool.submit(fence.lease, configs[sid], protect[sid]) for sid in involved}
        install = []
        for sid, fut in futures.items():
            try:
                answer = fut.result()
            except (OSError, ValueError):
                self.answers.pop(sid, None)
                install.append(sid)
                continue
            self.renewed[sid], self.answers[sid] = time.monotonic(), answer
            if answer.get("digest") != configs[sid].digest:
                install.append(sid)
        db.session.rollback()
        self.rounds += 1
        if self._slow is None or self._slow.done():
            self._slow = self.slow_pool.submit(self._slow_round, install)

    def _slow_round(self, install: list[int]) -> None:
        try:
            with self.app.app_context():
                self.slow_round(install)
        except Exception:  # a database hiccup must not end the witness
            log.exception("HA witness (slow part) failed")

    def slow_round(self, install: list[int]) -> None:
        vms = protected_vms()
        involved = {s.id: s for v in vms for s in (v.server, v.backup_server)
                    if s is not None and s.status != ServerStatus.MARKED_DOWN.value}
        for sid in install:
            if sid in involved:
                self._maybe_install(involved[sid], agent_config(involved[sid], vms))
        for vm in vms:
            if vm.backup_server_id in self.answers and vm.livesync is not None:
                self._undefine_stale(vm)
        takeover = float(self.app.config["HA_TAKEOVER_SECONDS"])
        self._mark(involved, takeover)
        db.session.commit()
        for vm in vms:
            if (vm.state in FAILS_OVER and vm.backup_mode == BackupMode.LIVESYNC_FAILOVER.value
                    and self.lease_age(vm.server_id) >= takeover and not _failover_active(vm)):
                reason = assess(vm, self.facts(vm), takeover)
                if reason is None:
                    log.warning("%s: primary %s is gone; failing over to %s", vm.name, vm.server.hostname,
                                vm.backup_server.hostname)
                    submit_failover(vm, requester_id=None, automatic=True)

    def facts(self, vm: VM) -> Facts:
        primary, backup = vm.server, vm.backup_server
        answer = self.answers.get(backup.id)
        peer_age = None
        if answer is not None:
            peer_age = (answer.get("peers") or {}).get(primary.address)
            if peer_age is None and answer.get("uptime", 0) < float(self.app.config["HA_TAKEOVER_SECONDS"]):
                peer_age = 0.0  # the backup's agent just started: it cannot tell yet
        return Facts(lease_age=self.lease_age(primary.id), primary_ssh=tcp_answers(primary.address, primary.ssh_port),
                     backup_answers=answer is not None, backup_peer_age=peer_age,
                     live_clients=backup_live_clients(vm))

    def _mark(self, involved: dict[int, Server], takeover: float) -> None:
        """A server whose agent and sshd are silent past the takeover time is down (the pages say so and
        offer the operator's Power on on the backup); it is up again once its lease is renewed."""
        for sid, server in involved.items():
            if sid in self.answers:
                if sid in self.marked_down and server.status == ServerStatus.DOWN.value:
                    server.status, server.last_error = ServerStatus.UP.value, None
                self.marked_down.discard(sid)
            elif (self.lease_age(sid) >= takeover and server.status == ServerStatus.UP.value
                  and not tcp_answers(server.address, server.ssh_port)):
                server.status = ServerStatus.DOWN.value
                server.last_error = f"its agent and sshd did not answer for {self.lease_age(sid):.0f} s"
                self.marked_down.add(sid)

    def _undefine_stale(self, vm: VM) -> None:
        """A failed-over VM's old primary answers again: undefine its stale, shut-off definition there (so
        nothing can start the stale copy), once per epoch. A running one is left to its agent's fencing."""
        key = (vm.backup_server_id, vm.id, vm.livesync.epoch)
        if key in self.checked or vm.livesync.epoch == 0:
            return
        db.session.rollback()  # read afresh: a failover may have committed since this round began
        if (vm.backup_server_id, vm.id, vm.livesync.epoch) != key or _failover_active(vm):
            return
        try:
            with servers.session_for(vm.backup_server) as s:
                state = domains.state(s, vm.name)
                if state == domains.DomainState.UNDEFINED:
                    pass
                elif state in (domains.DomainState.RUNNING, domains.DomainState.PAUSED):
                    return  # not stale after all (the rows moved meanwhile), or its agent fences it
                else:
                    domains.undefine(s, vm.name)
                    log.warning("%s: stale definition on %s undefined", vm.name, vm.backup_server.hostname)
        except VmmError as exc:
            log.warning("checking %s on %s failed: %s", vm.name, vm.backup_server.hostname, exc)
            return
        self.checked.add(key)

    def _maybe_install(self, server: Server, config: fence.AgentConfig) -> None:
        """(Re)install the agent where sshd answers, at most every 10 s per server."""
        now = time.monotonic()
        if now - self.installed_at.get(server.id, -1e9) < 10 or not tcp_answers(server.address, server.ssh_port):
            return
        self.installed_at[server.id] = now
        try:
            with servers.session_for(server) as s:
                fence.install(s, config)
            log.info("agent (re)started on %s", server.hostname)
        except Exception as exc:  # noqa: BLE001 (SSH layers raise more than VmmError) - tried again in 10 s
            log.warning("installing the agent on %s failed: %s", server.hostname, exc)


def backup_live_clients(vm: VM) -> int | None:
    from . import livesync

    quiet_ms = int(float(current_app.config["HA_FENCE_AFTER_SECONDS"]) * 1000)
    try:
        with servers.session_for(vm.backup_server) as s:
            return fence.live_clients(s, livesync.export_port(vm), quiet_ms)
    except VmmError:
        return None


def gather(vm: VM) -> Facts:
    """The facts fresh, outside the monitor (the failover job re-checks with these): the primary's
    lease counts as expired when its agent does not answer now and the backup's agent has not heard
    it for the takeover time."""
    cfg = current_app.config
    vms = protected_vms()
    primary_up = True
    try:
        fence.lease(agent_config(vm.server, vms), [vm.name])
    except (OSError, ValueError):
        primary_up = False
    try:
        answer = fence.lease(agent_config(vm.backup_server, vms), [])
    except (OSError, ValueError):
        answer = None
    takeover = float(cfg["HA_TAKEOVER_SECONDS"])
    peer_age = None if answer is None else (answer.get("peers") or {}).get(vm.server.address)
    if answer is not None and peer_age is None and answer.get("uptime", 0) < takeover:
        peer_age = 0.0  # the backup's agent just started: it cannot tell yet
    return Facts(lease_age=0.0 if primary_up else (peer_age if peer_age is not None else takeover),
                 primary_ssh=tcp_answers(vm.server.address, vm.server.ssh_port),
                 backup_answers=answer is not None, backup_peer_age=peer_age, live_clients=backup_live_clients(vm))


def _failover_active(vm: VM) -> bool:
    return db.session.execute(db.select(Task.id).where(
        Task.active_key == f"ha:{vm.id}", Task.state.in_(ACTIVE_TASK_STATES))).first() is not None


def operator_refusal(vm: VM) -> str | None:
    """Why the page offers no Power on on the backup (None: it does; the job checks the rule itself)."""
    ls = vm.livesync
    if vm.backup_mode == BackupMode.NONE.value or ls is None or vm.backup_server is None:
        return "it is not protected by LiveSync"
    if ls.state != LiveSyncState.IN_SYNC.value:
        return "its copy on the backup server is not in sync"
    if vm.server.status == ServerStatus.UP.value and vm.state == VMState.RUNNING.value:
        return f"its primary {vm.server.hostname} is up and runs it"
    if vm.state not in FAILS_OVER:
        return f"it is {vm.state}"
    return None


def submit_failover_task(vm: VM, *, requester_id: int | None, automatic: bool) -> tasks.Submitted:
    """Record the failover task (flushes; one at a time per VM, key ``ha:{id}``)."""
    from .jobs.ha import failover_vm

    return tasks.submit("ha-failover", failover_vm, title=f"Start {vm.name} on its backup {vm.backup_server.hostname}",
                        requester_id=requester_id, target=vm, key=f"ha:{vm.id}", args=(vm.id, automatic))


def submit_failover(vm: VM, *, requester_id: int | None, automatic: bool) -> tasks.Submitted:
    """From the witness: record, commit, enqueue the failover task."""
    sub = submit_failover_task(vm, requester_id=requester_id, automatic=automatic)
    db.session.commit()
    try:
        tasks.enqueue(sub)
    except tasks.QueueUnavailable:
        pass
    db.session.commit()
    return sub

"""LiveSync's rules: who may be a VM's backup server, where the copy lives, the sync states and what
they mean for pages, the summary and ``check_livesync``. Plain functions that flush; the edge commits.

The copy always flows from ``vm.server`` (where the VM runs) to ``vm.backup_server``. After a
failover (B's ``portal/ha.py``) the two are swapped and ``home_server_id`` keeps naming the VM's
designated primary: the VM then runs "on its H/A backup" until it fails back.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import datetime

from .extensions import db
from .models import VM, BackupMode, LiveSync, LiveSyncState, Server, ServerDisk, ServerStatus, VMState, utcnow
from .vmm.domain import DiskSpec, target_devs

PORT_BASE = 10800  # the export of VM n listens on PORT_BASE + its VMID

MODE_LABELS = {
    BackupMode.NONE.value: "No backup",
    BackupMode.LIVESYNC.value: "LiveSync (the operator starts it on the backup server)",
    BackupMode.LIVESYNC_FAILOVER.value: "LiveSync with automatic failover",
}


class LiveSyncError(Exception):
    """A protection setting that cannot be applied (the message says why; nothing changed)."""


def protected(vm: VM) -> bool:
    return vm.backup_mode != BackupMode.NONE.value and vm.backup_server_id is not None


def export_port(vm: VM) -> int:
    return PORT_BASE + vm.vmid


@dataclass(frozen=True)
class Candidate:
    server: Server
    eligible: bool
    reason: str  # why not, when not eligible


def backup_candidates(primary_id: int | None) -> list[Candidate]:
    """Every server, the ineligible ones with their reason (the primary; down; no VM disk)."""
    out = []
    for s in db.session.execute(db.select(Server).order_by(Server.hostname)).scalars():
        if s.id == primary_id:
            out.append(Candidate(s, False, "ineligible: the primary"))
        elif s.status != ServerStatus.UP.value:
            out.append(Candidate(s, False, f"ineligible: {s.status_enum.label}"))
        elif not s.disks:
            out.append(Candidate(s, False, "ineligible: no VM disk"))
        else:
            out.append(Candidate(s, True, ""))
    return out


def _backup_disk(vm: VM, server: Server) -> ServerDisk:
    """The same mountpoint as the primary's when the backup has it, else the disk with most free space."""
    same = [d for d in server.disks if vm.disk is not None and d.mountpoint == vm.disk.mountpoint]
    if same:
        return same[0]
    return max(server.disks, key=lambda d: d.free_gb or 0)


def set_protection(vm: VM, mode: str, backup_server_id: int | None) -> bool:
    """Record the VM's backup mode and server (flushes). Returns whether the data plane must change.

    Mode "none" leaves the VM unprotected (the copy is removed by the job). A backup server must be
    up, have a VM disk, and not be the VM's own server."""
    if mode not in MODE_LABELS:
        raise LiveSyncError(f"unknown backup mode {mode!r}")
    db.session.flush()  # a VM recorded in this transaction gets its ids
    if vm.state in (VMState.MIGRATING.value, VMState.DELETING.value):
        raise LiveSyncError(f"{vm.name} is {vm.state_enum.label}; change its protection when that ends.")
    if mode == BackupMode.NONE.value:
        changed = vm.backup_mode != mode
        vm.backup_mode = mode
        if vm.livesync is not None:
            vm.livesync.state = LiveSyncState.UNPROTECTED.value
        db.session.flush()
        return changed
    if vm.livesync is not None and vm.server_id != vm.livesync.home_server_id:
        raise LiveSyncError(f"{vm.name} runs on its backup server; fail it back or make this its primary first.")
    candidates = {c.server.id: c for c in backup_candidates(vm.server_id)}
    cand = candidates.get(backup_server_id or -1)
    if cand is None:
        raise LiveSyncError("choose a backup server for LiveSync")
    if not cand.eligible:
        raise LiveSyncError(f"{cand.server.hostname} cannot be the backup server ({cand.reason}).")
    changed = vm.backup_server_id != cand.server.id or not protected(vm)
    vm.backup_mode = mode
    vm.backup_server_id = cand.server.id
    vm.backup_disk_id = _backup_disk(vm, cand.server).id
    ls = vm.livesync
    if ls is None:
        ls = LiveSync(state=LiveSyncState.UNPROTECTED.value, epoch=0, progress_pct=0, bytes_done=0, bytes_total=0)
        db.session.add(ls)
        vm.livesync = ls
    ls.home_server_id = vm.server_id
    ls.export_port = export_port(vm)
    if changed:
        ls.state, ls.progress_pct, ls.bytes_done = LiveSyncState.UNPROTECTED.value, 0, 0
    ls.updated_at = utcnow()
    db.session.flush()
    return changed


# --- where the copies are ----------------------------------------------------------

def devs(vm: VM) -> list[str]:
    """The guest device of each disk (vda, vdb, sda, ...), as the domain definition names them."""
    return target_devs(tuple(DiskSpec(d.path or "", bus=d.bus, format=d.format) for d in vm.vdisks))


def copy_paths(vm: VM, disk: ServerDisk | None = None) -> list[tuple[str, str]]:
    """(dev, path) of each disk's copy on the backup server's disk (same layout as on the primary)."""
    from .vms import vm_dir

    disk = disk or vm.backup_disk
    folder = vm_dir(vm, disk)
    return [(dev, posixpath.join(folder, posixpath.basename(d.path))) for dev, d in zip(devs(vm), vm.vdisks)]


# --- state changes (flush) -----------------------------------------------------------

def mark_broken(ls: LiveSync, reason: str, *, at: datetime | None = None) -> None:
    """The copy is stale from now on (record this before anything else is done about it)."""
    if ls.state != LiveSyncState.BROKEN.value:
        ls.broken_since = at or utcnow()
    ls.state, ls.broken_reason, ls.updated_at = LiveSyncState.BROKEN.value, reason, utcnow()
    db.session.flush()


def mark_syncing(ls: LiveSync, done: int, total: int) -> None:
    if ls.state == LiveSyncState.IN_SYNC.value:
        return  # in sync stays in sync until something breaks it
    ls.state = LiveSyncState.SYNCING.value
    ls.bytes_done, ls.bytes_total = done, total
    ls.progress_pct = min(99, int(done * 100 / total)) if total else 0
    ls.updated_at = utcnow()
    db.session.flush()


def mark_in_sync(ls: LiveSync, total: int) -> None:
    ls.state, ls.progress_pct, ls.bytes_done, ls.bytes_total = LiveSyncState.IN_SYNC.value, 100, total, total
    ls.broken_since = ls.broken_reason = None
    ls.updated_at = utcnow()
    db.session.flush()


def mark_unprotected(ls: LiveSync, reason: str | None = None) -> None:
    ls.state, ls.progress_pct, ls.bytes_done = LiveSyncState.UNPROTECTED.value, 0, 0
    ls.broken_reason, ls.updated_at = reason, utcnow()
    db.session.flush()


def make_primary_here(vm: VM) -> None:
    """The server the VM runs on becomes its designated primary ("make the backup the new primary")."""
    ls = vm.livesync
    if ls is None or not protected(vm):
        raise LiveSyncError(f"{vm.name} is not protected by LiveSync.")
    if vm.server_id == ls.home_server_id:
        raise LiveSyncError(f"{vm.server.hostname} is {vm.name}'s primary already.")
    ls.home_server_id = vm.server_id
    ls.updated_at = utcnow()
    db.session.flush()


# --- what it means: one rule for pages, summary and check_livesync ---------------------

OK, WARNING, CRITICAL = "ok", "warning", "critical"


@dataclass(frozen=True)
class View:
    state: str  # LiveSyncState value, or "none" for a VM without backup mode
    level: str  # ok / warning / critical
    text: str  # "in sync", "syncing 42 % (1.2 of 3 GiB)", "broken since ... (reason)", "unprotected"
    pct: int
    bytes_done: int
    bytes_total: int
    on_backup: bool  # running on its H/A backup (not on its home server)
    home: str | None
    failback_ready: bool

    @property
    def relocate_text(self) -> str:
        if not self.on_backup:
            return ""
        if self.failback_ready:
            return f"Powered up on H/A backup VMM (ready to relocate back to primary VMM {self.home})"
        return f"Powered up on H/A backup VMM (not ready to relocate back to primary VMM {self.home})"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f}"


def view(vm: VM) -> View:
    ls = vm.livesync
    if not protected(vm) or ls is None:
        return View("none", OK, "not protected (no backup mode)", 0, 0, 0, False, None, False)
    home = ls.home_server.hostname if ls.home_server is not None else None
    on_backup = ls.home_server_id is not None and vm.server_id != ls.home_server_id
    state = ls.state
    ready = on_backup and state == LiveSyncState.IN_SYNC.value
    if state == LiveSyncState.IN_SYNC.value:
        text, level = f"in sync with {vm.backup_server.hostname}", OK
    elif state == LiveSyncState.SYNCING.value:
        text, level = (f"syncing {ls.progress_pct} % ({_gib(ls.bytes_done)} of {_gib(ls.bytes_total)} GiB) "
                       f"to {vm.backup_server.hostname}"), WARNING
    elif state == LiveSyncState.BROKEN.value:
        since = ls.broken_since.strftime("%Y-%m-%d %H:%M:%S UTC") if ls.broken_since else "?"
        text, level = f"broken since {since} ({ls.broken_reason or 'unknown reason'})", CRITICAL
    else:
        off = vm.state in (VMState.OFF.value, VMState.SAVED.value, VMState.PARTIAL.value)
        why = "the VM is off; the mirror starts when it runs" if off else (ls.broken_reason or "no mirror yet")
        text, level = f"unprotected ({why})", OK if off else CRITICAL
    if on_backup:
        level = CRITICAL
        text += f"; running on its backup server {vm.server.hostname}, not on its primary {home}"
    return View(state, level, text, ls.progress_pct, ls.bytes_done, ls.bytes_total, on_backup, home, ready)


@dataclass(frozen=True)
class Counts:
    protected: int = 0
    in_sync: int = 0
    syncing: int = 0
    broken: int = 0
    unprotected: int = 0
    on_backup: int = 0


def counts(vms: list[VM]) -> Counts:
    c = {"protected": 0, "in_sync": 0, "syncing": 0, "broken": 0, "unprotected": 0, "on_backup": 0}
    for vm in vms:
        if not protected(vm) or vm.livesync is None:
            continue
        c["protected"] += 1
        c[vm.livesync.state] += 1
        v = view(vm)
        c["on_backup"] += v.on_backup
    return Counts(**c)

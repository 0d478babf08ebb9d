"""Backups of a VM's disks into a backup store on a server disk, and restores from them.

A running domain is backed up with libvirt's backup API in push mode
(``backupBegin``): QEMU writes a crash-consistent copy of every writable
disk, as it was the moment the job began, while the guest keeps running.
Progress comes from ``jobStats()`` polled on the caller's thread; a cancel
calls ``abortJob()`` and removes what was written. Verified on libvirt 9.0 /
QEMU 7.2 with the bed's qemu.conf (no extra settings: libvirt drives QEMU
with ``-blockdev``, which push-mode backups need).

Incremental backups: when every disk is qcow2 v3 (``compat=1.1``, which can
hold persistent dirty bitmaps), each backup also creates a libvirt checkpoint
(one bitmap per disk). The next backup then copies only the clusters written
since that checkpoint, into a qcow2 file whose *backing file is the previous
backup's file*: reading the newest file of a chain gives the whole disk, so a
restore is one ``qemu-img convert`` and needs no merging. Only the newest
checkpoint is kept (older ones are deleted after each backup).

A domain that is off is backed up by ``qemu-img convert`` of each disk (its
backing chain flattened), verified with ``qemu-img compare``; such a copy is
always full and leaves the checkpoints alone (the disks did not change).

Restore (domain off) writes each disk from a backup file to a part file beside
the disk, compares it with the backup, then moves it over the disk; the
domain's checkpoints are forgotten (their bitmaps were in the replaced files).
"""

from __future__ import annotations

import json
import posixpath
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import libvirt

from . import domains, images
from .errors import CommandFailed, VmmError
from .migrate import copy_between, writable_disks
from .session import HostSession, Progress

POLL_SECONDS = 0.5
CHECKPOINT_PREFIX = "corral-"


class BackupError(VmmError):
    """A backup or restore did not happen (nothing partial was left)."""


class BackupAborted(BackupError):
    """The backup job was aborted on request; its files were removed."""


@dataclass(frozen=True)
class SourceDisk:
    """A writable disk of the domain: guest device, image path, format, virtual size."""

    target: str
    path: str
    format: str
    virtual_size: int
    qcow2_v3: bool


@dataclass(frozen=True)
class BackupFileInfo:
    target: str
    path: str
    virtual_size: int
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class BackupOutcome:
    files: list[BackupFileInfo]
    incremental: bool  # copied only what changed since ``parent files``
    checkpoint: str | None  # the checkpoint created (None: the disks cannot hold one)
    job_seconds: float | None = None  # libvirt's own elapsed time of the backup job

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


# --- inspecting -------------------------------------------------------------------

def _dom(session: HostSession, name: str) -> libvirt.virDomain:
    return domains.lookup(session, name)


def _fail(session: HostSession, what: str, exc: libvirt.libvirtError) -> BackupError:
    return BackupError(f"{what} on {session.target.hostname} failed: {exc.get_error_message()}")


def source_disks(session: HostSession, name: str) -> list[SourceDisk]:
    """The domain's writable file disks, in definition order (CD-ROMs excluded)."""
    dom = _dom(session, name)
    try:
        xml = dom.XMLDesc(0)
    except libvirt.libvirtError as exc:
        raise _fail(session, f"reading {name}'s definition", exc) from exc
    out = []
    for target, path in writable_disks(xml):
        data = json.loads(session.run(["qemu-img", "info", "--output=json", "-U", path], timeout=120).stdout)
        compat = (data.get("format-specific") or {}).get("data", {}).get("compat")
        out.append(SourceDisk(target, path, data["format"], int(data["virtual-size"]),
                              data["format"] == "qcow2" and compat == "1.1"))
    return out


def checkpoints(session: HostSession, name: str) -> list[str]:
    """The domain's checkpoint names, oldest first."""
    dom = _dom(session, name)
    try:
        found = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    except libvirt.libvirtError as exc:
        raise _fail(session, f"listing {name}'s checkpoints", exc) from exc
    return [c.getName() for c in found]


def checkpoint_name(backup_id: int) -> str:
    return f"{CHECKPOINT_PREFIX}{backup_id}-{secrets.token_hex(3)}"


def forget_checkpoints(session: HostSession, name: str, *, keep: str | None = None,
                       metadata_only: bool = False) -> None:
    """Delete the domain's checkpoints except ``keep``, oldest first.

    ``metadata_only`` when the bitmaps are gone already (the disks were
    replaced) or the domain is about to be undefined (libvirt refuses to
    undefine a domain that still has checkpoints).
    """
    dom = domains.find(session, name)
    if dom is None:
        return
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
    for cp_name in checkpoints(session, name):
        if cp_name == keep:
            continue
        try:
            dom.checkpointLookupByName(cp_name).delete(flags)
        except libvirt.libvirtError as exc:
            raise _fail(session, f"deleting checkpoint {cp_name} of {name}", exc) from exc


# --- backing up ----------------------------------------------------------------------

def _backup_xml(disks: list[SourceDisk], dests: dict[str, str], incremental_from: str | None) -> str:
    inc = f"<incremental>{incremental_from}</incremental>" if incremental_from else ""
    items = "".join(f"<disk name='{d.target}' backup='yes' type='file'><driver type='qcow2'/>"
                    f"<target file='{dests[d.target]}'/></disk>" for d in disks)
    return f"<domainbackup mode='push'>{inc}<disks>{items}</disks></domainbackup>"


def _checkpoint_xml(name: str, disks: list[SourceDisk]) -> str:
    items = "".join(f"<disk name='{d.target}' checkpoint='bitmap'/>" for d in disks)
    return f"<domaincheckpoint><name>{name}</name><disks>{items}</disks></domaincheckpoint>"


def _precreate(session: HostSession, disk: SourceDisk, dest: str, parent: str | None) -> None:
    """The push job's target. An incremental target names the previous backup's file as its backing
    file without opening it (``-u``): the parent may live on another server (the backup store), and
    libvirt gives QEMU the domain's own disk as the target's backing during the job anyway."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1"]
    if parent:
        argv += ["-u", "-b", parent, "-F", "qcow2"]
    session.run([*argv, dest, str(disk.virtual_size)], timeout=120)


def back_up_running(session: HostSession, name: str, folder: str, *, checkpoint: str | None,
                    parents: dict[str, str] | None = None, incremental_from: str | None = None,
                    progress: Progress | None = None, check: Callable[[], None] | None = None) -> BackupOutcome:
    """Push-mode backup of every writable disk of the running domain into ``folder``.

    ``incremental_from`` (a checkpoint of the domain) with ``parents``
    (target -> the previous backup's file of that disk) makes it incremental;
    ``checkpoint`` (None: no checkpoint) is created atomically with the
    backup's start. ``check`` may raise to stop (a cancelled task): the job is
    aborted and everything this call made is removed before the exception
    propagates, as after any failure.
    """
    disks = source_disks(session, name)
    if not disks:
        raise BackupError(f"{name} has no writable file disk to back up")
    dests = {d.target: posixpath.join(folder, f"{d.target}.qcow2") for d in disks}
    dom = _dom(session, name)
    began = False
    try:
        session.run(["mkdir", "-p", folder])
        for d in disks:
            _precreate(session, d, dests[d.target], (parents or {}).get(d.target) if incremental_from else None)
        try:
            dom.backupBegin(_backup_xml(disks, dests, incremental_from),
                            _checkpoint_xml(checkpoint, disks) if checkpoint else None,
                            libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        except libvirt.libvirtError as exc:
            raise _fail(session, f"starting the backup of {name}", exc) from exc
        began = True
        job_seconds = _follow(session, dom, name, progress, check or (lambda: None))
    except BaseException:
        if began:
            _abort(dom)
            if checkpoint:
                _delete_checkpoint(dom, checkpoint)
        session.run(["rm", "-rf", "--", folder], check=False)
        raise
    if checkpoint:
        forget_checkpoints(session, name, keep=checkpoint)
    return BackupOutcome(measure(session, {d.target: (dests[d.target], d.virtual_size) for d in disks}),
                         incremental=bool(incremental_from), checkpoint=checkpoint, job_seconds=job_seconds)


def _follow(session: HostSession, dom: libvirt.virDomain, name: str, progress: Progress | None,
            check: Callable[[], None]) -> float | None:
    """Poll the backup job until it ends; raise if it failed. Returns libvirt's elapsed seconds."""
    while True:
        check()
        try:
            stats = dom.jobStats()
        except libvirt.libvirtError as exc:
            raise _fail(session, f"reading the backup job of {name}", exc) from exc
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            break
        if progress and stats.get("disk_total"):
            progress(int(stats.get("disk_processed", 0)), int(stats["disk_total"]))
        time.sleep(POLL_SECONDS)
    try:
        done = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        done = {}
    if done.get("type") == libvirt.VIR_DOMAIN_JOB_FAILED or done.get("success") is False:
        raise BackupError(f"the backup of {name} on {session.target.hostname} failed: "
                          f"{done.get('errmsg') or 'libvirt gave no reason'}")
    if progress and done.get("disk_total") is not None:
        progress(int(done["disk_total"]), int(done["disk_total"]))
    return done["time_elapsed"] / 1000 if "time_elapsed" in done else None


def _abort(dom: libvirt.virDomain) -> None:
    """Abort the backup job and wait until QEMU has let go of the target files."""
    try:
        dom.abortJob()
    except libvirt.libvirtError:
        pass  # it ended meanwhile
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if dom.jobStats().get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
                return
        except libvirt.libvirtError:
            return
        time.sleep(0.2)


def _delete_checkpoint(dom: libvirt.virDomain, name: str) -> None:
    try:
        dom.checkpointLookupByName(name).delete(0)
    except libvirt.libvirtError:
        pass  # never created


def copy_stopped(session: HostSession, name: str, folder: str, *,
                 progress: Callable[[int, int], None] | None = None,
                 check: Callable[[], None] | None = None) -> BackupOutcome:
    """Full backup of a domain that is off: ``qemu-img convert`` per disk, compared with its source.

    ``progress`` hears (disks done, disks total). Removes ``folder`` on failure.
    """
    disks = source_disks(session, name)
    if not disks:
        raise BackupError(f"{name} has no writable file disk to back up")
    if domains.state(session, name) not in (domains.DomainState.SHUTOFF,):
        raise BackupError(f"{name} is not off on {session.target.hostname}; a copy needs it off (or running, "
                          "for a live backup)")
    dests = {d.target: posixpath.join(folder, f"{d.target}.qcow2") for d in disks}
    try:
        session.run(["mkdir", "-p", folder])
        for i, d in enumerate(disks):
            if progress:
                progress(i, len(disks))
            if check:
                check()
            session.run(["qemu-img", "convert", "-O", "qcow2", "-o", "compat=1.1", d.path, dests[d.target]],
                        timeout=6 * 3600)
            _compare(session, d.path, dests[d.target])
        if progress:
            progress(len(disks), len(disks))
    except BaseException:
        session.run(["rm", "-rf", "--", folder], check=False)
        raise
    return BackupOutcome(measure(session, {d.target: (dests[d.target], d.virtual_size) for d in disks}),
                         incremental=False, checkpoint=None)


def _compare(session: HostSession, a: str, b: str) -> None:
    try:
        session.run(["qemu-img", "compare", "-q", a, b], timeout=6 * 3600)
    except CommandFailed as exc:
        raise BackupError(f"{b} on {session.target.hostname} does not read the same as {a} "
                          f"(qemu-img compare exited {exc.code})") from exc


def measure(session: HostSession, files: dict[str, tuple[str, int]]) -> list[BackupFileInfo]:
    """Size and sha256 (computed on the server) of each backup file: target -> (path, virtual size)."""
    out = []
    for target, (path, vsize) in files.items():
        size = int(session.run(["stat", "-c", "%s", path]).stdout.strip())
        out.append(BackupFileInfo(target, path, vsize, size, session.sha256(path)))
    return out


def verify(session: HostSession, path: str, sha256: str) -> None:
    """Refuse a backup file whose content changed since it was written."""
    got = session.sha256(path)
    if got != sha256:
        raise BackupError(f"{path} on {session.target.hostname} no longer has the sha256 recorded for it "
                          f"({got[:12]}… instead of {sha256[:12]}…); it cannot be trusted")


# --- restoring ----------------------------------------------------------------------------

def restore(session: HostSession, name: str, pairs: list[tuple[str, str, str | None]], *,
            progress: Callable[[int, int], None] | None = None, check: Callable[[], None] | None = None) -> None:
    """Replace the disks of the domain (which must be off) from backup files.

    ``pairs``: (backup file, VM disk path, backing base of the VM disk or None).
    With a base (a clone), the restored disk is an overlay on that base
    holding only what differs from it. Each disk is written to a part file,
    compared with the backup, then moved over the VM's disk; the domain's
    checkpoints are forgotten afterwards (their bitmaps were in the old files).
    """
    state = domains.state(session, name)
    if state not in (domains.DomainState.SHUTOFF, domains.DomainState.UNDEFINED):
        raise BackupError(f"{name} is {state.value} on {session.target.hostname}; power it off to restore")
    parts = []
    try:
        for i, (src, disk, base) in enumerate(pairs):
            if progress:
                progress(i, len(pairs))
            if check:
                check()
            part = f"{disk}.restore-{secrets.token_hex(4)}"
            parts.append(part)
            fmt = images.info(session, disk).format if images.exists(session, disk) else "qcow2"
            argv = ["qemu-img", "convert", "-O", fmt]
            if base and images.exists(session, base):
                argv += ["-B", base, "-F", "qcow2"]
            session.run([*argv, src, part], timeout=6 * 3600)
            _compare(session, src, part)
        for (_src, disk, _base), part in zip(pairs, parts):
            session.run(["mv", "-f", part, disk])
    finally:
        session.run(["rm", "-f", "--", *parts], check=False)
    if progress:
        progress(len(pairs), len(pairs))
    if domains.find(session, name) is not None:
        forget_checkpoints(session, name, metadata_only=True)


# --- a backup store on another server ---------------------------------------------------------

def ship(source: HostSession, store: HostSession, staged: list[BackupFileInfo], folder: str, *,
         progress: Progress | None = None) -> list[BackupFileInfo]:
    """Move backup files written on the VM's server (a staging folder) into ``folder`` on the store
    server, each verified by sha256 on arrival; the staging folder is removed whatever happens, and
    on failure what reached the store too."""
    total = sum(f.size_bytes for f in staged) or 1
    done = 0
    out = []
    try:
        for f in staged:
            dst = posixpath.join(folder, posixpath.basename(f.path))
            digest = copy_between(source, store, f.path, dst, total=f.size_bytes,
                                  progress=(lambda n, _t, base=done: progress(base + n, total)) if progress else None)
            if digest != f.sha256:
                raise BackupError(f"{f.path} changed while it was copied to {store.target.hostname}")
            out.append(BackupFileInfo(f.target, dst, f.virtual_size, f.size_bytes, f.sha256))
            done += f.size_bytes
    except BaseException:
        store.run(["rm", "-rf", "--", folder], check=False)
        raise
    finally:
        for folder_on_source in {posixpath.dirname(f.path) for f in staged}:
            source.run(["rm", "-rf", "--", folder_on_source], check=False)
    return out


def fetch_flat(store: HostSession, target: HostSession, src: str, dst: str, *,
               progress: Progress | None = None) -> None:
    """Put a self-contained copy of the store's backup file ``src`` (an incremental read through the
    files it builds on) at ``dst`` on the VM's server, for a restore there; verified by sha256."""
    flat = f"{src}.flat-{secrets.token_hex(4)}"
    try:
        store.run(["qemu-img", "convert", "-O", "qcow2", src, flat], timeout=6 * 3600)
        copy_between(store, target, flat, dst, progress=progress)
    finally:
        store.run(["rm", "-f", "--", flat], check=False)


def remove(session: HostSession, folder: str, *, under: str) -> None:
    """Remove a backup's folder (or a VM's whole backup store), refusing anything outside ``under``."""
    images.remove_tree(session, folder, under=under)


def store_dir(mountpoint: str, vm_name: str) -> str:
    """Where a VM's backups live on a server disk."""
    return posixpath.join(mountpoint, "corral-backups", vm_name)

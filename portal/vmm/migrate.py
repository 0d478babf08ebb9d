"""Moving a domain between two servers: live migration and cold move.

Both follow the pre-copy protocol's rule: the source stays intact until the
target has committed. Live migration is client-driven (Corral holds a
libvirt connection to each server; QEMU streams memory, and with local disks
libvirt's NBD mirror streams the disks, straight from server to server). The
target's disk files are pre-created here with the source's format and virtual
size (libvirt would only create them inside a storage pool), so the copy
lands in the same layout. Progress comes from ``jobStats()`` polled on the
caller's thread while ``migrate3`` blocks on another; cancelling or running
past the time limit calls ``abortJob()``.

After any failure the source keeps running the VM and the target is cleaned:
any domain that appeared there is removed and the files made for the move are
deleted. When the target's libvirtd is not answering, its leftover incoming
QEMU (if one was started) is stopped through its pid file over SSH.

A cold move saves the running domain (managed save), copies its disks and the
save image to the target with a checksum check, defines it there and restores
it: the guest resumes where it was, without a reboot.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shlex
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

import libvirt

from . import domains, images
from .errors import LibvirtUnavailable, VmmError
from .session import HostSession, LocalSession, Progress

POLL_SECONDS = 0.5
CHUNK = 4 << 20


class MigrationError(VmmError):
    """A move did not happen; ``source_running`` says whether the VM still runs on the source."""

    def __init__(self, message: str, *, source_running: bool | None = None):
        super().__init__(message)
        self.source_running = source_running


class MigrationAborted(MigrationError):
    """The move was stopped on request or at its time limit (the VM stayed on the source)."""


@dataclass(frozen=True)
class MigrationOptions:
    """How to migrate. ``storage``: ``local`` copies the disks along, ``shared``
    moves memory only (``unsafe`` is allowed only for storage Corral verified
    as shared: libvirt cannot see that a bind-mounted directory is shared)."""

    storage: str = "local"
    incremental: bool = False  # NON_SHARED_INC: the backing bases are on the target already
    bandwidth_mibs: int = 0  # 0: unlimited
    max_downtime_ms: int = 300
    auto_converge: bool = True
    time_limit_s: float = 0  # 0: no limit
    unsafe: bool = False
    dest_xml: str | None = None  # the domain with target paths (when they differ)

    def flags(self) -> int:
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
                 | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
        if self.storage == "local":
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC if self.incremental else libvirt.VIR_MIGRATE_NON_SHARED_DISK
            # The mirror waits for the target on every guest write: it converges under write load.
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
        elif self.storage != "shared":
            raise ValueError(f"unknown storage mode {self.storage!r}")
        if self.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if self.unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        return flags

    def params(self) -> dict:
        params: dict = {}
        if self.bandwidth_mibs:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(self.bandwidth_mibs)
        if self.dest_xml:
            params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = self.dest_xml
            params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = self.dest_xml
        return params


@dataclass(frozen=True)
class JobProgress:
    """One reading of libvirt's job statistics for a running migration."""

    elapsed_ms: int = 0
    data_total: int = 0
    data_processed: int = 0
    data_remaining: int = 0
    memory_total: int = 0
    memory_remaining: int = 0
    disk_total: int = 0
    disk_remaining: int = 0
    iteration: int = 0
    dirty_rate: int = 0  # pages per second
    expected_downtime_ms: int | None = None

    @classmethod
    def from_stats(cls, s: dict) -> JobProgress:
        return cls(elapsed_ms=int(s.get("time_elapsed", 0)), data_total=int(s.get("data_total", 0)),
                   data_processed=int(s.get("data_processed", 0)), data_remaining=int(s.get("data_remaining", 0)),
                   memory_total=int(s.get("memory_total", 0)), memory_remaining=int(s.get("memory_remaining", 0)),
                   disk_total=int(s.get("disk_total", 0)), disk_remaining=int(s.get("disk_remaining", 0)),
                   iteration=int(s.get("memory_iteration", 0)), dirty_rate=int(s.get("memory_dirty_rate", 0)),
                   expected_downtime_ms=int(s["downtime"]) if "downtime" in s else None)

    def describe(self) -> str:
        mib = 1 << 20
        parts = [f"memory {self.memory_remaining / mib:.0f} MiB left"]
        if self.disk_total:
            parts.append(f"disk {self.disk_remaining / mib:.0f} of {self.disk_total / mib:.0f} MiB left")
        parts.append(f"{self.data_processed / mib:.0f} MiB sent")
        if self.iteration:
            parts.append(f"iteration {self.iteration}")
        parts.append(f"dirty rate {self.dirty_rate} pages/s")
        if self.expected_downtime_ms is not None:
            parts.append(f"expected downtime {self.expected_downtime_ms} ms")
        return ", ".join(parts)


@dataclass(frozen=True)
class MigrationResult:
    elapsed_ms: int | None
    downtime_ms: int | None
    data_transferred: int | None
    seconds: float  # wall time of the whole call, as Corral saw it


@dataclass(frozen=True)
class DiskImage:
    """One disk of the domain as it is on the source."""

    target: str  # vda, sdb, ...
    path: str
    format: str
    virtual_size: int
    backing: str | None
    backing_format: str | None = None
    allocated: int = 0  # bytes the image takes on the source: what the copy writes on the target


@dataclass
class PreparedTarget:
    """What Corral made on the target for a move (removed again when the move fails)."""

    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)


# --- connections ------------------------------------------------------------------------

def connect(*sessions: HostSession) -> None:
    """Open every session's SSH and libvirt connections at once, in parallel (each takes a few
    hundred ms over ssh; a move needs all of them). Failures surface on first use."""
    def warm(fn) -> None:
        try:
            fn()
        except (VmmError, libvirt.libvirtError):
            pass  # the step that needs it says what went wrong

    calls = [f for s in sessions for f in (s.libvirt, lambda s=s: s.run(["true"], check=False, timeout=30))]
    threads = [threading.Thread(target=warm, args=(f,), daemon=True) for f in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


# --- inspecting the domain ------------------------------------------------------------

def _domain_xml(session: HostSession, name: str, flags: int = 0) -> str:
    dom = domains.lookup(session, name)
    try:
        return dom.XMLDesc(flags)
    except libvirt.libvirtError as exc:
        raise VmmError(f"reading {name}'s definition on {session.target.hostname} failed: "
                       f"{exc.get_error_message()}") from exc


def migratable_xml(session: HostSession, name: str) -> str:
    """The domain's persistent definition as libvirt would send it to another host."""
    return _domain_xml(session, name, libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE
                       | libvirt.VIR_DOMAIN_XML_SECURE)


def writable_disks(xml: str) -> list[tuple[str, str]]:
    """(target dev, file path) of the domain's writable file disks (CD-ROMs and read-only disks excluded)."""
    out = []
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        source, target = disk.find("source"), disk.find("target")
        if source is not None and source.get("file") and target is not None:
            out.append((target.get("dev"), source.get("file")))
    return out


def disk_paths(session: HostSession, name: str) -> list[str]:
    """The file paths of the domain's writable disks, in the order of its definition."""
    return [path for _dev, path in writable_disks(_domain_xml(session, name, libvirt.VIR_DOMAIN_XML_INACTIVE))]


def abort_orphaned_job(session: HostSession, name: str) -> bool:
    """Abort a job (a migration) libvirt still runs for the domain although the client that
    started it is gone; True when there was one (the domain settles once libvirt ends it)."""
    dom = domains.find(session, name)
    try:
        if dom is None or not dom.isActive():
            return False
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False  # an incoming domain libvirt tore down meanwhile
        raise MigrationError(f"reading {name} on {session.target.hostname} failed: {exc.get_error_message()}") \
            from exc
    reading = _job_progress(dom)
    if reading is None:
        return False
    _abort(dom)
    return True


def remove_leftovers(session: HostSession, name: str, folders: list[tuple[str, str]]) -> list[str]:
    """After an interrupted move, on a server that must not have the VM: undefine a domain of that
    name that does not run, and remove each (folder, VM disk mountpoint) that exists. Returns what
    was removed, in words."""
    removed = []
    dom = domains.find(session, name)
    try:
        active = dom is not None and dom.isActive()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise MigrationError(f"reading {name} on {session.target.hostname} failed: {exc.get_error_message()}") \
                from exc
        dom = None  # an incoming domain libvirt was tearing down: gone now
    if dom is not None:
        if active:
            raise MigrationError(f"{name} runs on {session.target.hostname}: nothing removed there.")
        domains.undefine(session, name)
        removed.append(f"the definition of {name}")
    for folder, mountpoint in folders:
        if images.exists(session, folder):
            images.remove_tree(session, folder, under=mountpoint)
            removed.append(folder)
    return removed


def inspect_disks(session: HostSession, name: str) -> list[DiskImage]:
    """The running domain's writable disks with format, virtual size and backing file."""
    out = []
    for dev, path in writable_disks(_domain_xml(session, name)):
        found = images.info(session, path)
        out.append(DiskImage(dev, path, found.format, found.virtual_size, found.backing,
                             "qcow2" if found.backing else None, found.actual_size))
    return out


def retarget_xml(xml: str, paths: dict[str, str]) -> str:
    """The definition with disk and CD-ROM file paths replaced (old path -> new path)."""
    root = ET.fromstring(xml)
    for source in root.findall("./devices/disk/source"):
        if source.get("file") in paths:
            source.set("file", paths[source.get("file")])
    return ET.tostring(root, encoding="unicode")


def check_cpu(target: HostSession, xml: str) -> str:
    """Raise unless the target can run the domain's CPU; return a sentence saying why it can.

    Under TCG (``<domain type='qemu'>``) the guest's CPU is emulated (Corral
    defines such guests with ``qemu64``), so any server runs it; with KVM the
    target's hypervisor compares the domain's CPU definition.
    """
    root = ET.fromstring(xml)
    virt_type = root.get("type", "kvm")
    cpu = root.find("cpu")
    model = cpu.findtext("model") if cpu is not None else None
    if virt_type == "qemu":
        return f"CPU {model or 'default'} is emulated (TCG): every server runs it."
    if cpu is None or cpu.get("mode") in ("host-passthrough", "maximum"):
        return "CPU is the host's own: assumed identical servers (libvirt cannot compare it)."
    os_type = root.find("./os/type")
    try:
        result = target.libvirt().compareHypervisorCPU(
            None, os_type.get("arch") if os_type is not None else None,
            os_type.get("machine") if os_type is not None else None, virt_type, ET.tostring(cpu, encoding="unicode"),
            0)
    except libvirt.libvirtError as exc:
        raise MigrationError(f"{target.target.hostname} cannot compare the VM's CPU: {exc.get_error_message()}") \
            from exc
    if result == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
        raise MigrationError(f"{target.target.hostname}'s CPU cannot run the VM's CPU model {model or ''}".strip())
    return f"CPU {model or cpu.get('mode')} is supported by {target.target.hostname}."


def check_bridges(target: HostSession, xml: str) -> None:
    """Raise unless every host bridge and libvirt network the domain's NICs use exists on the target."""
    root = ET.fromstring(xml)
    missing = []
    for iface in root.findall("./devices/interface"):
        source = iface.find("source")
        if source is None:
            continue
        if iface.get("type") == "bridge" and source.get("bridge"):
            bridge = source.get("bridge")
            if not target.run(["test", "-d", f"/sys/class/net/{bridge}/bridge"], check=False).ok:
                missing.append(f"bridge {bridge}")
        elif iface.get("type") == "network" and source.get("network"):
            try:
                if not target.libvirt().networkLookupByName(source.get("network")).isActive():
                    missing.append(f"network {source.get('network')} (inactive)")
            except libvirt.libvirtError:
                missing.append(f"network {source.get('network')}")
    if missing:
        raise MigrationError(f"{target.target.hostname} lacks {', '.join(missing)}.")


# --- the target's files -----------------------------------------------------------------

def make_dir(target: HostSession, folder: str, prepared: PreparedTarget) -> None:
    """Create *folder* on the target if missing, remembering it for the cleanup after a failure."""
    if not images.exists(target, folder):
        target.run(["mkdir", "-p", folder])
        prepared.dirs.append(folder)


SPACE_MARGIN = 1.1  # the copy may take a little more than the source's allocation (qcow2 metadata)


def free_bytes(session: HostSession, path: str) -> int:
    """Free bytes on the filesystem that holds *path* (or its nearest existing parent folder)."""
    script = 'p=$1; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; df -P -B1 -- "$p" | tail -n 1'
    fields = session.run(["sh", "-c", script, "free", path], timeout=30).stdout.split()
    return int(fields[3])


def check_space(target: HostSession, disks: list[DiskImage], paths: dict[str, str]) -> None:
    """Refuse a move whose disk copies do not fit on the target, before anything is made there.

    A copy that runs out of space mid-migration is worse than a refusal: with the synchronous
    mirror, QEMU 7.2 stops the source's guest when the target's write fails (seen on the bed)."""
    need: dict[str, int] = {}
    for d in disks:
        folder = posixpath.dirname(paths.get(d.path, d.path))
        need[folder] = need.get(folder, 0) + int(d.allocated * SPACE_MARGIN)
    for folder, wanted in need.items():
        free = free_bytes(target, folder)
        if free < wanted:
            mib = 1 << 20
            raise MigrationError(f"{target.target.hostname} has {free / mib:.0f} MiB free for {folder}; the VM's "
                                 f"disks need {wanted / mib:.0f} MiB there. Nothing was moved.", source_running=True)


def precreate_disks(target: HostSession, disks: list[DiskImage], paths: dict[str, str], *,
                    incremental: bool, prepared: PreparedTarget) -> None:
    """Create each destination disk with the source's format and virtual size (an overlay on the
    same base when *incremental*), once :func:`check_space` found room for the copies; refuse to
    touch a file that is there already."""
    check_space(target, disks, paths)
    for d in disks:
        path = paths.get(d.path, d.path)
        if images.exists(target, path):
            raise MigrationError(f"{path} exists on {target.target.hostname} already; refusing to overwrite it.",
                                 source_running=True)
        make_dir(target, posixpath.dirname(path), prepared)
        argv = ["qemu-img", "create", "-q", "-f", d.format]
        if incremental and d.backing:
            argv += ["-b", paths.get(d.backing, d.backing), "-F", d.backing_format or "qcow2"]
        prepared.files.append(path)
        target.run([*argv, path, str(d.virtual_size)], timeout=120)


def remove_prepared(target: HostSession, prepared: PreparedTarget) -> None:
    """Delete what :func:`precreate_disks` or a copy made (files, then the folders it created, if empty)."""
    if prepared.files:
        target.run(["rm", "-f", "--", *prepared.files], check=False)
    for folder in reversed(prepared.dirs):
        target.run(["rmdir", "--ignore-fail-on-non-empty", folder], check=False)


def _reader(session: HostSession, path: str) -> subprocess.Popen:
    return _pipe(session, ["cat", "--", path], stdout=True)


def _writer(session: HostSession, path: str) -> subprocess.Popen:
    return _pipe(session, ["sh", "-c", 'cat > "$1"', "write", path], stdout=False)


def _pipe(session: HostSession, argv: list[str], *, stdout: bool) -> subprocess.Popen:
    if isinstance(session, LocalSession):
        full = argv
    else:
        t = session.target
        if not t.ssh_command:
            raise VmmError(f"{t.hostname}: copying between servers needs Corral's ssh wrapper")
        full = [t.ssh_command, "-i", t.key_file or "/dev/null", "-p", str(t.port),
                "-o", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com",
                "-o", "Compression=no", f"root@{t.address}", shlex.join(argv)]
    return subprocess.Popen(full, stdin=None if stdout else subprocess.PIPE,
                            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=subprocess.PIPE)


def copy_between(source: HostSession, target: HostSession, src_path: str, dst_path: str, *,
                 progress: Progress | None = None, total: int | None = None,
                 prepared: PreparedTarget | None = None) -> str:
    """Stream a file from one server to another through Corral (two SSH streams), hashing it on
    the way; the target's sha256 of what it wrote must match. Written to a part file and moved
    into place. Returns the sha256. Each copy has its own part file: two moves caching one base at
    once (an evacuation) both succeed, the second replacing the first's identical file."""
    part = f"{dst_path}.part-{os.getpid()}-{threading.get_ident()}"
    target.run(["mkdir", "-p", posixpath.dirname(dst_path)])
    if prepared is not None:
        prepared.files += [part, dst_path]
    if total is None:
        total = int(source.run(["stat", "-c", "%s", src_path]).stdout.strip())
    h = hashlib.sha256()
    done = 0
    reader, writer = _reader(source, src_path), _writer(target, part)
    try:
        while chunk := reader.stdout.read(CHUNK):
            writer.stdin.write(chunk)
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
        writer.stdin.close()
        if reader.wait(timeout=60) != 0:
            raise VmmError(f"reading {source.target.hostname}:{src_path} failed: "
                           f"{reader.stderr.read().decode(errors='replace').strip()}")
        if writer.wait(timeout=600) != 0:
            raise VmmError(f"writing {target.target.hostname}:{dst_path} failed: "
                           f"{writer.stderr.read().decode(errors='replace').strip()}")
    except BaseException:
        for proc in (reader, writer):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        target.run(["rm", "-f", part], check=False)
        raise
    finally:
        for proc in (reader, writer):
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    digest = h.hexdigest()
    got = target.sha256(part)
    if got != digest:
        target.run(["rm", "-f", part], check=False)
        raise images.ImageError(f"checksum mismatch copying {src_path} to {target.target.hostname}: "
                                f"sent {digest[:12]}…, it wrote {got[:12]}…")
    target.run(["mv", "-f", part, dst_path])
    return digest


def ensure_cached(source: HostSession, target: HostSession, src_path: str, dst_path: str, *,
                  progress: Progress | None = None, prepared: PreparedTarget | None = None) -> bool:
    """Put a shared read-only file (a clone's base, an ISO) on the target unless it is there; True if
    copied (then it is in *prepared*: a failed move removes it again)."""
    if images.exists(target, dst_path):
        return False
    copy_between(source, target, src_path, dst_path, progress=progress, prepared=prepared)
    target.run(["chmod", "0444", dst_path])
    return True


# --- live migration ------------------------------------------------------------------------

def live_migrate(source: HostSession, target: HostSession, name: str, opts: MigrationOptions, *,
                 on_progress: Callable[[JobProgress], None] | None = None,
                 check: Callable[[], None] | None = None,
                 prepared: PreparedTarget | None = None) -> MigrationResult:
    """Migrate the running domain *name*; return once the target runs it and the source has let go.

    *check* is called between polls and may raise (a cancelled task): the job
    is aborted, the target cleaned and the exception re-raised. Any failure
    leaves the domain running on the source and raises :class:`MigrationError`
    (the target's leftovers, including *prepared* files, are removed).
    """
    prepared = prepared or PreparedTarget()
    started = time.monotonic()
    dom = domains.lookup(source, name)
    dconn = target.libvirt()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["domain"] = dom.migrate3(dconn, opts.params(), opts.flags())
        except libvirt.libvirtError as exc:
            outcome["error"] = exc
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    try:
        if opts.max_downtime_ms:
            dom.migrateSetMaxDowntime(int(opts.max_downtime_ms), 0)
    except libvirt.libvirtError as exc:
        raise MigrationError(f"setting the maximum downtime failed: {exc.get_error_message()}",
                             source_running=True) from exc
    thread = threading.Thread(target=run, name=f"migrate-{name}", daemon=True)
    thread.start()
    stop: BaseException | None = None
    try:
        while thread.is_alive():
            thread.join(POLL_SECONDS)
            if not thread.is_alive():
                break
            if on_progress is not None:
                reading = _job_progress(dom)
                if reading is not None:
                    on_progress(reading)
            if check is not None:
                check()
            if opts.time_limit_s and time.monotonic() - started > opts.time_limit_s:
                raise MigrationAborted(f"{name} did not finish migrating within {opts.time_limit_s:g} s; "
                                       "the migration was aborted (raise the time limit or the bandwidth, or "
                                       "enable auto-converge).", source_running=True)
    except BaseException as exc:
        stop = exc
        _abort(dom)
        thread.join(120)
    if stop is None and "error" not in outcome:
        ddom = outcome["domain"]
        try:
            running = ddom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        except libvirt.libvirtError:
            running = False
        if running:
            return _result(ddom, started)
        outcome["error"] = MigrationError(f"{name} arrived on {target.target.hostname} but is not running there")
    error = stop or outcome["error"]
    if _moved_anyway(source, target, name):
        # libvirt reported a failure after the target committed (e.g. in the confirm phase).
        return MigrationResult(None, None, None, time.monotonic() - started)
    running = _source_running(source, name)
    cleanup_target(target, name, prepared, source_has_it=running)
    if isinstance(error, MigrationError):
        error.source_running = running
        raise error
    if isinstance(error, libvirt.libvirtError):
        raise MigrationError(f"migrating {name} to {target.target.hostname} failed: {error.get_error_message()}",
                             source_running=running) from error
    raise error


def _job_progress(dom: libvirt.virDomain) -> JobProgress | None:
    try:
        stats = dom.jobStats()
    except libvirt.libvirtError:
        return None
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return JobProgress.from_stats(stats)


def _abort(dom: libvirt.virDomain) -> None:
    try:
        dom.abortJob()
    except libvirt.libvirtError:
        pass  # the job ended meanwhile: the outcome says how


def _result(ddom: libvirt.virDomain, started: float) -> MigrationResult:
    """Figures of the finished job: the target keeps the completed stats (``--undefinesource``
    drops the source's)."""
    try:
        stats = ddom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError:
        stats = {}
    return MigrationResult(
        elapsed_ms=stats.get("time_elapsed"), downtime_ms=stats.get("downtime"),
        data_transferred=stats.get("data_processed"), seconds=time.monotonic() - started)


#: How long a failed migration may take to let go of the source's domain (its job ending, QEMU
#: accepting ``cont``) before Corral reports it as it is.
SOURCE_RECOVERY_SECONDS = 60


def _source_running(source: HostSession, name: str, *, wait_s: float = SOURCE_RECOVERY_SECONDS) -> bool:
    """Whether the source still has the domain, resuming it when a failed migration left it paused.

    Right after an aborted job QEMU may still refuse ``cont`` (the job is winding down, a stalled
    disk mirror is being torn down): retry until the domain runs or *wait_s* passes. A domain that
    is still there but stays paused counts as the source's (it must not be removed from the target
    as if it were not the only copy), and the error says so.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            dom = domains.find(source, name)
            if dom is None or not dom.isActive():
                return False
            if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                return True
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                try:
                    dom.resume()
                    continue
                except libvirt.libvirtError:
                    pass  # not yet: the job still holds the domain
        except (libvirt.libvirtError, VmmError):
            if time.monotonic() > deadline:
                return False
        if time.monotonic() > deadline:
            return True
        time.sleep(POLL_SECONDS)


def _moved_anyway(source: HostSession, target: HostSession, name: str) -> bool:
    try:
        ddom = domains.find(target, name)
        if ddom is None or ddom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
            return False
        sdom = domains.find(source, name)
        return sdom is None or not sdom.isActive()
    except (libvirt.libvirtError, VmmError):
        return False


def cleanup_target(target: HostSession, name: str, prepared: PreparedTarget, *, source_has_it: bool) -> None:
    """Remove what a failed move left on the target: the domain (only while the source still
    has it: never the only copy) and the files Corral made there."""
    if source_has_it:
        try:
            domains.undefine(target, name)
        except (LibvirtUnavailable, VmmError, libvirt.libvirtError):
            _stop_orphan_qemu(target, name)
    remove_prepared(target, prepared)


def _stop_orphan_qemu(target: HostSession, name: str) -> None:
    """With the target's libvirtd gone, stop an incoming QEMU it left (its pid file names it)."""
    pidfile = f"/run/libvirt/qemu/{name}.pid"
    script = ('pid=$(cat "$1" 2>/dev/null) || exit 0; '
              'grep -qa -- "guest=$2," /proc/$pid/cmdline 2>/dev/null && kill -9 "$pid"; exit 0')
    try:
        target.run(["sh", "-c", script, "stop", pidfile, name], check=False, timeout=30)
    except VmmError:
        pass


# --- cold move -------------------------------------------------------------------------------

def save_path(folder: str) -> str:
    return posixpath.join(folder, "move-state.save")


def cold_move(source: HostSession, target: HostSession, name: str, *, copies: list[tuple[str, str]],
              xml: str, state_dir: str, progress: Progress | None = None,
              check: Callable[[], None] | None = None, prepared: PreparedTarget | None = None) -> bool:
    """Save (if running), copy each (source path, target path) with verification, define *xml*
    on the target and restore there. Returns whether the guest was running (and runs again).

    On failure the target is cleaned and the domain restored on the source.
    """
    prepared = prepared or PreparedTarget()
    check = check or (lambda: None)
    was_running = domains.state(source, name) is domains.DomainState.RUNNING
    saved = False
    try:
        if was_running:
            domains.power(source, name, "save")
            saved = True
        sizes = [int(source.run(["stat", "-c", "%s", src]).stdout.strip()) for src, _ in copies]
        state_src = _managed_save_file(source, name) if saved else None
        if state_src:
            sizes.append(int(source.run(["stat", "-c", "%s", state_src]).stdout.strip()))
        total, done = sum(sizes) or 1, 0
        plan = list(copies) + ([(state_src, save_path(state_dir))] if state_src else [])
        for (src, dst), size in zip(plan, sizes):
            check()
            if images.exists(target, dst):
                raise MigrationError(f"{dst} exists on {target.target.hostname} already; refusing to overwrite it.")
            copy_between(source, target, src, dst, total=size, prepared=prepared,
                         progress=(lambda n, _t, at=done: progress(at + n, total)) if progress else None)
            done += size
        check()
        domains.define(target, xml)
        if state_src:
            try:
                # The image carries the source's definition: hand libvirt the target's when paths differ.
                dxml = xml if any(src != dst for src, dst in copies) else None
                target.libvirt().restoreFlags(save_path(state_dir), dxml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
            except libvirt.libvirtError as exc:
                raise MigrationError(f"restoring {name} on {target.target.hostname} failed: "
                                     f"{exc.get_error_message()}") from exc
            target.run(["rm", "-f", save_path(state_dir)], check=False)
        return was_running
    except BaseException:
        try:
            domains.undefine(target, name)
        except VmmError:
            _stop_orphan_qemu(target, name)
        remove_prepared(target, prepared)
        if saved:
            domains.power(source, name, "restore")
        raise


def _managed_save_file(session: HostSession, name: str) -> str:
    return f"/var/lib/libvirt/qemu/save/{name}.save"


# --- shared storage -----------------------------------------------------------------------

def verify_shared(a: HostSession, b: HostSession, mountpoint: str) -> bool:
    """Whether *mountpoint* is the same storage on both servers: a marker written on one must be
    readable, with the same random content, on the other (and is removed again)."""
    token = hashlib.sha256(f"{time.time_ns()}-{id(a)}".encode()).hexdigest()[:32]
    marker = posixpath.join(mountpoint, f".corral-shared-{token}")
    a.run(["sh", "-c", 'printf %s "$2" > "$1"', "mark", marker, token])
    try:
        got = b.run(["cat", "--", marker], check=False)
        return got.ok and got.stdout.strip() == token
    finally:
        a.run(["rm", "-f", marker], check=False)

"""LiveSync's data plane: an NBD export of the copy on the backup server, a synchronous mirror on the primary.

On the backup server one ``qemu-storage-daemon`` per VM exports every disk copy
(``{name}-{dev}``) over NBD on the backup's own address, with
``writethrough=on`` (each write is flushed before it is acknowledged: the
mirror does not forward the guest's flushes). It is started with
``--daemonize`` (detached, outlives the SSH session), keeps a pid file and a
QMP socket under ``/run/corral-livesync``.

On the primary, libvirt's block copy in synchronous-write mode
(``SYNCHRONOUS_WRITES | TRANSIENT_JOB | REUSE_EXT``) mirrors each disk into the
export; the job is kept in its ready phase and never pivoted. A guest write then
completes only after both copies have it.

A backup that goes silent (link down) stalls the guest's writes and even a job
abort: :func:`mirror_yank` yanks the mirror target's NBD node through QMP, which
fails the job at once and lets the guest write on the primary alone. Measured
facts behind this are in DESIGN.md ("Migration and LiveSync facts").
"""

from __future__ import annotations

import json
import posixpath
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

import libvirt
import libvirt_qemu

from . import domains
from .errors import CommandFailed, VmmError
from .session import HostSession

RUN_DIR = "/run/corral-livesync"
COPY_FLAGS = (libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
              | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT)


class LiveSyncError(VmmError):
    """The export or the mirror could not be set up or changed."""


@dataclass(frozen=True)
class ExportStatus:
    running: bool
    clients: int  # established NBD connections to the export


@dataclass(frozen=True)
class MirrorJob:
    dev: str
    ready: bool  # the bulk copy is done; every guest write now goes to both copies
    cur: int
    end: int
    target: str = ""  # "address:port/export" the job writes to

    @property
    def pct(self) -> int:
        if self.ready:
            return 100
        return min(99, int(self.cur * 100 / self.end)) if self.end else 0


def export_name(name: str, dev: str) -> str:
    return f"{name}-{dev}"


def _files(name: str) -> tuple[str, str, str]:
    base = posixpath.join(RUN_DIR, name)
    return f"{base}.pid", f"{base}.qmp", f"{base}.log"


# --- the export on the backup server ------------------------------------------------

def _export_pid(backup: HostSession, name: str) -> int | None:
    pidfile = _files(name)[0]
    # Alive, not a zombie nobody reaped yet, and still the storage daemon (pids are reused).
    script = ('p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && [ -r "/proc/$p/stat" ] '
              '&& [ "$(cut -d" " -f3 "/proc/$p/stat")" != Z ] '
              '&& grep -q qemu-storage-daemon "/proc/$p/cmdline" 2>/dev/null && echo "$p"')
    out = backup.run(["sh", "-c", script, "pid", pidfile], check=False, timeout=30).stdout.strip()
    return int(out) if out.isdigit() else None


def export_argv(name: str, disks: list[tuple[str, str]], address: str, port: int) -> list[str]:
    """The qemu-storage-daemon command line (the image format is probed: qcow2 copies)."""
    pidfile, qmp, _log = _files(name)
    for _dev, path in disks:
        if "," in path or "," in name:
            raise LiveSyncError(f"{path} cannot be exported: commas are option separators for QEMU")
    argv = ["qemu-storage-daemon",
            "--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off", "--monitor", "chardev=qmp",
            "--nbd-server", f"addr.type=inet,addr.host={address},addr.port={port},max-connections=4",
            "--pidfile", pidfile]
    for i, (dev, path) in enumerate(disks):
        argv += ["--blockdev", f"driver=file,node-name=f{i},filename={path}",
                 "--blockdev", f"driver=qcow2,node-name=n{i},file=f{i}",
                 "--export", (f"type=nbd,id=e{i},node-name=n{i},name={export_name(name, dev)},"
                              "writable=on,writethrough=on")]
    return [*argv, "--daemonize"]


def export_start(backup: HostSession, name: str, disks: list[tuple[str, str]], address: str, port: int) -> None:
    """Export each ``(dev, path)`` of *name*'s copy on ``address:port`` (idempotent: a running export stays)."""
    if _export_pid(backup, name) is not None:
        return
    _log = _files(name)[2]
    argv = export_argv(name, disks, address, port)
    script = 'mkdir -p "$1" && log=$2 && shift 2 && exec "$@" </dev/null >>"$log" 2>&1'
    try:
        backup.run(["sh", "-c", script, "export", RUN_DIR, _log, *argv], timeout=60)
    except CommandFailed as exc:
        tail = backup.run(["tail", "-n", "3", _log], check=False).stdout.strip()
        raise LiveSyncError(f"starting the LiveSync export of {name} on {backup.target.hostname} failed: "
                            f"{tail or exc}") from exc


def export_stop(backup: HostSession, name: str) -> None:
    """Stop *name*'s export (idempotent); when this returns no process holds the copies."""
    pidfile, qmp, _log = _files(name)
    script = ('p=$(cat "$1" 2>/dev/null) || exit 0; [ -n "$p" ] || exit 0; '
              'alive() { [ -r "/proc/$p/stat" ] && [ "$(cut -d" " -f3 "/proc/$p/stat")" != Z ] '
              '&& grep -q qemu-storage-daemon "/proc/$p/cmdline" 2>/dev/null; }; '
              'alive && kill "$p"; i=0; '
              'while alive && [ $i -lt 100 ]; do i=$((i+1)); [ $i -eq 50 ] && kill -9 "$p"; sleep 0.1; done; '
              'alive && exit 1; rm -f "$1" "$2"')
    backup.run(["sh", "-c", script, "stop", pidfile, qmp], timeout=60)


def export_status(backup: HostSession, name: str, port: int | None = None) -> ExportStatus:
    """Whether the export runs, and how many clients are connected to *port* (if given)."""
    if _export_pid(backup, name) is None:
        return ExportStatus(False, 0)
    clients = 0
    if port:
        out = backup.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], check=False).stdout
        clients = len([line for line in out.splitlines() if line.strip()])
    return ExportStatus(True, clients)


def create_copies(backup: HostSession, copies: list[tuple[str, int]]) -> list[str]:
    """Pre-create each ``(path, virtual size)`` as an empty standalone qcow2 (flattened: no backing file;
    the initial sync fills it with the guest-visible data). Existing files are left alone.
    Returns the paths it created."""
    made = []
    for path, size in copies:
        if backup.run(["test", "-e", path], check=False).ok:
            continue
        backup.run(["mkdir", "-p", posixpath.dirname(path)])
        backup.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", path, str(size)], timeout=120)
        made.append(path)
    return made


def remove_copies(backup: HostSession, paths: list[str]) -> None:
    if paths:
        backup.run(["rm", "-f", "--", *paths], check=False)
        for folder in sorted({posixpath.dirname(p) for p in paths}, reverse=True):
            backup.run(["rmdir", "--ignore-fail-on-non-empty", folder], check=False)


# --- the mirror on the primary ------------------------------------------------------

def _dom(primary: HostSession, name: str) -> libvirt.virDomain:
    return domains.lookup(primary, name)


def _mirrors(xml: str) -> dict[str, tuple[bool, str, str | None]]:
    """dev -> (ready, "addr:port/export", node index) of each disk with a block copy in the live XML."""
    out = {}
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        mirror, target = disk.find("mirror"), disk.find("target")
        if mirror is None or target is None:
            continue
        src, where = mirror.find("source"), ""
        index = None
        if src is not None:
            host = src.find("host")
            index = src.get("index")
            if host is not None:
                where = f"{host.get('name')}:{host.get('port')}/{src.get('name')}"
        out[target.get("dev")] = (mirror.get("ready") == "yes", where, index)
    return out


def dest_xml(name: str, dev: str, address: str, port: int) -> str:
    return ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
            f"<source protocol='nbd' name={quoteattr(export_name(name, dev))}>"
            f"<host name={quoteattr(address)} port='{int(port)}'/></source></disk>")


def domain_active(primary: HostSession, name: str) -> bool:
    """Whether *name*'s QEMU runs on this server (running or paused)."""
    dom = domains.find(primary, name)
    try:
        return dom is not None and bool(dom.isActive())
    except libvirt.libvirtError as exc:
        raise LiveSyncError(f"asking {primary.target.hostname} about {name} failed: {exc.get_error_message()}") from exc


def mirror_start(primary: HostSession, name: str, address: str, port: int, devs: list[str], *,
                 bandwidth_mibs: int = 0) -> None:
    """Start a synchronous block copy of each of *devs* into the export (idempotent per disk)."""
    dom = _dom(primary, name)
    running = _mirrors(dom.XMLDesc(0))
    params = {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: bandwidth_mibs << 20} if bandwidth_mibs else None
    for dev in devs:
        if dev in running:
            continue
        try:
            dom.blockCopy(dev, dest_xml(name, dev, address, port), params, COPY_FLAGS)
        except libvirt.libvirtError as exc:
            raise LiveSyncError(f"starting the LiveSync mirror of {name}/{dev} on {primary.target.hostname} "
                                f"failed: {exc.get_error_message()}") from exc


def mirror_status(primary: HostSession, name: str) -> list[MirrorJob]:
    """The mirror job of each disk that has one (an empty list: no mirror runs, or the VM is off)."""
    dom = domains.find(primary, name)
    if dom is None or not dom.isActive():
        return []
    try:
        found = _mirrors(dom.XMLDesc(0))
        jobs = []
        for dev, (ready, where, _index) in found.items():
            info = dom.blockJobInfo(dev, 0) or {}
            jobs.append(MirrorJob(dev, ready, int(info.get("cur", 0)), int(info.get("end", 0)), where))
        return jobs
    except libvirt.libvirtError as exc:
        raise LiveSyncError(f"reading the LiveSync mirror of {name} on {primary.target.hostname} failed: "
                            f"{exc.get_error_message()}") from exc


def mirror_stop(primary: HostSession, name: str) -> None:
    """Abort every mirror job of *name* without pivoting (the guest keeps its own disks). Idempotent.
    Call :func:`mirror_yank` first when the backup may be silent: an abort then hangs."""
    dom = domains.find(primary, name)
    if dom is None or not dom.isActive():
        return
    for dev in _mirrors(dom.XMLDesc(0)):
        try:
            dom.blockJobAbort(dev, 0)
        except libvirt.libvirtError as exc:
            if dom.blockJobInfo(dev, 0):
                raise LiveSyncError(f"stopping the LiveSync mirror of {name}/{dev} failed: "
                                    f"{exc.get_error_message()}") from exc


def _qmp(dom: libvirt.virDomain, command: dict) -> dict:
    return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0))


def mirror_yank(primary: HostSession, name: str) -> list[str]:
    """Yank the NBD connections of *name*'s mirror targets (QMP ``yank``): the jobs fail at once and
    the guest writes on the primary alone even when the backup is silent. Returns the yanked
    node names (none: nothing to yank)."""
    dom = domains.find(primary, name)
    if dom is None or not dom.isActive():
        return []
    try:
        wanted = {f"libvirt-{index}-storage" for _r, _w, index in _mirrors(dom.XMLDesc(0)).values() if index}
        listed = _qmp(dom, {"execute": "query-yank"}).get("return", [])
        nodes = [i["node-name"] for i in listed if i.get("type") == "block-node"
                 and (not wanted or i.get("node-name") in wanted)]
        if nodes:
            _qmp(dom, {"execute": "yank", "arguments": {
                "instances": [{"type": "block-node", "node-name": n} for n in nodes]}})
        return nodes
    except libvirt.libvirtError as exc:
        raise LiveSyncError(f"yanking the LiveSync mirror of {name} on {primary.target.hostname} failed: "
                            f"{exc.get_error_message()}") from exc


def reachable(primary: HostSession, address: str, port: int, *, timeout_s: int = 2) -> bool:
    """Whether the primary can open a TCP connection to the export (a silent backup: False within
    *timeout_s*). The connection is closed at once, before any NBD handshake."""
    script = 'exec 3<>"/dev/tcp/$1/$2"'
    res = primary.run(["timeout", str(timeout_s), "bash", "-c", script, "probe", address, str(port)],
                      check=False, timeout=timeout_s + 30)
    return res.ok


def port_open(address: str, port: int, *, timeout_s: float = 1.0) -> bool:
    """Whether this machine (Corral) can open a TCP connection to *address*:*port* (a server's sshd)."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def keep_alive(session: HostSession, interval: int = 5, count: int = 3) -> None:
    """Keep-alives on the session's libvirt connection, so calls to a server gone silent fail after about
    ``interval * (count + 1)`` seconds instead of hanging (works where a libvirt event loop runs, as in
    the monitor; elsewhere it is skipped)."""
    try:
        session.libvirt().setKeepAlive(interval, count)
    except libvirt.libvirtError:
        pass

"""Where a running guest's consoles are on its server, and byte streams to them.

Every domain Corral defines has VNC graphics on the server's loopback with a
port libvirt picks (``autoport``), and its serial console on a pty (whose
output libvirt also appends to the serial log). Both are read from the live
domain, since they change at every start. A stream to either is, for a remote
server, an ``ssh`` process with Corral's pinned key and known_hosts (``ssh -W``
to the loopback VNC port; a shell attached to the pty), and for the local
server a direct TCP connection or a local shell: no console port is ever
reachable from a network.
"""

from __future__ import annotations

import asyncio
import shlex
import tempfile
import threading
from dataclasses import dataclass

import libvirt
from defusedxml import ElementTree

from .domains import lookup
from .errors import VmmError
from .session import HostSession, Target, open_session

# Attach to the serial pty: raw, no echo from the line discipline (the guest
# echoes), guest output to stdout, stdin to the guest.
_PTY_SH = 'stty -F "$1" raw -echo || exit; exec 3<>"$1"; cat <&3 & cat >&3; kill $! 2>/dev/null'


@dataclass(frozen=True)
class Endpoints:
    vnc_port: int | None  # on the server's 127.0.0.1
    serial_pty: str | None


def endpoints(session: HostSession, name: str) -> Endpoints:
    """The live domain's VNC port and serial pty; VmmError when it does not run there."""
    dom = lookup(session, name)
    try:
        if not dom.isActive():
            raise VmmError(f"{name} is not running on {session.target.hostname}")
        root = ElementTree.fromstring(dom.XMLDesc(0))
    except libvirt.libvirtError as exc:
        raise VmmError(f"reading {name} on {session.target.hostname} failed: {exc.get_error_message()}") from exc
    port = None
    for g in root.findall("./devices/graphics[@type='vnc']"):
        if g.get("port", "-1").isdigit() and int(g.get("port")) > 0:
            port = int(g.get("port"))
    pty = None
    for where in ("./devices/console[@type='pty']/source", "./devices/serial[@type='pty']/source"):
        src = root.find(where)
        if src is not None and src.get("path"):
            pty = src.get("path")
            break
    return Endpoints(port, pty)


class EndpointReader:
    """Reads consoles' endpoints over one libvirt connection per server, kept open between calls
    (a console proxy opens many consoles; a new qemu+ssh connection costs a few hundred ms).
    Thread-safe; a broken connection is dropped and the read tried once more on a fresh one."""

    def __init__(self):
        self._sessions: dict[Target, HostSession] = {}
        self._lock = threading.Lock()

    def endpoints(self, target: Target, name: str) -> Endpoints:
        for attempt in (1, 2):
            with self._lock:
                session = self._sessions.get(target)
                if session is None:
                    session = self._sessions[target] = open_session(target)
            try:
                return endpoints(session, name)
            except VmmError:
                if attempt == 2 or _alive(session):
                    raise
                self._drop(target, session)
        raise AssertionError("unreachable")

    def _drop(self, target: Target, session: HostSession) -> None:
        with self._lock:
            if self._sessions.get(target) is session:
                del self._sessions[target]
        session.close()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()


def _alive(session: HostSession) -> bool:
    try:
        return session.libvirt().isAlive() == 1
    except (libvirt.libvirtError, VmmError):
        return False


class Stream:
    """A byte stream to a console: an asyncio reader and writer, and how to end it."""

    def __init__(self, reader: asyncio.StreamReader, writer, proc: asyncio.subprocess.Process | None = None):
        self.reader, self._writer, self._proc = reader, writer, proc

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        try:
            self._writer.close()
        except OSError:
            pass
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                self._proc.kill()


_control_dir: str | None = None


def _multiplexing() -> list[str]:
    """One SSH connection per server, shared by the console streams to it and kept for a minute
    after the last (``ControlMaster``): opening a console then costs a channel, not a handshake.
    The control sockets live in a private directory of this process."""
    global _control_dir
    if _control_dir is None:
        _control_dir = tempfile.mkdtemp(prefix="corral-console-ssh-")
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={_control_dir}/%C", "-o", "ControlPersist=60"]


def _ssh(target: Target, *extra: str) -> list[str]:
    return [target.ssh_command or "ssh", "-i", target.key_file or "/dev/null", "-p", str(target.port),
            "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15", *_multiplexing(), *extra,
            f"root@{target.address}"]


async def _process(argv: list[str]) -> Stream:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    return Stream(proc.stdout, proc.stdin, proc)


async def open_vnc(target: Target, port: int) -> Stream:
    """A stream to the VNC port on the server's loopback."""
    if target.transport == "local":
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            raise VmmError(f"VNC on {target.hostname} port {port}: {exc}") from exc
        return Stream(reader, writer)
    return await _process(_ssh(target, "-W", f"127.0.0.1:{int(port)}"))


async def open_serial(target: Target, pty: str) -> Stream:
    """A stream to the guest's serial pty on the server."""
    script = ["sh", "-c", _PTY_SH, "serial", pty]
    if target.transport == "local":
        return await _process(script)
    return await _process([*_ssh(target, "-T"), shlex.join(script)])

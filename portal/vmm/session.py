"""One session per VM server: run commands, copy files, talk to libvirt.

``open_session(target)`` gives an :class:`SSHSession` (Fabric) for remote
servers, a :class:`LocalSession` for this machine, and both offer the same
interface. Commands are always argument lists, quoted here, never
strings a caller built. The SSH host key pinned when the server was added is
the only one accepted.
"""

from __future__ import annotations

import abc
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import invoke
import libvirt
import paramiko
from fabric import Connection

from .errors import (
    AuthRefused,
    CommandFailed,
    CommandTimeout,
    HostKeyMismatch,
    LibvirtUnavailable,
    Unreachable,
    VmmError,
)
from .keys import fingerprint

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

CONNECT_TIMEOUT = 10


@dataclass(frozen=True)
class Target:
    """How to reach one VM server (plain data: no ORM objects here)."""

    hostname: str
    address: str
    transport: str = "ssh"  # ssh | local | test (libvirt's test driver, for scale runs)
    port: int = 22
    host_key: str | None = None  # pinned "type base64", e.g. "ssh-ed25519 AAAA..."
    key_file: str | None = None  # Corral's private key
    known_hosts: str | None = None  # Corral's own known_hosts file for this server
    ssh_command: str | None = None  # ssh wrapper libvirt runs (pins known_hosts)
    libvirt_uri: str | None = None  # explicit URI (overrides the one derived from transport)

    @property
    def known_hosts_name(self) -> str:
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def uri(self) -> str:
        if self.libvirt_uri:
            return self.libvirt_uri
        if self.transport == "local":
            return "qemu:///system"
        if self.transport == "test":
            return "test:///default"
        # The ssh binary, through a wrapper that pins Corral's own known_hosts
        # (libvirt's known_hosts= is ignored by its ssh transport, and its
        # libssh transport stalls 5 s on every large reply).
        params = ["no_tty=1"]
        if self.key_file:
            params.append(f"keyfile={self.key_file}")
        if self.ssh_command:
            params.append(f"command={self.ssh_command}")
        port = "" if self.port == 22 else f":{self.port}"
        return f"qemu+ssh://root@{self.address}{port}/system?" + "&".join(params)


@dataclass
class Result:
    argv: list[str]
    code: int
    stdout: str
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass
class HostSession(abc.ABC):
    target: Target
    _conn: libvirt.virConnect | None = field(default=None, init=False, repr=False)

    # --- commands -------------------------------------------------------
    def run(self, argv: Sequence[str], *, timeout: float = 60, check: bool = True,
            input: str | None = None) -> Result:
        argv = [str(a) for a in argv]
        if not argv:
            raise ValueError("empty command")
        result = self._run(argv, timeout=timeout, input=input)
        if check and result.code != 0:
            raise CommandFailed(self.target.hostname, argv, result.code, result.stderr)
        return result

    @abc.abstractmethod
    def _run(self, argv: list[str], *, timeout: float, input: str | None) -> Result:
        """Run one quoted command on the server."""

    @abc.abstractmethod
    def put(self, local: str | os.PathLike, remote: str, progress: Progress | None = None) -> None:
        """Copy a local file to the server, reporting (done, total) bytes."""

    @abc.abstractmethod
    def get(self, remote: str, local: str | os.PathLike, progress: Progress | None = None) -> None:
        """Copy a file from the server, reporting (done, total) bytes."""

    def put_verified(self, local: str | os.PathLike, remote: str, progress: Progress | None = None) -> str:
        """Copy like :meth:`put` and return the sha256 of what the server wrote."""
        self.put(local, remote, progress)
        return self.sha256(remote)

    def sha256(self, path: str) -> str:
        """sha256 of a file on the server: OpenSSL (which uses the CPU's SHA extensions) or sha256sum."""
        script = ('if command -v openssl >/dev/null; then openssl dgst -sha256 -r "$1"; '
                  'else sha256sum "$1"; fi')
        return self.run(["sh", "-c", script, "sha256", path], timeout=3600).stdout.split()[0]

    # --- libvirt ----------------------------------------------------------
    def libvirt(self) -> libvirt.virConnect:
        if self._conn is None or not self._conn.isAlive():
            self._conn = connect_libvirt(self.target)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except libvirt.libvirtError:
                pass
            self._conn = None

    def __enter__(self) -> HostSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect_libvirt(target: Target) -> libvirt.virConnect:
    try:
        conn = libvirt.open(target.uri())
    except libvirt.libvirtError as exc:
        raise LibvirtUnavailable(
            f"libvirtd on {target.hostname} is not answering ({target.uri().split('?')[0]}): "
            f"{exc.get_error_message()}"
        ) from exc
    return conn


class LocalSession(HostSession):
    """This machine. Commands run through :func:`subprocess.run` with the
    argument list as is (no shell); invoke's local runner, which Fabric uses
    remotely, leaves its pipe handles open."""

    def _run(self, argv: list[str], *, timeout: float, input: str | None) -> Result:
        try:
            r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                               stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(f"{self.target.hostname}: `{shlex.join(argv)}` ran past {timeout} s") from exc
        except FileNotFoundError as exc:
            return Result(argv, 127, "", str(exc))
        return Result(argv, r.returncode, r.stdout, r.stderr)

    def put(self, local, remote, progress=None):
        _copy_with_progress(Path(local), Path(remote), progress)

    def put_verified(self, local, remote, progress=None) -> str:
        return _copy_with_progress(Path(local), Path(remote), progress, digest=True)

    def get(self, remote, local, progress=None):
        _copy_with_progress(Path(remote), Path(local), progress)


class SSHSession(HostSession):
    """A remote server over SSH with Corral's key, through Fabric."""

    def __init__(self, target: Target):
        super().__init__(target)
        self._fabric: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._fabric is None:
            self._fabric = _fabric_connection(self.target)
        return self._fabric

    def _run(self, argv: list[str], *, timeout: float, input: str | None) -> Result:
        try:
            r = self.connection.run(shlex.join(argv), hide=True, warn=True, timeout=timeout,
                                    in_stream=_stream(input))
        except invoke.CommandTimedOut as exc:
            raise CommandTimeout(f"{self.target.hostname}: `{shlex.join(argv)}` ran past {timeout} s") from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self._fabric = None
            raise _translate(self.target, exc) from exc
        return Result(argv, r.exited, r.stdout, r.stderr)

    def put(self, local, remote, progress=None):
        if self.target.ssh_command:
            self._stream(local, remote, progress)
            return
        try:
            self.connection.sftp().put(str(local), remote, callback=progress)
        except (OSError, paramiko.SSHException) as exc:
            raise VmmError(f"copying {local} to {self.target.hostname}:{remote} failed: {exc}") from exc

    def _stream(self, local, remote: str, progress: Progress | None) -> str:
        """Stream a file through the ssh binary (as fast as scp), with progress."""
        remote_cmd = f"cat > {shlex.quote(remote)}"
        argv = [self.target.ssh_command, "-i", self.target.key_file or "/dev/null", "-p", str(self.target.port),
                "-o", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com",
                "-o", "Compression=no", f"root@{self.target.address}", remote_cmd]
        total = os.stat(local).st_size
        done = 0
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            with open(local, "rb") as fh:
                while chunk := fh.read(4 << 20):
                    proc.stdin.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
            out, err = proc.communicate(timeout=600)  # closes stdin: the server sees the end
        except BrokenPipeError:
            out, err = proc.communicate(timeout=60)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        if proc.returncode != 0:
            raise VmmError(f"copying {local} to {self.target.hostname}:{remote} failed: "
                           f"{err.decode(errors='replace').strip()}")
        return ""

    def get(self, remote, local, progress=None):
        try:
            self.connection.sftp().get(remote, str(local), callback=progress)
        except (OSError, paramiko.SSHException) as exc:
            raise VmmError(f"copying {self.target.hostname}:{remote} failed: {exc}") from exc

    def close(self) -> None:
        super().close()
        if self._fabric is not None:
            self._fabric.close()
            self._fabric = None


class TestDriverSession(HostSession):
    """libvirt's built-in test driver: no commands, used for scale runs."""

    __test__ = False  # not a pytest class

    def _refuse(self, *_args, **_kwargs):
        raise VmmError(f"{self.target.hostname} is a libvirt test-driver server; it runs no commands")

    _run = put = get = _refuse


def open_session(target: Target) -> HostSession:
    if target.transport == "local":
        return LocalSession(target)
    if target.transport == "test":
        return TestDriverSession(target)
    return SSHSession(target)


# --- SSH details ----------------------------------------------------------------

class _PinnedKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse any key that is not already pinned (the pinned one never reaches here)."""

    def __init__(self, target: Target):
        self.target = target

    def missing_host_key(self, client, hostname, key):
        got = fingerprint(key.get_name(), key.get_base64())
        if self.target.host_key is None:
            raise VmmError(f"{self.target.hostname}: no SSH host key is pinned (got {got}); add the server first")
        raise HostKeyMismatch(self.target.hostname, pinned_fingerprint(self.target.host_key), got)


def write_ssh_wrapper(path: str | os.PathLike, known_hosts: str) -> str:
    """An ssh command for libvirt's qemu+ssh that trusts only ``known_hosts``."""
    opts = ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    script = f"#!/bin/sh\nexec ssh {shlex.join(opts)} \"$@\"\n"
    path = Path(path)
    if not path.exists() or path.read_text() != script:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o700)
        tmp.replace(path)
    return str(path)


def pinned_fingerprint(host_key: str) -> str:
    key_type, b64 = host_key.split()[:2]
    return fingerprint(key_type, b64)


def _paramiko_client(target: Target) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    if target.host_key:
        key_type, b64 = target.host_key.split()[:2]
        client.get_host_keys().add(target.known_hosts_name, key_type, paramiko.PKey.from_type_string(key_type, _b64(b64)))
    client.set_missing_host_key_policy(_PinnedKeyPolicy(target))
    return client


def _b64(b64: str) -> bytes:
    import base64

    return base64.b64decode(b64)


def _fabric_connection(target: Target, *, password: str | None = None) -> Connection:
    kwargs = {"look_for_keys": False, "allow_agent": False, "banner_timeout": CONNECT_TIMEOUT,
              "auth_timeout": CONNECT_TIMEOUT}
    if password is not None:
        kwargs["password"] = password
    else:
        kwargs["key_filename"] = [target.key_file] if target.key_file else []
    conn = Connection(target.address, user="root", port=target.port, connect_timeout=CONNECT_TIMEOUT,
                      connect_kwargs=kwargs)
    conn.client = _paramiko_client(target)
    try:
        conn.open()
    except Exception as exc:
        raise _translate(target, exc) from exc
    return conn


def _translate(target: Target, exc: BaseException) -> VmmError:
    if isinstance(exc, VmmError):
        return exc
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyMismatch(target.hostname, fingerprint(exc.expected_key.get_name(), exc.expected_key.get_base64()),
                               fingerprint(exc.key.get_name(), exc.key.get_base64()))
    if isinstance(exc, paramiko.AuthenticationException):
        return AuthRefused(f"{target.hostname} refused the login as root ({exc}). "
                           "Check the root password, or that Corral's key is still in /root/.ssh/authorized_keys.")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Unreachable(f"{target.hostname} ({target.address}:{target.port}) did not answer within "
                           f"{CONNECT_TIMEOUT} s.")
    if isinstance(exc, OSError):
        return Unreachable(f"{target.hostname} ({target.address}:{target.port}) is unreachable: "
                           f"{exc.strerror or exc}.")
    return Unreachable(f"{target.hostname}: SSH failed: {exc}")


def fetch_host_key(address: str, port: int = 22, hostname: str | None = None) -> str:
    """The server's SSH host key as "type base64" (first contact, before pinning)."""
    target = Target(hostname=hostname or address, address=address, port=port)
    try:
        sock = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise _translate(target, exc) from exc
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = CONNECT_TIMEOUT
        transport.start_client(timeout=CONNECT_TIMEOUT)
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise _translate(target, exc) from exc
    finally:
        transport.close()


def install_key(target: Target, password: str, public_key: str) -> None:
    """Log in once with the root password and add Corral's key; the password is not kept."""
    conn = _fabric_connection(target, password=password)
    try:
        script = ("umask 077 && mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys && "
                  f"(grep -qxF {shlex.quote(public_key)} ~/.ssh/authorized_keys || "
                  f"echo {shlex.quote(public_key)} >> ~/.ssh/authorized_keys)")
        r = conn.run(script, hide=True, warn=True, timeout=30)
        if r.exited != 0:
            raise CommandFailed(target.hostname, ["install corral key"], r.exited, r.stderr)
    finally:
        conn.close()


# --- helpers ----------------------------------------------------------------------

def _stream(data: str | None):
    import io

    return io.StringIO(data) if data is not None else False


def _copy_with_progress(src: Path, dst: Path, progress: Progress | None, chunk: int = 8 << 20,
                        digest: bool = False) -> str:
    total = src.stat().st_size
    done = 0
    h = hashlib.sha256() if digest else None
    tmp = dst.with_name(dst.name + ".part")
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            while True:
                buf = fin.read(chunk)
                if not buf:
                    break
                fout.write(buf)
                if h is not None:
                    h.update(buf)
                done += len(buf)
                if progress:
                    progress(done, total)
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest() if h is not None else ""

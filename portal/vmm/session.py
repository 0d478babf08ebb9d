"""One session per VM server: run commands, copy files, talk to libvirt.

``open_session(target)`` gives an :class:`SSHSession` (Fabric) for remote
servers, a :class:`LocalSession` for this machine, and both offer the same
interface. Commands are always argument lists, quoted here, never
strings a caller built. The SSH host key pinned when the server was added is
the only one accepted.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import mmap
import os
import queue
import shlex
import shutil
import socket
import subprocess
import threading
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

# Copies: bytes the kernel copies per call (syscalls do not count, progress and a cancel
# are still prompt), how often a streamed copy reports, and the ssh ciphers (AES-GCM
# first: with AES-NI it is the cheapest, and ssh is CPU-bound).
COPY_CHUNK = 32 << 20
PROGRESS_INTERVAL = 0.25
COPY_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"

# Shell scripts run as `sh -c SCRIPT NAME PATH [SIZE]`. The receiver deletes a file that
# came out shorter than SIZE (the stream was cut: cancelled or broken) and fails.
_RECEIVE_SH = ('cat > "$1" || exit; [ "$(stat -c %s -- "$1")" = "$2" ] '
               '|| { rm -f -- "$1"; echo "received a short file (copy interrupted)" >&2; exit 75; }; ')
_SHA256_SH = 'if command -v openssl >/dev/null; then openssl dgst -sha256 -r "$1"; else sha256sum "$1"; fi'


@dataclass(frozen=True)
class Target:
    """How to reach one VM server (plain data: no ORM objects here)."""

    hostname: str
    address: str
    transport: str = "ssh"  # ssh | local
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
        """Copy like :meth:`put` and return the sha256 of what the server wrote (read back there).

        The caller compares it with the sha256 it expects, so a file that
        changed on the way or on arrival is caught."""
        self.put(local, remote, progress)
        return self.sha256(remote)

    def sha256(self, path: str) -> str:
        """sha256 of a file on the server: OpenSSL (which uses the CPU's SHA extensions) or sha256sum."""
        return _digest_in(self.run(["sh", "-c", _SHA256_SH, "sha256", path], timeout=3600).stdout, path)

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
        """Copy in the kernel and hash what was written from the page cache, in parallel."""
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
            self._stream(local, remote, progress, digest=False)
            return
        try:
            self.connection.sftp().put(str(local), remote, callback=progress)
        except (OSError, paramiko.SSHException) as exc:
            raise VmmError(f"copying {local} to {self.target.hostname}:{remote} failed: {exc}") from exc

    def put_verified(self, local, remote, progress=None) -> str:
        """Stream the file and hash it on the server as soon as it is written (page cache still hot),
        in the same ssh command: no second connection, no second copy through Corral."""
        if self.target.ssh_command:
            return self._stream(local, remote, progress, digest=True)
        return super().put_verified(local, remote, progress)

    def _stream(self, local, remote: str, progress: Progress | None, *, digest: bool) -> str:
        """Copy a file through the ssh binary (faster than scp, which speaks SFTP), with progress.

        ssh reads the local file itself (its stdin is the file, so no byte
        passes through Python); progress is the file offset ssh has reached,
        polled while waiting. The server's shell refuses a file shorter than
        the local one (a cancelled or broken copy) by deleting it, so a copy
        that did not finish leaves nothing behind whatever the timing. With
        ``digest`` it then prints the sha256 of what it wrote, which is returned.
        """
        total = os.stat(local).st_size
        script = _RECEIVE_SH + (_SHA256_SH if digest else "")
        argv = [*self._ssh_argv(), shlex.join(["sh", "-c", script, "receive", remote, str(total)])]
        with open(local, "rb") as fh:
            code, out, err = _run_reporting(argv, fh, total, progress)
        if code != 0:
            raise VmmError(f"copying {local} to {self.target.hostname}:{remote} failed: "
                           f"{err.decode(errors='replace').strip() or f'exit status {code}'}")
        return _digest_in(out.decode(errors="replace"), remote) if digest else ""

    def _ssh_argv(self) -> list[str]:
        """The ssh binary through Corral's pinned wrapper, with the fastest cipher on CPUs with AES-NI."""
        return [self.target.ssh_command, "-i", self.target.key_file or "/dev/null", "-p", str(self.target.port),
                "-o", f"Ciphers={COPY_CIPHERS}", "-o", "Compression=no", f"root@{self.target.address}"]

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


def open_session(target: Target) -> HostSession:
    if target.transport == "local":
        return LocalSession(target)
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


def _copy_with_progress(src: Path, dst: Path, progress: Progress | None, *, digest: bool = False) -> str:
    """Copy ``src`` to ``dst`` (through ``dst.part``, renamed when complete), returning the sha256
    of what was written when ``digest`` is set.

    The kernel copies (copy_file_range: no user-space buffer; a reflink on
    filesystems that share extents) in large chunks; a thread hashes each
    chunk of the destination from the page cache as soon as it is written,
    so hashing overlaps the copy instead of following it. A progress
    callback that raises cancels the copy and removes the part file.
    """
    total = src.stat().st_size
    tmp = dst.with_name(dst.name + ".part")
    sha = ""
    try:
        with src.open("rb") as fin, tmp.open("w+b") as fout:
            os.posix_fadvise(fin.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # read ahead as far as cp does
            follower = _Sha256Follower(fout.fileno()) if digest else None
            try:
                done = 0
                while n := _kernel_copy(fin.fileno(), fout.fileno(), done, COPY_CHUNK):
                    done += n
                    if follower is not None:
                        follower.written(done)
                    if progress:
                        progress(done, total)
            except BaseException:
                if follower is not None:
                    follower.abandon()
                raise
            if follower is not None:
                sha = follower.result()
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return sha


def _kernel_copy(fd_in: int, fd_out: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes at ``offset`` inside the kernel; 0 at the end of the source.

    copy_file_range where the filesystems allow it, else sendfile (both keep
    the data out of Python)."""
    try:
        return os.copy_file_range(fd_in, fd_out, count, offset, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(fd_out, offset, os.SEEK_SET)
    return os.sendfile(fd_out, fd_in, offset, count)


class _Sha256Follower:
    """Hash a file in a thread while another writes it, up to what the writer says is written.

    It reads the written bytes through a memory map of the page cache (no
    copy into Python), and hashlib releases the GIL while it hashes, so the
    hash runs on a second core beside the kernel's copy.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._hash = hashlib.sha256()
        self._pos = 0
        self._marks: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256-follower", daemon=True)
        self._thread.start()

    def written(self, upto: int) -> None:
        """The file is written up to ``upto`` bytes."""
        self._marks.put(upto)

    def result(self) -> str:
        """Wait until everything written is hashed; the hex digest."""
        self._marks.put(None)
        self._thread.join()
        if self._error is not None:
            raise VmmError(f"hashing the copy failed: {self._error}") from self._error
        return self._hash.hexdigest()

    def abandon(self) -> None:
        """Stop at the next chunk (the copy was cancelled or failed)."""
        self._stop.set()
        self._marks.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            while (upto := self._marks.get()) is not None:
                while self._pos < upto:
                    if self._stop.is_set():
                        return
                    self._hash_span(min(upto, self._pos + COPY_CHUNK))
        except BaseException as exc:  # handed to result(), raised in the copying thread
            self._error = exc

    def _hash_span(self, end: int) -> None:
        start = self._pos - self._pos % mmap.ALLOCATIONGRANULARITY
        with (mmap.mmap(self._fd, end - start, offset=start, prot=mmap.PROT_READ) as mapped,
              memoryview(mapped) as view, view[self._pos - start:] as span):
            self._hash.update(span)
        self._pos = end


def _run_reporting(argv: list[str], stdin, total: int, progress: Progress | None) -> tuple[int, bytes, bytes]:
    """Run a command that reads the open file ``stdin`` to its end; report how far it has read.

    The child shares the file's offset, so the offset is its progress. A
    progress callback that raises kills the child before the error goes on.
    """
    proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=PROGRESS_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                if progress:
                    progress(min(os.lseek(stdin.fileno(), 0, os.SEEK_CUR), total), total)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    if progress and proc.returncode == 0:
        progress(total, total)
    return proc.returncode, out, err


def _digest_in(output: str, path: str) -> str:
    """The hex sha256 from `openssl dgst -r` or `sha256sum` output (the last line's first word)."""
    words = output.strip().splitlines()[-1].split() if output.strip() else []
    if not words or len(words[0]) != 64 or any(c not in "0123456789abcdef" for c in words[0]):
        raise VmmError(f"no sha256 for {path} in {output.strip()[-200:]!r}")
    return words[0]

"""Disk images on a server: inspect, copy in with progress, clone, remove.

Every function takes a :class:`HostSession`, so the same code works on this
machine and over SSH. Paths are always passed as separate arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from .errors import CommandFailed, VmmError
from .session import HostSession, Progress

CHUNK = 8 << 20
GIB = 1024 ** 3


class ImageError(VmmError):
    """An image is not what it should be (format, checksum, backing file)."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    virtual_size: int
    actual_size: int
    backing: str | None


def info(session: HostSession, path: str) -> ImageInfo:
    try:
        out = session.run(["qemu-img", "info", "--output=json", "-U", path], timeout=120).stdout
    except CommandFailed as exc:
        raise ImageError(f"{path} on {session.target.hostname} is not a readable disk image: "
                         f"{exc.stderr.strip() or exc}") from exc
    data = json.loads(out)
    return ImageInfo(data["format"], int(data["virtual-size"]), int(data.get("actual-size") or 0),
                     data.get("full-backing-filename") or data.get("backing-filename"))


def local_sha256(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return h.hexdigest()


def remote_sha256(session: HostSession, path: str) -> str:
    return session.run(["sha256sum", path], timeout=3600).stdout.split()[0]


def copy_in(session: HostSession, local: Path, remote: str, *, sha256: str | None,
            progress: Progress | None = None) -> None:
    """Copy a file to the server (to ``remote.part`` first), verify its checksum, move it into place."""
    part = remote + ".part"
    session.run(["mkdir", "-p", posixpath.dirname(remote)])
    try:
        got = session.put_verified(local, part, progress)
        if sha256 is not None:
            if got != sha256:
                raise ImageError(f"checksum mismatch copying {local.name} to {session.target.hostname}: "
                                 f"expected {sha256[:12]}…, got {got[:12]}…")
        session.run(["mv", "-f", part, remote])
    finally:
        session.run(["rm", "-f", part], check=False)


def clone(session: HostSession, base: str, path: str) -> None:
    """A qcow2 overlay on ``base`` (copy-on-write)."""
    session.run(["mkdir", "-p", posixpath.dirname(path)])
    session.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path], timeout=120)


def create_blank(session: HostSession, path: str, size_gb: int) -> None:
    session.run(["mkdir", "-p", posixpath.dirname(path)])
    session.run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{int(size_gb)}G"], timeout=120)


def resize(session: HostSession, path: str, size_gb: int) -> None:
    session.run(["qemu-img", "resize", "-q", path, f"{int(size_gb)}G"], timeout=300)


def exists(session: HostSession, path: str) -> bool:
    return session.run(["test", "-e", path], check=False).ok


def remove_tree(session: HostSession, path: str, *, under: str) -> None:
    """Remove ``path`` (a VM's directory), refusing anything not inside ``under``."""
    norm = posixpath.normpath(path)
    root = posixpath.normpath(under)
    if not norm.startswith(root + "/") or norm == root:
        raise VmmError(f"refusing to remove {path}: not inside {under}")
    session.run(["rm", "-rf", "--one-file-system", norm], timeout=600)


def flock_argv(lock: str, argv: list[str]) -> list[str]:
    """``argv`` run under an exclusive lock file on the server (for shared bases)."""
    return ["flock", "-w", "3600", lock, *argv]


def file_size(path: Path) -> int:
    return os.stat(path).st_size

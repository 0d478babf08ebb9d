"""Disk images on a server: inspect, copy in with progress, clone, remove.

Every function takes a :class:`HostSession`, so the same code works on this
machine and over SSH. Paths are always passed as separate arguments.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
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


def copy_in(session: HostSession, local: Path, remote: str, *, sha256: str | None,
            progress: Progress | None = None) -> None:
    """Copy a file to the server (to a part file beside it first), verify its checksum, move it into place."""
    part = f"{remote}.part-{secrets.token_hex(4)}"  # one per copy: jobs may copy the same file at once
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


def cached_copy(session: HostSession, local: Path, remote: str, *, sha256: str | None,
                progress: Progress | None = None) -> bool:
    """Copy a file that VMs share (a clone base, an ISO) to the server once; False when it was there.

    Two jobs copying the same file at once each write their own part file
    and move it into place atomically, so neither sees half a file. The copy
    is made read-only: VMs only ever read it (clones write to their overlays).
    """
    if exists(session, remote):
        return False
    copy_in(session, local, remote, sha256=sha256, progress=progress)
    session.run(["chmod", "0444", remote])
    return True


def remove_cached(session: HostSession, paths: list[str]) -> None:
    """Remove cached shared files (and lock files older versions left beside them); missing ones are fine."""
    if paths:
        session.run(["rm", "-f", "--", *paths, *(p + ".lock" for p in paths)], check=False)


def flatten(session: HostSession, src: str, dst: Path, progress: Progress | None = None) -> None:
    """Fetch a self-contained qcow2 copy of the server's image ``src`` (and its backing chain) to local ``dst``.

    The flat copy is made on the server beside ``src`` (the server reads its
    own backing files), fetched, and removed whatever happens.
    """
    flat = f"{src}.flat-{secrets.token_hex(4)}"
    try:
        session.run(["qemu-img", "convert", "-O", "qcow2", src, flat], timeout=6 * 3600)
        session.get(flat, dst, progress)
    finally:
        session.run(["rm", "-f", "--", flat], check=False)

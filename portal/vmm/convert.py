"""Local image work on the worker's machine: decompress, inspect, check, convert to qcow2.

Files that come from outside (uploads, OVA packages, catalog downloads)
arrive on the worker before they reach any VM server. These functions look
at their contents (never their names), refuse what is not a usable,
self-contained disk image with :class:`ImageRejected`, whose message names
the file by the ``label`` the caller gives (the name the user knows), and
convert the rest to qcow2.
"""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import subprocess
import zlib
from pathlib import Path

from .errors import VmmError

ACCEPTED = ("qcow2", "raw", "vmdk", "vdi")
MAGIC = {b"\x1f\x8b": "gz", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zst"}
INSPECT_TIMEOUT = 3600  # qemu-img check reads all metadata of a large image
CONVERT_TIMEOUT = None  # bounded by the task's own timeout


class ImageRejected(VmmError):
    """A file is not a usable disk image; the message says why and names the file."""


def _run(argv: list[str], timeout: float | None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise VmmError(f"{argv[0]} is not installed on this worker ({exc}).") from exc
    except subprocess.TimeoutExpired as exc:
        raise VmmError(f"`{argv[0]} {argv[1]}` ran past {timeout} s.") from exc


def compression_of(path: Path) -> str | None:
    """``gz``, ``xz`` or ``zst`` when the file starts with that format's magic bytes, else None."""
    with path.open("rb") as fh:
        head = fh.read(6)
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def decompress(path: Path, kind: str, out: Path, *, label: str) -> None:
    """Decompress ``path`` (``kind`` from :func:`compression_of`) into ``out``."""
    if kind == "zst":
        r = _run(["zstd", "-q", "-d", "-f", "-o", str(out), str(path)], CONVERT_TIMEOUT)
        if r.returncode != 0:
            raise ImageRejected(f"{label}: not a valid zstd file ({r.stderr.strip()})")
        return
    opener = gzip.open if kind == "gz" else lzma.open
    try:
        with opener(path, "rb") as fin, out.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 8 << 20)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise ImageRejected(f"{label}: the {kind} data is damaged ({exc})") from exc


def looks_like_raw_disk(path: Path) -> bool:
    """A raw image must at least be whole sectors and carry a partition table or boot sector."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with path.open("rb") as fh:
        sector0 = fh.read(512)
        fh.seek(512)
        sector1 = fh.read(8)
    return sector0[510:512] == b"\x55\xaa" or sector1 == b"EFI PART"


def inspect(path: Path, *, label: str) -> str:
    """The image's format after checking it is one Corral takes, undamaged and self-contained."""
    r = _run(["qemu-img", "info", "--output=json", str(path)], INSPECT_TIMEOUT)
    if r.returncode != 0:
        raise ImageRejected(f"{label}: qemu-img cannot read it as a disk image: {r.stderr.strip()}")
    found = json.loads(r.stdout)
    fmt = found["format"]
    if fmt not in ACCEPTED:
        raise ImageRejected(f"{label} is a {fmt} image; Corral takes qcow2, raw, vmdk and vdi.")
    if fmt == "raw" and not looks_like_raw_disk(path):
        raise ImageRejected(f"{label} is not a disk image (no partition table or boot sector, "
                            "and not qcow2, vmdk or vdi).")
    if fmt == "qcow2":
        check = _run(["qemu-img", "check", str(path)], INSPECT_TIMEOUT)
        if check.returncode not in (0, 3):  # 3: leaked clusters only, harmless
            raise ImageRejected(f"{label} is a damaged qcow2 image: "
                                f"{check.stdout.strip() or check.stderr.strip()}")
        if found.get("backing-filename"):
            raise ImageRejected(f"{label} depends on a backing file; upload a self-contained image.")
    return fmt


def to_qcow2(path: Path, fmt: str, out: Path, *, label: str) -> None:
    """Convert an inspected image (``fmt`` from :func:`inspect`) to a new qcow2 file ``out``."""
    r = _run(["qemu-img", "convert", "-O", "qcow2", "-f", fmt, str(path), str(out)], CONVERT_TIMEOUT)
    if r.returncode != 0:
        out.unlink(missing_ok=True)
        raise ImageRejected(f"{label}: conversion failed: {r.stderr.strip()}")

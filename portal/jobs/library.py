"""Jobs for the library: import uploaded disk images as an appliance."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import subprocess
import zlib
from pathlib import Path

from .. import actionlog, library
from ..extensions import db
from ..models import Appliance
from . import Progress, task_job

ACCEPTED = {"qcow2", "raw", "vmdk", "vdi"}
MAGIC = {b"\x1f\x8b": "gz", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zst"}


class ImportRejected(Exception):
    """The upload is not a usable disk image."""


def compression_of(path: Path) -> str | None:
    with path.open("rb") as fh:
        head = fh.read(6)
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def decompress(path: Path, kind: str, out: Path, progress: Progress) -> None:
    progress.log(f"{path.name} is {kind}-compressed; decompressing.")
    if kind == "zst":
        r = subprocess.run(["zstd", "-q", "-d", "-f", "-o", str(out), str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            raise ImportRejected(f"{path.name}: not a valid zstd file ({r.stderr.strip()})")
        return
    opener = gzip.open if kind == "gz" else lzma.open
    try:
        with opener(path, "rb") as fin, out.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 8 << 20)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise ImportRejected(f"{path.name}: the {kind} data is damaged ({exc})") from exc


def detect_format(path: Path) -> dict:
    r = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ImportRejected(f"qemu-img cannot read it as a disk image: {r.stderr.strip()}")
    return json.loads(r.stdout)


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


def to_qcow2(path: Path, progress: Progress, position: int, count: int) -> Path:
    """Decompress if needed, detect the format with qemu-img, validate, convert to qcow2."""
    work = path
    kind = compression_of(path)
    if kind:
        work = path.with_name(path.name + ".decompressed")
        decompress(path, kind, work, progress)
    found = detect_format(work)
    fmt = found["format"]
    if fmt not in ACCEPTED:
        raise ImportRejected(f"{path.name} is a {fmt} image; Corral takes qcow2, raw, vmdk and vdi.")
    if fmt == "raw" and not looks_like_raw_disk(work):
        raise ImportRejected(f"{path.name} is not a disk image (no partition table or boot sector, "
                             "and not qcow2, vmdk or vdi).")
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", str(work)], capture_output=True, text=True)
        if check.returncode not in (0, 3):  # 3: leaked clusters only, harmless
            raise ImportRejected(f"{path.name} is a damaged qcow2 image: {check.stdout.strip() or check.stderr.strip()}")
        if found.get("backing-filename"):
            raise ImportRejected(f"{path.name} depends on a backing file; upload a self-contained image.")
    out = path.with_name(f"converted-{position}.qcow2")
    progress.step(f"Converting disk {position + 1} of {count} ({fmt}) to qcow2", 20 + 60 * position // count)
    r = subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-f", fmt, str(work), str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ImportRejected(f"{path.name}: conversion failed: {r.stderr.strip()}")
    return out


@task_job
def import_uploaded(progress: Progress, upload_dir: str, meta: str) -> str:
    """Turn uploaded files into a ready appliance; on any failure leave nothing behind."""
    data = json.loads(meta)
    folder = Path(upload_dir)
    files = [folder / name for name in data["files"]]
    try:
        converted = []
        for i, f in enumerate(files):
            progress.step(f"Checking {data['names'][i]}", 10 + 60 * i // len(files))
            try:
                converted.append(to_qcow2(f, progress, i, len(files)))
            except ImportRejected as exc:
                raise ImportRejected(str(exc).replace(f.name, data["names"][i])) from None
        progress.step("Adding the appliance to the library", 85)
        if db.session.execute(db.select(Appliance.id).where(Appliance.name == data["name"])).first():
            raise ImportRejected(f"An appliance called {data['name']} was added meanwhile.")
        row = Appliance(name=data["name"], description=data.get("description"), min_memory_mb=data["min_memory_mb"],
                        max_memory_mb=data["max_memory_mb"], vcpus=data["vcpus"], os_hint=data.get("os_hint"),
                        source="upload", state="importing", created_by_id=data.get("user_id"))
        db.session.add(row)
        db.session.flush()
        try:
            for i, c in enumerate(converted):
                library.add_disk_file(row, i, c, move=True)
            row.state = "ready"
            actionlog.record("appliance-added", target=row, user_id=data.get("user_id"),
                             detail=f"uploaded {', '.join(data['names'])}")
            db.session.commit()
        except BaseException:
            db.session.rollback()
            shutil.rmtree(library.appliance_dir(row.id), ignore_errors=True)
            raise
        return row.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)

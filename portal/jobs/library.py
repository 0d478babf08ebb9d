"""Jobs for the library: import uploaded disk images as an appliance."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import lzma
import re
import shutil
import subprocess
import tarfile
import time
import urllib.request
import xml.etree.ElementTree as ET
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


def add_appliance(converted: list[Path], *, name: str, description: str | None, min_memory_mb: int,
                  max_memory_mb: int, vcpus: int, source: str, user_id: int | None, detail: str,
                  os_hint: str | None = None) -> Appliance:
    """Create a ready appliance from converted qcow2 disks, or nothing at all."""
    if db.session.execute(db.select(Appliance.id).where(Appliance.name == name)).first():
        raise ImportRejected(f"An appliance called {name} exists already.")
    row = Appliance(name=name, description=description, min_memory_mb=min_memory_mb, max_memory_mb=max_memory_mb,
                    vcpus=vcpus, os_hint=os_hint, source=source, state="importing", created_by_id=user_id)
    db.session.add(row)
    db.session.flush()
    try:
        for i, c in enumerate(converted):
            library.add_disk_file(row, i, c, move=True)
        row.state = "ready"
        actionlog.record("appliance-added", target=row, user_id=user_id, detail=detail)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        shutil.rmtree(library.appliance_dir(row.id), ignore_errors=True)
        raise
    return row


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
        row = add_appliance(converted, name=data["name"], description=data.get("description"),
                            min_memory_mb=data["min_memory_mb"], max_memory_mb=data["max_memory_mb"],
                            vcpus=data["vcpus"], os_hint=data.get("os_hint"), source="upload",
                            user_id=data.get("user_id"), detail=f"uploaded {', '.join(data['names'])}")
        return row.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


OVF_NS = {"ovf": "http://schemas.dmtf.org/ovf/envelope/1",
          "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"}
_UNITS = {"byte": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30}


def _units(text: str | None) -> int:
    """Bytes per unit of an OVF AllocationUnits string ("byte * 2^20", "MegaBytes")."""
    if not text:
        return 1 << 20  # OVF's default for memory is MB
    text = text.strip().lower()
    m = re.match(r"byte\s*\*\s*2\^(\d+)", text)
    if m:
        return 1 << int(m.group(1))
    return _UNITS.get(text, 1 << 20)


def parse_ovf(xml: str) -> dict:
    """Name, memory (MB), CPUs and the ordered disk files of an OVF envelope."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ImportRejected(f"The OVF descriptor is not valid XML: {exc}") from exc
    a = lambda el, name: el.get(f"{{{OVF_NS['ovf']}}}{name}")  # noqa: E731
    files = {a(f, "id"): a(f, "href") for f in root.findall("ovf:References/ovf:File", OVF_NS)}
    disks = {a(d, "diskId"): files.get(a(d, "fileRef")) for d in root.findall("ovf:DiskSection/ovf:Disk", OVF_NS)}
    system = root.find("ovf:VirtualSystem", OVF_NS)
    if system is None:
        raise ImportRejected("The OVF descriptor has no VirtualSystem.")
    name_el = system.find("ovf:Name", OVF_NS)
    name = (name_el.text if name_el is not None else None) or a(system, "id") or "imported"
    memory_mb, cpus, order = 1024, 1, []
    for item in system.findall("ovf:VirtualHardwareSection/ovf:Item", OVF_NS):
        kind = item.findtext("rasd:ResourceType", namespaces=OVF_NS)
        qty = item.findtext("rasd:VirtualQuantity", namespaces=OVF_NS)
        if kind == "3" and qty:
            cpus = int(qty)
        elif kind == "4" and qty:
            memory_mb = int(qty) * _units(item.findtext("rasd:AllocationUnits", namespaces=OVF_NS)) >> 20
        elif kind == "17":
            ref = item.findtext("rasd:HostResource", namespaces=OVF_NS) or ""
            order.append(ref.rsplit("/", 1)[-1])
    hrefs = [disks.get(d) for d in order] if order else list(disks.values())
    if not hrefs or any(h is None for h in hrefs):
        raise ImportRejected("The OVF descriptor lists no disk, or a disk without a file.")
    if len(hrefs) > 4:
        raise ImportRejected(f"The appliance has {len(hrefs)} disks; Corral takes at most four.")
    return {"name": name, "memory_mb": max(16, memory_mb), "vcpus": max(1, cpus), "files": hrefs}


def _check_manifest(folder: Path, manifest: Path) -> None:
    for line in manifest.read_text(errors="replace").splitlines():
        m = re.match(r"^(SHA256|SHA1)\((.+)\)\s*=\s*([0-9a-fA-F]+)$", line.strip())
        if not m:
            continue
        algo, name, want = m.groups()
        h = hashlib.new(algo.lower())
        with (folder / name).open("rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        if h.hexdigest().lower() != want.lower():
            raise ImportRejected(f"{name} does not match its {algo} checksum in the OVA's manifest.")


@task_job
def import_ova(progress: Progress, upload_dir: str, meta: str) -> str:
    """Unpack an OVA, read its OVF envelope, convert its disks; leave nothing behind on failure."""
    data = json.loads(meta)
    folder = Path(upload_dir)
    try:
        progress.step(f"Unpacking {data['filename']}", 5)
        unpacked = folder / "ova"
        try:
            with tarfile.open(folder / "upload-0") as tar:
                tar.extractall(unpacked, filter="data")  # refuses absolute paths, .., devices and links out
        except (tarfile.TarError, OSError) as exc:
            raise ImportRejected(f"{data['filename']} is not an OVA (tar) archive: {exc}") from None
        ovfs = sorted(unpacked.rglob("*.ovf"))
        if not ovfs:
            raise ImportRejected(f"{data['filename']} holds no .ovf descriptor.")
        ovf = ovfs[0]
        info = parse_ovf(ovf.read_text(errors="replace"))
        for mf in ovf.parent.glob("*.mf"):
            progress.step("Checking the manifest's checksums", 10)
            _check_manifest(ovf.parent, mf)
        converted = []
        for i, href in enumerate(info["files"]):
            path = (ovf.parent / href).resolve()
            if not path.is_file() or ovf.parent.resolve() not in path.parents:
                raise ImportRejected(f"The OVF refers to {href}, which is not in the archive.")
            converted.append(to_qcow2(path, progress, i, len(info["files"])))
        name = data.get("name") or info["name"]
        progress.step("Adding the appliance to the library", 85)
        row = add_appliance(converted, name=name,
                            description=data.get("description") or f"Imported from {data['filename']}",
                            min_memory_mb=info["memory_mb"], max_memory_mb=4 * info["memory_mb"],
                            vcpus=info["vcpus"], source="ova", user_id=data.get("user_id"),
                            detail=f"OVA {data['filename']}: {info['memory_mb']} MB, {info['vcpus']} vCPU(s), "
                                   f"{len(converted)} disk(s)")
        return row.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


USER_AGENT = "Corral appliance catalog client"
DOWNLOAD_ATTEMPTS = 5


def _http_get(url: str, headers: dict | None = None, timeout: float = 30):
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - the manager's configured catalog


@task_job
def refresh_catalog(progress: Progress) -> str:
    from .. import catalog

    state = catalog.load()
    progress.step(f"Fetching {state['url']}", 20)
    try:
        with _http_get(state["url"]) as resp:
            data = resp.read(16 << 20)
        entries = catalog.parse_index(data, state["url"])
    except (OSError, catalog.CatalogError) as exc:
        state["error"] = f"Could not read the catalog: {exc}"
        catalog.save(state)
        raise ImportRejected(state["error"]) from None
    state.update(entries=entries, fetched_at=time.time(), error=None)
    catalog.save(state)
    progress.log(f"{len(entries)} appliance(s) offered.")
    return str(len(entries))


def download(url: str, dest: Path, size: int, sha256: str, progress: Progress, done_before: int, total: int) -> None:
    """Download with resume (HTTP Range) across dropped connections, then verify the sha256."""
    part = dest.with_suffix(dest.suffix + ".part")
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        have = part.stat().st_size if part.exists() else 0
        if have >= size:
            break
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with _http_get(url, headers) as resp:
                if have and resp.status != 206:  # the server ignored Range: start over
                    have = 0
                    part.unlink(missing_ok=True)
                with part.open("ab") as out:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        have += len(chunk)
                        progress.bytes(done_before + have, total, pct_from=5, pct_to=75)
            if have < size:
                raise http.client.IncompleteRead(b"", size - have)
        except (OSError, http.client.HTTPException) as exc:
            progress.log(f"Download of {url} interrupted at {have} bytes ({exc}); resuming "
                         f"(attempt {attempt + 1} of {DOWNLOAD_ATTEMPTS}).")
            time.sleep(min(5, attempt))
            continue
    else:
        raise ImportRejected(f"{url} could not be downloaded after {DOWNLOAD_ATTEMPTS} attempts.")
    if part.stat().st_size != size:
        raise ImportRejected(f"{url} has {part.stat().st_size} bytes, the catalog says {size}.")
    got = hashlib.sha256()
    with part.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            got.update(chunk)
    if got.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise ImportRejected(f"{url} does not match the catalog's sha256 (got {got.hexdigest()[:12]}…).")
    part.replace(dest)


@task_job
def download_catalog_entry(progress: Progress, name: str, user_id: int) -> str:
    from .. import catalog

    entry = next((e for e in catalog.load()["entries"] if e["name"] == name), None)
    if entry is None:
        raise ImportRejected(f"The catalog no longer offers {name}.")
    folder = library.library_dir() / "downloads" / re.sub(r"[^A-Za-z0-9._-]", "_", name)
    folder.mkdir(parents=True, exist_ok=True)  # kept across attempts so a retried task resumes
    ok = False
    try:
        total, done = entry["size_bytes"] or 1, 0
        files = []
        for i, d in enumerate(entry["disks"]):
            progress.step(f"Downloading disk {i + 1} of {len(entry['disks'])}", 5)
            dest = folder / f"disk{i}"
            if not dest.exists():
                download(d["url"], dest, d["size_bytes"], d["sha256"], progress, done, total)
            done += d["size_bytes"]
            files.append(dest)
        converted = [to_qcow2(f, progress, i, len(files)) for i, f in enumerate(files)]
        progress.step("Adding the appliance to the library", 85)
        add_appliance(converted, name=name, description=entry["description"], min_memory_mb=entry["min_memory_mb"],
                      max_memory_mb=entry["max_memory_mb"], vcpus=entry["vcpus"], source="catalog",
                      user_id=user_id, detail="downloaded from the catalog")
        ok = True
        return name
    finally:
        # Keep partial downloads of an interrupted transfer for the next attempt; drop everything else.
        if ok or not any(folder.glob("*.part")):
            shutil.rmtree(folder, ignore_errors=True)

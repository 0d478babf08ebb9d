"""Jobs for the library: turn uploads, OVA packages, catalog downloads and VMs into appliances.

Every way in ends in :func:`_add` (the library's one add-appliance function,
then the job's one commit) and, on any failure, leaves nothing behind: no
rows, no files. Image tools run behind :mod:`portal.vmm.convert` (this
machine) and :mod:`portal.vmm.images` (a server).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import time
from pathlib import Path

import requests
from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from .. import backups, catalog, library, servers
from ..extensions import db
from ..models import VM, Appliance, Backup
from ..shared import shared_dir
from ..vmm import backup as vmm_backup
from ..vmm import convert, images
from . import Progress, task_job


class ImportRejected(Exception):
    """What was offered cannot become an appliance; the message tells the user why."""


def _to_qcow2(path: Path, label: str, progress: Progress, position: int, count: int) -> Path:
    """Decompress if needed, inspect by content, convert to ``converted-<position>.qcow2`` beside ``path``."""
    work = path
    kind = convert.compression_of(path)
    if kind:
        progress.log(f"{label} is {kind}-compressed; decompressing.")
        work = path.with_name(path.name + ".decompressed")
        convert.decompress(path, kind, work, label=label)
    fmt = convert.inspect(work, label=label)
    progress.step(f"Converting disk {position + 1} of {count} ({fmt}) to qcow2", 20 + 60 * position // count)
    out = path.with_name(f"converted-{position}.qcow2")
    convert.to_qcow2(work, fmt, out, label=label)
    return out


def _add(progress: Progress, disks: list[Path], **fields) -> str:
    """Add the appliance and commit once; on a failure after the flush, remove its files too."""
    progress.step("Adding the appliance to the library", 85)
    try:
        row = library.add_appliance(disks, **fields)
    except library.LibraryError as exc:
        raise ImportRejected(str(exc)) from None
    try:
        db.session.commit()
    except BaseException:
        db.session.rollback()
        library.remove_appliance_files(row.id)
        raise
    return row.name


def _new_name(name: str) -> str:
    """Refuse early (before long work) a name the library would refuse at the end."""
    try:
        return library.check_new_name(name)
    except library.LibraryError as exc:
        raise ImportRejected(str(exc)) from None


@task_job
def import_uploaded(progress: Progress, upload_dir: str, meta: str) -> str:
    """Turn uploaded files into a ready appliance; on any failure leave nothing behind."""
    data = json.loads(meta)
    folder = Path(upload_dir)
    try:
        name = _new_name(data["name"])
        converted = []
        for i, label in enumerate(data["names"]):
            progress.step(f"Checking {label}", 10 + 60 * i // len(data["names"]))
            converted.append(_to_qcow2(folder / data["files"][i], label, progress, i, len(data["names"])))
        return _add(progress, converted, name=name, description=data.get("description"),
                    min_memory_mb=data["min_memory_mb"], max_memory_mb=data["max_memory_mb"], vcpus=data["vcpus"],
                    os_hint=data.get("os_hint"), source="upload", user_id=data.get("user_id"),
                    detail=f"uploaded {', '.join(data['names'])}")
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


def parse_ovf(xml: str | bytes) -> dict:
    """Name, memory (MB), CPUs and the ordered disk files of an OVF envelope.

    The envelope comes from outside: it is parsed with defusedxml, which
    refuses DTDs, entity declarations (billion laughs) and external entities.
    """
    try:
        root = SafeET.fromstring(xml, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise ImportRejected(f"The OVF descriptor declares a DTD or XML entities, which Corral refuses "
                             f"({type(exc).__name__}).") from None
    except SafeET.ParseError as exc:
        raise ImportRejected(f"The OVF descriptor is not valid XML: {exc}") from None
    a = lambda el, name: el.get(f"{{{OVF_NS['ovf']}}}{name}")  # noqa: E731
    files = {a(f, "id"): a(f, "href") for f in root.findall("ovf:References/ovf:File", OVF_NS)}
    disks = {a(d, "diskId"): files.get(a(d, "fileRef")) for d in root.findall("ovf:DiskSection/ovf:Disk", OVF_NS)}
    system = root.find("ovf:VirtualSystem", OVF_NS)
    if system is None:
        raise ImportRejected("The OVF descriptor has no VirtualSystem.")
    name_el = system.find("ovf:Name", OVF_NS)
    name = (name_el.text if name_el is not None else None) or a(system, "id") or "imported"
    memory_mb, cpus, order = 1024, 1, []
    try:
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
    except ValueError as exc:
        raise ImportRejected(f"The OVF descriptor has an unreadable CPU or memory quantity ({exc}).") from None
    hrefs = [disks.get(d) for d in order] if order else list(disks.values())
    if not hrefs or any(h is None for h in hrefs):
        raise ImportRejected("The OVF descriptor lists no disk, or a disk without a file.")
    if len(hrefs) > 4:
        raise ImportRejected(f"The appliance has {len(hrefs)} disks; Corral takes at most four.")
    return {"name": name, "memory_mb": max(16, memory_mb), "vcpus": max(1, cpus), "files": hrefs}


def _inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` when that is a file inside ``folder`` (no ``..``, absolute path or link out)."""
    path = (folder / name).resolve()
    if not path.is_file() or folder.resolve() not in path.parents:
        raise ImportRejected(f"{what} {name}, which is not in the archive.")
    return path


def _check_manifest(folder: Path, manifest: Path) -> None:
    for line in manifest.read_text(errors="replace").splitlines():
        m = re.match(r"^(SHA256|SHA1)\((.+)\)\s*=\s*([0-9a-fA-F]+)$", line.strip())
        if not m:
            continue
        algo, name, want = m.groups()
        h = hashlib.new(algo.lower())
        with _inside(folder, name, "The manifest names").open("rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
        if h.hexdigest().lower() != want.lower():
            raise ImportRejected(f"{name} does not match its {algo} checksum in the OVA's manifest.")


def _ova_name(given: str, from_ovf: str) -> str:
    """The form's name, else the OVF's own name made to follow the name rule."""
    if given:
        return _new_name(given)
    try:
        return library.check_new_name(library.name_from(from_ovf))
    except library.LibraryError as exc:
        raise ImportRejected(f"The OVF's name cannot be used ({exc}); give the appliance a name.") from None


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
        info = parse_ovf(ovf.read_bytes())
        name = _ova_name(data.get("name") or "", info["name"])
        for mf in ovf.parent.glob("*.mf"):
            progress.step("Checking the manifest's checksums", 10)
            _check_manifest(ovf.parent, mf)
        paths = [_inside(ovf.parent, href, "The OVF refers to") for href in info["files"]]
        converted = [_to_qcow2(p, p.name, progress, i, len(paths)) for i, p in enumerate(paths)]
        return _add(progress, converted, name=name,
                    description=data.get("description") or f"Imported from {data['filename']}",
                    min_memory_mb=info["memory_mb"], max_memory_mb=4 * info["memory_mb"], vcpus=info["vcpus"],
                    source="ova", user_id=data.get("user_id"),
                    detail=f"OVA {data['filename']}: {info['memory_mb']} MB, {info['vcpus']} vCPU(s), "
                           f"{len(converted)} disk(s)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


USER_AGENT = "Corral appliance catalog client"
DOWNLOAD_ATTEMPTS = 5
TIMEOUT = (10, 60)  # seconds to connect, seconds of silence while reading
INDEX_LIMIT = 16 << 20


def _get(url: str, headers: dict | None = None) -> requests.Response:
    """A streamed GET of an http(s) URL; redirects are followed, and requests refuses any to another scheme."""
    if not catalog.is_web_url(url):
        raise ImportRejected(f"{url[:80]} is not an http:// or https:// address.")
    resp = requests.get(url, headers={"User-Agent": USER_AGENT, **(headers or {})}, timeout=TIMEOUT, stream=True)
    try:
        resp.raise_for_status()
    except requests.HTTPError:
        resp.close()
        raise
    return resp


@task_job
def refresh_catalog(progress: Progress) -> str:
    state = catalog.load()
    progress.step(f"Fetching {state['url']}", 20)
    try:
        with _get(state["url"]) as resp:
            data = resp.raw.read(INDEX_LIMIT, decode_content=True)
        entries = catalog.parse_index(data, state["url"])
    except (requests.RequestException, OSError, ImportRejected, catalog.CatalogError) as exc:
        state["error"] = f"Could not read the catalog: {exc}"
        catalog.save(state)
        raise ImportRejected(state["error"]) from None
    state.update(entries=entries, fetched_at=time.time(), error=None)
    catalog.save(state)
    progress.log(f"{len(entries)} appliance(s) offered.")
    return str(len(entries))


def _fetch_once(url: str, part: Path, size: int, progress: Progress, done_before: int, total: int) -> None:
    """One transfer into ``part``, resuming (HTTP Range) from what it holds; raises when it ends short."""
    have = part.stat().st_size if part.exists() else 0
    with _get(url, {"Range": f"bytes={have}-"} if have else None) as resp:
        if have and resp.status_code != 206:  # the server ignored Range: start over
            have = 0
            part.unlink(missing_ok=True)
        with part.open("ab") as out:
            for chunk in resp.iter_content(1 << 20):
                out.write(chunk)
                have += len(chunk)
                progress.bytes(done_before + have, total, pct_from=5, pct_to=75)
    if have < size:
        raise requests.ConnectionError(f"the transfer ended at {have} of {size} bytes")


def download(url: str, dest: Path, size: int, sha256: str, progress: Progress, done_before: int, total: int) -> None:
    """Download with resume (HTTP Range) across dropped connections, then verify size and sha256."""
    part = dest.with_suffix(dest.suffix + ".part")
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        if part.exists() and part.stat().st_size >= size:
            break
        try:
            _fetch_once(url, part, size, progress, done_before, total)
            break
        except (requests.RequestException, OSError) as exc:
            have = part.stat().st_size if part.exists() else 0
            if attempt == DOWNLOAD_ATTEMPTS:
                raise ImportRejected(f"{url} could not be downloaded after {DOWNLOAD_ATTEMPTS} attempts "
                                     f"(last: {exc}).") from None
            progress.log(f"Download of {url} interrupted at {have} bytes ({exc}); resuming "
                         f"(attempt {attempt + 1} of {DOWNLOAD_ATTEMPTS}).")
            time.sleep(min(5, attempt))
    if part.stat().st_size != size:
        part.unlink()  # not worth resuming: a retry starts over
        raise ImportRejected(f"{url} has {part.stat().st_size} bytes, the catalog says {size}.")
    got = images.local_sha256(part)
    if got != sha256:
        part.unlink(missing_ok=True)
        raise ImportRejected(f"{url} does not match the catalog's sha256 (got {got[:12]}…).")
    part.replace(dest)


@task_job
def download_catalog_entry(progress: Progress, name: str, user_id: int) -> str:
    entry = next((e for e in catalog.load()["entries"] if e["name"] == name), None)
    if entry is None:
        raise ImportRejected(f"The catalog no longer offers {name}.")
    name = _new_name(name)
    folder = shared_dir("downloads") / re.sub(r"[^A-Za-z0-9._-]", "_", name)
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
        converted = [_to_qcow2(f, f"disk {i + 1} of {name}", progress, i, len(files)) for i, f in enumerate(files)]
        result = _add(progress, converted, name=name, description=entry["description"],
                      min_memory_mb=entry["min_memory_mb"], max_memory_mb=entry["max_memory_mb"],
                      vcpus=entry["vcpus"], source="catalog", user_id=user_id, detail="downloaded from the catalog")
        ok = True
        return result
    finally:
        # Keep partial downloads of an interrupted transfer for the next attempt; drop everything else.
        if ok or not any(folder.glob("*.part")):
            shutil.rmtree(folder, ignore_errors=True)


def _copy_to_library(progress: Progress, vm: VM, server, images_by_position: list[tuple[int, str]], *,
                     name: str, user_id: int, description: str, detail: str) -> str:
    """Flatten server images (each with its backing chain) on ``server``, fetch them, add a new appliance
    sized like the VM."""
    src: Appliance | None = vm.appliance
    folder = library.new_work_dir("copy-back")
    try:
        fetched = []
        with servers.session_for(server) as session:
            for i, (position, path) in enumerate(images_by_position):
                progress.step(f"Flattening and fetching disk {position} from {server.hostname}",
                              10 + 70 * i // len(images_by_position))
                local = folder / f"disk{position}.qcow2"
                images.flatten(session, path, local, lambda n, t: progress.bytes(n, t))
                fetched.append(local)
        return _add(progress, fetched, name=name, description=description,
                    min_memory_mb=src.min_memory_mb if src else min(128, vm.memory_mb),
                    max_memory_mb=src.max_memory_mb if src else max(vm.memory_mb, 4096), vcpus=vm.vcpus,
                    os_hint=src.os_hint if src else None, source="copy", user_id=user_id, detail=detail)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@task_job
def copy_back(progress: Progress, vm_id: int, name: str, user_id: int) -> str:
    """Flatten each of a VM's disks on its server, fetch them, and add them as a new appliance."""
    vm = db.session.get(VM, vm_id)
    if vm is None:
        raise LookupError("the VM was deleted meanwhile")
    name = _new_name(name)
    return _copy_to_library(progress, vm, vm.server, [(vd.position, vd.path) for vd in vm.vdisks], name=name,
                            user_id=user_id, description=f"Copied back from VM {vm.name} (VMID {vm.vmid})",
                            detail=f"copied back from {vm.name}")


@task_job
def copy_backup(progress: Progress, vm_id: int, backup_id: int, name: str, user_id: int) -> str:
    """A backup becomes a new appliance: every file of its chain checked (sha256), then each disk flattened
    (an incremental backup reads through the backups it builds on) and fetched."""
    vm = db.session.get(VM, vm_id)
    backup = db.session.get(Backup, backup_id)
    if vm is None or backup is None or backup.vm_id != vm.id:
        raise LookupError("the VM or its backup was deleted meanwhile")
    name = _new_name(name)
    backups.check_copy(backup)
    files = [f for b in backups.chain(backup) for f in b.files]
    with servers.session_for(backup.server) as session:
        for i, f in enumerate(files):
            progress.step(f"Checking {f.path} (sha256)", 2 + 8 * i // len(files))
            vmm_backup.verify(session, f.path, f.sha256)
    return _copy_to_library(progress, vm, backup.server, [(f.position, f.path) for f in backup.files], name=name,
                            user_id=user_id, description=f"From {backups.describe(backup)}",
                            detail=f"copied from backup {backup.id} of {vm.name}")

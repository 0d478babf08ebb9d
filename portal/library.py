"""The library: appliances (disk images plus sizing hints) and ISO images.

Files live under ``<SHARED_PATH>/library`` (see :mod:`portal.shared`), which
every worker reaches; VM creation copies them to servers. One name rule and
one add-appliance function serve every way in (upload, OVA, catalog, copy
back). Functions flush, callers commit.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from flask import current_app

from . import actionlog
from .extensions import db
from .models import Appliance, ApplianceDisk, ApplianceState
from .shared import shared_dir
from .vmm import appliance as test_appliance
from .vmm import images
from .vmm.session import LocalSession, Target

TEST_APPLIANCE = "corral-test"

# Names end up in pages, file names and task titles: a short, plain alphabet only.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{1,63}")
NAME_RULE = ("A name has 2 to 64 letters, digits, spaces, dots, dashes or underscores, "
             "and starts with a letter or digit.")


class LibraryError(Exception):
    """A library change that cannot be made, with the reason."""


def check_name(name: str) -> str:
    """The name without surrounding spaces, or LibraryError when it breaks the name rule."""
    name = (name or "").strip()
    if not NAME_PATTERN.fullmatch(name):
        raise LibraryError(NAME_RULE)
    return name


def name_from(text: str) -> str:
    """A name made from foreign text (an OVF's ``<Name>``): other characters become dashes.

    Deterministic, so the same package always gets the same name; the result
    still passes :func:`check_name` or raises.
    """
    slug = re.sub(r"[^A-Za-z0-9._ -]+", "-", text or "").strip(" ._-")[:64].rstrip(" ._-")
    return check_name(slug)


def appliance_exists(name: str) -> bool:
    return db.session.execute(db.select(Appliance.id).where(Appliance.name == name.strip())).first() is not None


def check_new_name(name: str) -> str:
    """A usable name that no appliance has yet, or LibraryError saying why not."""
    name = check_name(name)
    if appliance_exists(name):
        raise LibraryError(f"An appliance called {name} exists already.")
    return name


def library_dir() -> Path:
    return shared_dir("library")


def appliance_dir(appliance_id: int) -> Path:
    return library_dir() / f"appliance-{appliance_id}"


MAX_UPLOAD_DISKS = 4


def check_upload(name: str, disk_count: int, min_memory_mb: int, max_memory_mb: int) -> str:
    """What an appliance upload must satisfy before its files are kept; the name, or LibraryError."""
    if not 1 <= disk_count <= MAX_UPLOAD_DISKS:
        raise LibraryError("Choose one to four disk image files.")
    if min_memory_mb > max_memory_mb:
        raise LibraryError("The minimum memory is above the maximum.")
    return check_new_name(name)


def submit_upload(files: list, meta: dict, requester_id: int):
    """Save uploaded disk images (streamed to disk) in a work folder and record their import task
    (flushes). Returns the submission and the folder, which the edge removes if the task cannot start.
    ``meta``: name, description, min/max memory, vCPUs, OS hint (checked with :func:`check_upload`)."""
    import json

    from . import tasks
    from .jobs.library import import_uploaded

    folder = new_work_dir("uploads")
    for i, f in enumerate(files):
        f.save(folder / f"upload-{i}")
    meta = {**meta, "user_id": requester_id, "files": [f"upload-{i}" for i in range(len(files))],
            "names": [f.filename for f in files]}
    sub = tasks.submit("appliance-import", import_uploaded, title=f"Import appliance {meta['name']}",
                       requester_id=requester_id, key=f"appliance-import:{meta['name']}",
                       args=(str(folder), json.dumps(meta)))
    return sub, folder


def check_ova_name(name: str) -> str:
    """An OVA import's name: empty (the OVF's own name is used, checked by the job) or a new valid one."""
    return check_new_name(name) if name.strip() else ""


def submit_ova(ova, meta: dict, requester_id: int):
    """Save an uploaded OVA package in a work folder and record its import task (flushes); the submission
    and the folder, which the edge removes if the task cannot start. ``meta``: name (may be empty), description."""
    import json

    from . import tasks
    from .jobs.library import import_ova

    folder = new_work_dir("uploads")
    ova.save(folder / "upload-0")
    meta = {**meta, "user_id": requester_id, "filename": ova.filename}
    sub = tasks.submit("appliance-import", import_ova, title=f"Import OVA {ova.filename}", requester_id=requester_id,
                       key=None, args=(str(folder), json.dumps(meta)))
    return sub, folder


def new_work_dir(kind: str) -> Path:
    """A fresh folder for files on their way into the library (``uploads``, ``copy-back``)."""
    path = shared_dir(kind) / uuid.uuid4().hex
    path.mkdir()
    return path


def remove_appliance_files(appliance_id: int) -> None:
    shutil.rmtree(appliance_dir(appliance_id), ignore_errors=True)


def appliance_cache() -> Path:
    configured = current_app.config.get("APPLIANCE_CACHE")
    return Path(configured) if configured else test_appliance.DEFAULT_CACHE_DIR


def add_disk_file(app_row: Appliance, position: int, source: Path, *, move: bool = False) -> ApplianceDisk:
    """Put a disk image into the appliance's folder and record its format, sizes and checksum."""
    folder = appliance_dir(app_row.id)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"disk{position}.qcow2"
    tmp = target.with_suffix(".part")
    if move:
        shutil.move(source, tmp)
    else:
        shutil.copyfile(source, tmp)
    tmp.replace(target)
    with LocalSession(Target("library", "127.0.0.1", transport="local")) as session:
        found = images.info(session, str(target))
    if found.format != "qcow2":
        raise LibraryError(f"{source.name} is {found.format}, expected qcow2 after conversion")
    disk = ApplianceDisk(appliance_id=app_row.id, position=position, path=str(target), format=found.format,
                         virtual_size_bytes=found.virtual_size, file_size_bytes=target.stat().st_size,
                         sha256=images.local_sha256(target))
    db.session.add(disk)
    db.session.flush()
    return disk


def add_appliance(disks: list[Path], *, name: str, description: str | None, min_memory_mb: int,
                  max_memory_mb: int, vcpus: int, source: str, user_id: int | None, detail: str,
                  os_hint: str | None = None, move: bool = True) -> Appliance:
    """Add a ready appliance made of qcow2 ``disks`` (moved into the library unless ``move=False``).

    Flushes, never commits: the caller commits once, or rolls back and calls
    :func:`remove_appliance_files`. When this function itself fails, it has
    already removed the files it placed.
    """
    name = check_new_name(name)
    if min_memory_mb > max_memory_mb:
        raise LibraryError(f"{name}: the minimum memory ({min_memory_mb} MB) is above the maximum "
                           f"({max_memory_mb} MB).")
    row = Appliance(name=name, description=description, min_memory_mb=min_memory_mb, max_memory_mb=max_memory_mb,
                    vcpus=vcpus, os_hint=os_hint, source=source, state=ApplianceState.IMPORTING.value,
                    created_by_id=user_id)
    db.session.add(row)
    db.session.flush()
    try:
        for i, disk in enumerate(disks):
            add_disk_file(row, i, disk, move=move)
        row.state = ApplianceState.READY.value
        actionlog.record("appliance-added", target=row, user_id=user_id, detail=detail)
        db.session.flush()
    except BaseException:
        remove_appliance_files(row.id)
        raise
    return row


def ensure_test_appliance() -> Appliance | None:
    """Build (or reuse) the small test appliance and add it to the library once."""
    if appliance_exists(TEST_APPLIANCE):
        return None
    image = test_appliance.build_appliance(appliance_cache())
    return add_appliance([image], name=TEST_APPLIANCE, description="Tiny Linux (Debian cloud kernel + busybox): "
                         "prints a heartbeat on its serial console and to its disk. Boots in seconds; for trying "
                         "Corral out.", min_memory_mb=128, max_memory_mb=1024, vcpus=1, os_hint="Linux (busybox)",
                         source="builtin", user_id=None, detail="built-in test appliance", move=False)

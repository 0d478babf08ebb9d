"""The library: appliances (disk images plus sizing hints) and ISO images.

Files live under ``<instance>/library`` on the Corral machine; VM creation
copies them to servers. Functions flush, callers commit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flask import current_app

from . import actionlog
from .extensions import db
from .models import Appliance, ApplianceDisk
from .vmm import appliance as test_appliance
from .vmm import images
from .vmm.session import LocalSession, Target

TEST_APPLIANCE = "corral-test"


class LibraryError(Exception):
    """A library change that cannot be made, with the reason."""


def library_dir() -> Path:
    path = Path(current_app.instance_path) / "library"
    path.mkdir(parents=True, exist_ok=True)
    return path


def appliance_dir(appliance_id: int) -> Path:
    return library_dir() / f"appliance-{appliance_id}"


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


def ensure_test_appliance() -> Appliance | None:
    """Build (or reuse) the small test appliance and add it to the library once."""
    exists = db.session.execute(db.select(Appliance).where(Appliance.name == TEST_APPLIANCE)).scalar_one_or_none()
    if exists is not None:
        return None
    image = test_appliance.build_appliance(appliance_cache())
    row = Appliance(name=TEST_APPLIANCE, description="Tiny Linux (Debian cloud kernel + busybox): prints a "
                    "heartbeat on its serial console and to its disk. Boots in seconds; for trying Corral out.",
                    min_memory_mb=128, max_memory_mb=1024, vcpus=1, os_hint="Linux (busybox)", source="builtin",
                    state="ready")
    db.session.add(row)
    db.session.flush()
    add_disk_file(row, 0, image)
    actionlog.record("appliance-added", target=row, detail="built-in test appliance")
    return row

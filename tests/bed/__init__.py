"""Corral's multi-server libvirt test bed (see ``core`` for what a server is).

    from tests.bed import Bed
    bed = Bed()                  # state dir: $CORRAL_BED_DIR or /tmp/corral-bed
    servers = bed.up(n=2)        # list[BedServer]; .to_dict() is JSON-able
    bed.exec(1, ["virsh", "list"])
    bed.down()

CLI: ``python -m tests.bed up --servers N [--shared] [--clean]``,
``python -m tests.bed down [--purge]``, ``python -m tests.bed status``.
Pytest: ``from tests.bed.fixtures import bed`` (session scope).
"""

from .core import (
    BRIDGE,
    BRIDGE_ADDRESS,
    DEFAULT_STATE_DIR,
    DISK_MOUNTPOINT,
    GUEST_BRIDGE,
    IMAGES_DIR,
    SHARED_MOUNTPOINT,
    Bed,
    BedError,
    BedServer,
    bed_processes,
    server_address,
)
from .guest import GuestLog, appliance_domain_xml, detect_domain_type, wait_for_serial

__all__ = [
    "BRIDGE",
    "BRIDGE_ADDRESS",
    "DEFAULT_STATE_DIR",
    "DISK_MOUNTPOINT",
    "GUEST_BRIDGE",
    "IMAGES_DIR",
    "SHARED_MOUNTPOINT",
    "Bed",
    "BedError",
    "BedServer",
    "GuestLog",
    "appliance_domain_xml",
    "bed_processes",
    "detect_domain_type",
    "server_address",
    "wait_for_serial",
]

"""MAC addresses for VM NICs: generated from the VMID, or custom and checked.

A generated MAC is ``02:c0:VV:VV:VV:NN``: the first octet 0x02 has the
locally administered bit set and the multicast bit clear, the next three
octets are the VMID (up to 16,777,215) and the last is the NIC's position,
so it is unique across the cluster by construction. Custom MACs must be
unicast, not all zero, and unique (the database enforces the last).
"""

from __future__ import annotations

import re

from .extensions import db
from .models import NIC

GENERATED_PREFIX = (0x02, 0xC0)
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_VMID = 0xFFFFFF


class MacError(ValueError):
    """A MAC address that cannot be used, with the reason."""


def generated(vmid: int, position: int = 0) -> str:
    if not 0 < vmid <= MAX_VMID:
        raise MacError(f"VMID {vmid} is outside 1..{MAX_VMID}")
    if not 0 <= position <= 0xFF:
        raise MacError(f"NIC position {position} is outside 0..255")
    octets = [*GENERATED_PREFIX, vmid >> 16 & 0xFF, vmid >> 8 & 0xFF, vmid & 0xFF, position]
    return ":".join(f"{o:02x}" for o in octets)


def normalise(mac: str) -> str:
    mac = mac.strip().lower().replace("-", ":")
    if not MAC_RE.match(mac):
        raise MacError(f"{mac!r} is not a MAC address (six hex pairs such as 02:00:00:aa:bb:cc).")
    first = int(mac[:2], 16)
    if first & 0x01:
        raise MacError(f"{mac} is a multicast address; a NIC needs a unicast one (even first octet).")
    if mac == "00:00:00:00:00:00":
        raise MacError("00:00:00:00:00:00 is not a usable address.")
    return mac


def check_custom(mac: str) -> str:
    """Normalise a custom MAC and make sure no NIC has it yet."""
    mac = normalise(mac)
    if db.session.execute(db.select(NIC.id).where(NIC.mac == mac)).first():
        raise MacError(f"{mac} is already used by another VM's NIC.")
    return mac


def rocks_prefix(public_ip: str) -> tuple[int, int, int]:
    """Rocks' MAC prefix for a cluster whose frontend has *public_ip*: drop the first octet, reverse the
    other three, set the locally administered bit and clear the multicast bit of the first
    (137.110.119.118 -> 76:77:6e)."""
    parts = public_ip.strip().split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise MacError(f"{public_ip!r} is not an IPv4 address.")
    first, second, third = (int(p) for p in reversed(parts[1:]))
    prefix = ((first | 0x02) & ~0x01 & 0xFF, second, third)
    if prefix[:2] == GENERATED_PREFIX:
        raise MacError(f"{public_ip} gives the prefix {prefix[0]:02x}:{prefix[1]:02x}, which Corral's generated "
                       "MACs use; choose another public address.")
    return prefix


def rocks_macs(public_ip: str, count: int, taken: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """*count* MACs ``PP:PP:PP:8C:CC:CC`` (a counter per VM and NIC from 0, as in Rocks' ``…:80:00:00``,
    ``…:80:00:01``), skipping every MAC in *taken* (other clusters', generated and custom ones)."""
    prefix = rocks_prefix(public_ip)
    out: list[str] = []
    n = 0
    while len(out) < count:
        if n > 0x7FFFFF:
            raise MacError(f"No free MAC left under the prefix of {public_ip}.")
        mac = ":".join(f"{o:02x}" for o in (*prefix, 0x80 | n >> 16, n >> 8 & 0xFF, n & 0xFF))
        if mac not in taken:
            out.append(mac)
        n += 1
    return out


def taken_macs() -> set[str]:
    """Every MAC a NIC has now."""
    return set(db.session.execute(db.select(NIC.mac)).scalars())

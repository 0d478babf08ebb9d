"""Network devices on a VM server: the bridge a network's NICs attach to, and its VLAN carrier.

A network segment on a server is a Linux bridge, plus for a VLAN id a carrier
device enslaved to it:

* an 802.1Q sub-interface of the uplink (``ip link add link UPLINK name cvN
  type vlan id N``) where the server's kernel has 802.1Q;
* else a VXLAN device with VNI = the VLAN id (``cxN``), unicast over the
  servers' own addresses to every other server (static all-zero FDB entries,
  so no multicast is needed).  The test bed's kernel has no 802.1Q, so there
  VLANs travel as VXLAN.

Without a VLAN, a bridged network uses the uplink itself, which must already
be a bridge on the server (Corral does not move a server's address), and an
isolated network is a bridge with no carrier at all.

Everything is idempotent: :func:`ensure` adds only what is missing (and FDB
entries for peers added since), :func:`release` removes the bridge and its
carrier once no guest port is left on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import quoteattr as q

import libvirt

from .errors import VmmError
from .session import HostSession

VXLAN_PORT = 4789
ZERO_MAC = "00:00:00:00:00:00"


class NetdevError(VmmError):
    """A server cannot carry a network as asked (missing NIC, not a bridge, ...)."""


@dataclass(frozen=True)
class Segment:
    bridge: str  # the bridge guests attach to
    uplink: str | None = None  # the server NIC a VLAN rides on (or the bridge itself, no VLAN)
    vlan: int | None = None
    local: str | None = None  # this server's address (VXLAN source)
    peers: tuple[str, ...] = ()  # the other servers' addresses (VXLAN destinations)


def carrier_names(vlan: int) -> tuple[str, str]:
    """The 802.1Q and the VXLAN device names for a VLAN id (15 characters at most)."""
    return f"cv{vlan}", f"cx{vlan}"


def _exists(session: HostSession, dev: str) -> bool:
    return session.run(["test", "-e", f"/sys/class/net/{dev}"], check=False).ok


def _is_bridge(session: HostSession, dev: str) -> bool:
    return session.run(["test", "-d", f"/sys/class/net/{dev}/bridge"], check=False).ok


def ensure(session: HostSession, seg: Segment) -> str:
    """Make the segment exist on the server; returns how it is carried: bridge, 802.1q or vxlan."""
    host = session.target.hostname
    if seg.uplink and not _exists(session, seg.uplink):
        raise NetdevError(f"{host} has no network interface {seg.uplink}.")
    if seg.vlan is None and seg.uplink:
        if seg.uplink != seg.bridge or not _is_bridge(session, seg.uplink):
            raise NetdevError(f"{seg.uplink} on {host} is not a bridge: a bridged network without a VLAN "
                              "attaches to an existing server bridge.")
        return "bridge"
    if not _exists(session, seg.bridge):
        session.run(["ip", "link", "add", seg.bridge, "type", "bridge"])
    how = "bridge"
    if seg.vlan is not None:
        how = _ensure_carrier(session, seg)
    session.run(["ip", "link", "set", seg.bridge, "up"])
    return how


def _ensure_carrier(session: HostSession, seg: Segment) -> str:
    vlan_dev, vx_dev = carrier_names(seg.vlan)
    if _exists(session, vlan_dev):
        return "802.1q"
    if not _exists(session, vx_dev) and seg.uplink:
        tried = session.run(["ip", "link", "add", "link", seg.uplink, "name", vlan_dev, "type", "vlan",
                             "id", str(seg.vlan)], check=False)
        if tried.ok:
            session.run(["ip", "link", "set", vlan_dev, "master", seg.bridge, "up"])
            return "802.1q"
    if not seg.local:
        raise NetdevError(f"{session.target.hostname} has no 802.1Q and no address to carry VLAN {seg.vlan} "
                          "as VXLAN.")
    if not _exists(session, vx_dev):
        argv = ["ip", "link", "add", vx_dev, "type", "vxlan", "id", str(seg.vlan), "dstport", str(VXLAN_PORT),
                "local", seg.local]
        session.run(argv + (["dev", seg.uplink] if seg.uplink else []))
    have = session.run(["bridge", "fdb", "show", "dev", vx_dev]).stdout
    for peer in seg.peers:
        if f"{ZERO_MAC} dst {peer} " not in have + " ":
            session.run(["bridge", "fdb", "append", ZERO_MAC, "dev", vx_dev, "dst", peer])
    session.run(["ip", "link", "set", vx_dev, "master", seg.bridge, "up"])
    return "vxlan"


def release(session: HostSession, seg: Segment) -> bool:
    """Remove the segment's bridge and carrier when no guest port is left; True if removed."""
    if seg.vlan is None and seg.uplink:
        return False  # an existing server bridge: never Corral's to remove
    if not _exists(session, seg.bridge):
        return False
    carriers = set(carrier_names(seg.vlan)) if seg.vlan is not None else set()
    ports = set(session.run(["ls", f"/sys/class/net/{seg.bridge}/brif"]).stdout.split())
    if ports - carriers:
        return False
    for dev in carriers:
        if _exists(session, dev):
            session.run(["ip", "link", "del", dev])
    session.run(["ip", "link", "del", seg.bridge])
    return True


@dataclass(frozen=True)
class NatNetwork:
    """A libvirt NAT network on one server: its own bridge, gateway address, DHCP range and reservations."""

    name: str  # libvirt network name
    bridge: str
    gateway: str  # the server's address on it
    netmask: str
    dhcp_range: tuple[str, str] | None = None
    hosts: tuple[tuple[str, str], ...] = ()  # (mac, ip)


def nat_xml(net: NatNetwork) -> str:
    dhcp = ""
    if net.dhcp_range or net.hosts:
        rng = f"<range start={q(net.dhcp_range[0])} end={q(net.dhcp_range[1])}/>" if net.dhcp_range else ""
        hosts = "".join(f"<host mac={q(m)} ip={q(i)}/>" for m, i in net.hosts)
        dhcp = f"<dhcp>{rng}{hosts}</dhcp>"
    return (f"<network><name>{net.name}</name><forward mode='nat'/><bridge name={q(net.bridge)} stp='off'/>"
            f"<ip address={q(net.gateway)} netmask={q(net.netmask)}>{dhcp}</ip></network>")


def ensure_nat(session: HostSession, net: NatNetwork) -> str:
    """Define and start the libvirt network (redefined while it is not running if its plan changed)."""
    conn = session.libvirt()
    xml = nat_xml(net)
    try:
        found = conn.networkLookupByName(net.name)
    except libvirt.libvirtError:
        found = None
    if found is not None and found.isActive():
        have = found.XMLDesc(0)
        for mac, ip in net.hosts:  # reservations added since it started
            if f"mac='{mac}'" not in have:
                found.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
                             -1, f"<host mac='{mac}' ip='{ip}'/>",
                             libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG)
        return "nat"
    try:
        found = conn.networkDefineXML(xml)
        found.create()
    except libvirt.libvirtError as exc:
        raise NetdevError(f"{session.target.hostname} could not start NAT network {net.name}: "
                          f"{exc.get_error_message()}") from exc
    return "nat"


def release_nat(session: HostSession, net: NatNetwork) -> bool:
    try:
        found = session.libvirt().networkLookupByName(net.name)
    except libvirt.libvirtError:
        return False
    if found.isActive():
        found.destroy()
    found.undefine()
    return True

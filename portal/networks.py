"""Networks VMs' NICs attach to: bridged (onto a server NIC, optionally a VLAN) and isolated.

Rules live here (names, subnets, DHCP ranges, reservations, which bridge a
network uses on every server, the segments a VM needs on a server); the host
work is in :mod:`portal.vmm.netdev`, run by the VM jobs before a domain is
defined or started (see :func:`portal.jobs.networks.ensure_for`).  A NIC
without a network uses QEMU user-mode networking ("outbound only").
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Sequence

from . import macs
from .extensions import db
from .models import NIC, VM, Network, NetworkKind, NetworkReservation, Server, ServerStatus
from .vmm.netdev import NatNetwork, Segment

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
IFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
MAX_NICS = 4
KINDS = (NetworkKind.BRIDGED.value, NetworkKind.NAT.value, NetworkKind.ISOLATED.value)


class NetworkError(ValueError):
    """A network request that cannot be done, with the reason."""


def bridge_name(net: Network) -> str:
    """The bridge guests attach to: the uplink itself (bridged, no VLAN), else one per VLAN or network."""
    if net.vlan is not None:
        return f"cbr{net.vlan}"
    if net.kind == NetworkKind.BRIDGED.value:
        return net.uplink
    if net.kind == NetworkKind.NAT.value:
        return f"cnat{net.id}"
    return f"cbn{net.id}"


def create(*, name: str, kind: str, uplink: str = "", vlan: int | None = None, cidr: str = "",
           dhcp_start: str = "", dhcp_end: str = "", description: str = "") -> Network:
    name = name.strip()
    if not NAME_RE.match(name):
        raise NetworkError("A network name is 1-32 lowercase letters, digits and dashes, starting with a letter.")
    if db.session.execute(db.select(Network.id).where(Network.name == name)).first():
        raise NetworkError(f"A network named {name} already exists.")
    if kind not in KINDS:
        raise NetworkError(f"Unknown network kind {kind!r}: choose bridged, NAT or isolated.")
    uplink = uplink.strip()
    if uplink and not IFACE_RE.match(uplink):
        raise NetworkError(f"{uplink!r} is not an interface name (up to 15 letters, digits, ._-).")
    if kind == NetworkKind.BRIDGED.value and not uplink:
        raise NetworkError("A bridged network needs the servers' interface it rides on (e.g. eth0 or br0).")
    if vlan is not None:
        if not 1 <= vlan <= 4094:
            raise NetworkError("A VLAN id is between 1 and 4094.")
        if db.session.execute(db.select(Network.name).where(Network.vlan == vlan)).first():
            raise NetworkError(f"VLAN {vlan} is already used by another network.")
    subnet = _subnet(cidr) if cidr.strip() else None
    if kind == NetworkKind.NAT.value and (subnet is None or vlan is not None or uplink):
        raise NetworkError("A NAT network needs a subnet (the server takes its first address as the gateway) "
                           "and no VLAN or uplink: each server NATs it onto its own address.")
    start, end = (dhcp_start or "").strip(), (dhcp_end or "").strip()
    if start or end:
        if subnet is None or not (start and end):
            raise NetworkError("A DHCP range needs a subnet and both a first and a last address.")
        a, b = _in(subnet, start), _in(subnet, end)
        if a > b:
            raise NetworkError("The DHCP range's first address is after its last.")
    net = Network(name=name, kind=kind, uplink=uplink or None, vlan=vlan, cidr=str(subnet) if subnet else None,
                  dhcp_start=start or None, dhcp_end=end or None, description=description.strip() or None)
    db.session.add(net)
    db.session.flush()
    net.bridge = bridge_name(net)
    db.session.flush()
    return net


def _subnet(cidr: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(cidr.strip(), strict=False)
    except ValueError:
        raise NetworkError(f"{cidr!r} is not an IPv4 subnet such as 10.20.0.0/24.") from None


def _in(subnet: ipaddress.IPv4Network, addr: str) -> ipaddress.IPv4Address:
    try:
        ip = ipaddress.IPv4Address(addr.strip())
    except ValueError:
        raise NetworkError(f"{addr!r} is not an IPv4 address.") from None
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
        raise NetworkError(f"{ip} is not a host address of {subnet}.")
    return ip


def add_reservation(net: Network, mac: str, ip: str) -> NetworkReservation:
    if not net.cidr:
        raise NetworkError(f"{net.name} has no subnet: set one before reserving addresses.")
    mac = macs.normalise(mac)
    addr = str(_in(ipaddress.IPv4Network(net.cidr), ip))
    for r in db.session.execute(db.select(NetworkReservation).where(NetworkReservation.network_id == net.id)).scalars():
        if r.mac == mac:
            raise NetworkError(f"{mac} already has {r.ip} on {net.name}.")
        if r.ip == addr:
            raise NetworkError(f"{addr} is already reserved for {r.mac} on {net.name}.")
    res = NetworkReservation(mac=mac, ip=addr)
    net.reservations.append(res)
    db.session.flush()
    return res


def delete(net: Network) -> None:
    used = vms_on(net)
    if used:
        raise NetworkError(f"{net.name} is used by {', '.join(v.name for v in used)}: move or delete them first.")
    db.session.delete(net)
    db.session.flush()


def vms_on(net: Network) -> list[VM]:
    return list(db.session.execute(db.select(VM).join(NIC, NIC.vm_id == VM.id).where(NIC.network_id == net.id)
                                   .distinct().order_by(VM.name)).scalars())


def all_networks() -> list[Network]:
    return list(db.session.execute(db.select(Network).order_by(Network.name)).scalars())


def choose(network_ids: list[int | None]) -> list[Network | None]:
    """The networks for a new VM's NICs, in order: None is user-mode ("outbound only")."""
    if not 1 <= len(network_ids) <= MAX_NICS:
        raise NetworkError(f"A VM has one to {MAX_NICS} NICs.")
    chosen = []
    for nid in network_ids:
        net = db.session.get(Network, nid) if nid is not None else None
        if nid is not None and net is None:
            raise NetworkError("That network no longer exists.")
        chosen.append(net)
    return chosen


def from_form(form) -> list[Network | None]:
    """The create pages' ``nic0``..``nic3`` choices: "user" is outbound only, "" no NIC, else a network id."""
    ids: list[int | None] = []
    for i in range(MAX_NICS):
        raw = (form.get(f"nic{i}") or ("user" if i == 0 else "")).strip()
        if raw == "user":
            ids.append(None)
        elif raw.isdigit():
            ids.append(int(raw))
        elif raw:
            raise NetworkError(f"NIC {i}: unknown network choice {raw!r}.")
    return choose(ids)


def carry_problem(net: Network, server: Server) -> str | None:
    """Why the server cannot carry the network (its uplink is not among the server's probed interfaces), or None.
    A server whose interfaces were never probed is given the benefit of the doubt: its task checks on the host."""
    if not net.uplink or not server.interfaces_json:
        return None
    if net.uplink in json.loads(server.interfaces_json):
        return None
    return f"{server.hostname} has no interface {net.uplink} for network {net.name}"


def carries_all(nets: Sequence[Network | None]) -> Callable[[Server], bool]:
    """For placement: whether a server carries every one of the networks."""
    return lambda server: not any(carry_problem(n, server) for n in nets if n is not None)


def attach(vm: VM, nets: list[Network | None]) -> None:
    """Give the VM one NIC per network (position order), generated MACs for the new ones."""
    problems = [p for n in nets if n is not None and vm.server is not None
                for p in [carry_problem(n, vm.server)] if p]
    if problems:
        raise NetworkError("; ".join(problems) + ": choose another server or network.")
    nics = {n.position: n for n in vm.nics}
    for pos, net in enumerate(nets):
        nic = nics.get(pos)
        if nic is None:
            nic = NIC(vm_id=vm.id, position=pos, mac=macs.generated(vm.vmid, pos))
            db.session.add(nic)
            vm.nics.append(nic)
        nic.network_id = net.id if net else None
        nic.network = net
    db.session.flush()


def segments_for(vm: VM, server: Server) -> list[Segment | NatNetwork]:
    """What the VM's networks need on the server: bridge segments (VXLAN peers: every other server that is up)
    and libvirt NAT networks."""
    nets = {n.network.id: n.network for n in vm.nics if n.network is not None}
    if not nets:
        return []
    peers = tuple(sorted(s.address for s in db.session.execute(
        db.select(Server).where(Server.id != server.id, Server.status == ServerStatus.UP.value)).scalars()))
    return [segment(net, server, peers) for net in nets.values()]


def segment(net: Network, server: Server, peers: tuple[str, ...] = ()) -> Segment | NatNetwork:
    if net.kind == NetworkKind.NAT.value:
        return nat_network(net)
    return Segment(bridge=net.bridge or bridge_name(net), uplink=net.uplink, vlan=net.vlan,
                   local=server.address if net.vlan is not None else None,
                   peers=peers if net.vlan is not None else ())


def libvirt_name(net: Network) -> str:
    return f"corral-{net.name}"


def nat_network(net: Network) -> NatNetwork:
    """The same subnet plan on every server: gateway the subnet's first address, DHCP range, reservations."""
    subnet = ipaddress.IPv4Network(net.cidr)
    return NatNetwork(name=libvirt_name(net), bridge=net.bridge, gateway=str(subnet.network_address + 1),
                      netmask=str(subnet.netmask),
                      dhcp_range=(net.dhcp_start, net.dhcp_end) if net.dhcp_start else None,
                      hosts=tuple((r.mac, r.ip) for r in net.reservations))


def still_used_on(net: Network, server: Server, *, besides: int | None = None) -> bool:
    return db.session.execute(db.select(NIC.id).join(VM, VM.id == NIC.vm_id).where(
        NIC.network_id == net.id, VM.server_id == server.id,
        *([VM.id != besides] if besides is not None else []))).first() is not None


def nic_plan(vm: VM) -> list[tuple[int, str, int | None]]:
    """The VM's NICs as (position, MAC, network id): to put back when a change cannot be applied."""
    return [(n.position, n.mac, n.network_id) for n in vm.nics]


def change_nics(vm: VM, nets: list[Network | None]) -> None:
    """New networks for a VM that is off: NICs past the new count go, new ones get generated MACs."""
    if vm.state != "off":
        raise NetworkError(f"Power {vm.name} off to change its network interfaces.")
    for nic in [n for n in vm.nics if n.position >= len(nets)]:
        vm.nics.remove(nic)
    db.session.flush()
    attach(vm, nets)


def restore_nics(vm: VM, plan: list[tuple[int, str, int | None]]) -> None:
    for nic in list(vm.nics):
        vm.nics.remove(nic)
    db.session.flush()
    for pos, mac, nid in plan:
        vm.nics.append(NIC(vm_id=vm.id, position=pos, mac=mac, network_id=nid))
    db.session.flush()


def oem_strings(vm: VM) -> tuple[str, ...]:
    """``corral.ip=ADDR/PREFIX`` for the first NIC with a reservation (the guest configures itself from it)."""
    for nic in vm.nics:
        net = nic.network
        if net is None or not net.cidr:
            continue
        for r in net.reservations:
            if r.mac == nic.mac:
                return (f"corral.ip={r.ip}/{ipaddress.IPv4Network(net.cidr).prefixlen}",)
    return ()

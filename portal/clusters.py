"""Virtual clusters, Rocks' ``add cluster FQDN IP N``: a frontend VM and N compute VMs on a private network
on a VLAN of their own, placed round robin over the chosen servers, MACs from the Rocks prefix rule.

Rules only (validation, placement, MACs, addresses, what a power action does in which order); they
flush and never commit. Everything a request asks for is checked before the first row is written and
the rows go in one transaction, so a refused request leaves nothing. The host work is the cluster
jobs' (:mod:`portal.jobs.clusters`): one task makes the network on every chosen server and all the
VMs' disks and domains, and a failure removes everything it made.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from flask import abort, current_app
from flask_login import current_user
from sqlalchemy import Select

from . import actionlog, macs, networks, permissions, quotas, tasks, vms
from .extensions import db
from .models import (NIC, VM, Appliance, ApplianceState, ClusterMember, Network, Role, Server, ServerDisk, ServerStatus,
                     User, VirtualCluster, VMState)

FQDN_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
PRIVATE_CIDR = "10.1.0.0/16"  # Rocks' private network: the frontend is 10.1.1.1, computes count down from .255.254
FRONTEND_PRIVATE_IP = "10.1.1.1"
FIRST_COMPUTE_IP = "10.1.255.254"
MAX_COMPUTES = 64
FRONTEND, COMPUTE = "frontend", "compute"
ACTIONS = {"start": "Start", "shutdown": "Shut down", "poweroff": "Power off"}
T = TypeVar("T")


class ClusterError(ValueError):
    """A cluster request that cannot be done, with the reason for the user."""


@dataclass(frozen=True)
class Sizing:
    memory_mb: int
    vcpus: int
    disk_gb: int | None = None  # the boot disk; None: the appliance's size


@dataclass(frozen=True)
class ClusterRequest:
    fqdn: str
    public_ip: str
    computes: int
    appliance_id: int
    frontend: Sizing
    compute: Sizing
    server_ids: tuple[int, ...] = ()  # empty: every eligible server
    vlan: int | None = None  # None: the next free one
    public_network_id: int | None = None  # None: outbound only (user-mode)
    uplink: str = ""  # the servers' NIC the VLAN rides on; empty: VXLAN between the servers' addresses
    clone: bool = True


# --- pure rules ----------------------------------------------------------------------------------

def round_robin(servers: Sequence[T], computes: int) -> list[T]:
    """Where each VM goes, frontend first: the frontend on the first server, compute *i* on server
    ``(i + 1) mod n``, so the frontend's server gets no more computes than the others."""
    if not servers:
        raise ClusterError("Choose at least one VM server for the cluster.")
    return [servers[0]] + [servers[(i + 1) % len(servers)] for i in range(computes)]


def compute_name(label: str, index: int) -> str:
    return f"{label}-{index}"


def private_ip(role: str, index: int) -> str:
    if role == FRONTEND:
        return FRONTEND_PRIVATE_IP
    return str(ipaddress.IPv4Address(FIRST_COMPUTE_IP) - index)


def network_name(label: str) -> str:
    return f"vc-{label}"


def check_fqdn(fqdn: str) -> tuple[str, str]:
    """The FQDN (lowercase) and its first label, the frontend VM's name."""
    fqdn = (fqdn or "").strip().lower().rstrip(".")
    if not FQDN_RE.match(fqdn):
        raise ClusterError(f"{fqdn!r} is not a host name such as frontend.example.org (letters, digits, hyphens, "
                           "dots).")
    label = fqdn.split(".")[0]
    if len(label) > 8:
        raise ClusterError(f"The frontend's name {label} (the FQDN's first label) is the frontend VM's name: "
                           "1 to 8 characters.")
    if db.session.execute(db.select(VirtualCluster.id).where(VirtualCluster.name == fqdn)).first():
        raise ClusterError(f"A cluster called {fqdn} exists already.")
    return fqdn, label


def check_public_ip(ip: str) -> str:
    try:
        addr = ipaddress.IPv4Address((ip or "").strip())
    except ValueError:
        raise ClusterError(f"{ip!r} is not an IPv4 address such as 137.110.119.118.") from None
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise ClusterError(f"{addr} cannot be a frontend's public address.")
    taken = db.session.execute(db.select(VirtualCluster.name).where(VirtualCluster.public_ip == str(addr))).first()
    if taken:
        raise ClusterError(f"{addr} is the public address of cluster {taken[0]} already.")
    try:
        macs.rocks_prefix(str(addr))
    except macs.MacError as exc:
        raise ClusterError(str(exc)) from None
    return str(addr)


def vlan_range() -> tuple[int, int]:
    cfg = current_app.config
    return int(cfg.get("CLUSTER_VLAN_FIRST", 2)), int(cfg.get("CLUSTER_VLAN_LAST", 4094))


def used_vlans() -> set[int]:
    used = set(db.session.execute(db.select(Network.vlan).where(Network.vlan.is_not(None))).scalars())
    return used | set(db.session.execute(db.select(VirtualCluster.vlan)).scalars())


def next_free_vlan() -> int:
    first, last = vlan_range()
    used = used_vlans()
    for vlan in range(first, last + 1):
        if vlan not in used:
            return vlan
    raise ClusterError(f"Every VLAN from {first} to {last} is in use; delete a cluster or network first.")


def check_vlan(vlan: int | None) -> int:
    if vlan is None:
        return next_free_vlan()
    if not 1 <= vlan <= 4094:
        raise ClusterError("A VLAN id is between 1 and 4094.")
    if vlan in used_vlans():
        raise ClusterError(f"VLAN {vlan} is in use by another cluster or network; leave the VLAN empty for the "
                           f"next free one ({next_free_vlan()}).")
    return vlan


def check_sizing(what: str, s: Sizing, appliance: Appliance) -> int:
    """The boot disk's size for this sizing (the appliance's when none was given)."""
    if not appliance.min_memory_mb <= s.memory_mb <= appliance.max_memory_mb:
        raise ClusterError(f"{what.capitalize()}: between {appliance.min_memory_mb} and {appliance.max_memory_mb} MB "
                           f"of memory ({appliance.name}).")
    if not 1 <= s.vcpus <= 64:
        raise ClusterError(f"{what.capitalize()}: 1 to 64 vCPUs.")
    base = vms.appliance_disk_sizes(appliance)[0]
    disk = s.disk_gb or base
    if not base <= disk <= vms.MAX_DISK_GB:
        raise ClusterError(f"{what.capitalize()}: a disk between {base} GB ({appliance.name}'s) and "
                           f"{vms.MAX_DISK_GB} GB.")
    return disk


def disk_total(appliance: Appliance, boot_gb: int) -> int:
    return boot_gb + sum(vms.appliance_disk_sizes(appliance)[1:])


def eligible_servers(server_ids: Sequence[int], nets: Sequence[Network | None]) -> list[Server]:
    """The chosen servers (each up and carrying the networks), or every such server, by hostname."""
    up = db.session.execute(db.select(Server).where(Server.status == ServerStatus.UP.value)
                            .order_by(Server.hostname)).scalars().all()
    carries = networks.carries_all(nets)
    if not server_ids:
        found = [s for s in up if carries(s) and s.disks]
        if not found:
            problems = [p for s in up for n in nets if n is not None for p in [networks.carry_problem(n, s)] if p]
            raise ClusterError("No VM server that is up carries the cluster's networks"
                               + (f" ({'; '.join(problems)})." if problems else "; add or mark one up first."))
        return found
    by_id = {s.id: s for s in up}
    chosen = []
    for sid in dict.fromkeys(server_ids):
        server = by_id.get(sid)
        if server is None:
            raise ClusterError("A chosen VM server is not up (or no longer exists); choose servers that are up.")
        if not carries(server):
            problems = [networks.carry_problem(n, server) for n in nets if n is not None]
            raise ClusterError("; ".join(p for p in problems if p) + ".")
        chosen.append(server)
    return chosen


class _Placer:
    """Placement within one request: what the VMs placed so far take from each server and disk counts."""

    def __init__(self):
        self.memory: dict[int, int] = {}
        self.disk: dict[int, int] = {}

    def place(self, server: Server, name: str, memory_mb: int, disk_gb: int) -> vms.Placement:
        free_mem = (server.free_memory_mb if server.free_memory_mb is not None else server.memory_mb) \
            - self.memory.get(server.id, 0)
        if free_mem < memory_mb:
            raise ClusterError(f"{server.hostname} has {max(free_mem, 0)} MB of free memory left for {name}, which "
                               f"needs {memory_mb} MB: choose more servers or smaller VMs.")
        disks = sorted(server.disks, key=lambda d: -self._free(d))
        if not disks or self._free(disks[0]) < disk_gb:
            raise ClusterError(f"No VM disk on {server.hostname} has {disk_gb} GB free left for {name}.")
        disk = disks[0]
        self.memory[server.id] = self.memory.get(server.id, 0) + memory_mb
        self.disk[disk.id] = self.disk.get(disk.id, 0) + disk_gb
        return vms.Placement(server, disk, f"{server.hostname}:{disk.mountpoint}, round robin")

    def _free(self, d: ServerDisk) -> int:
        return (d.free_gb if d.free_gb is not None else d.size_gb) - self.disk.get(d.id, 0)


# --- records ----------------------------------------------------------------------------------------

def record_new(owner: User, req: ClusterRequest) -> VirtualCluster:
    """Check everything, then add the cluster, its private network, its VMs (creating), their NICs and
    the members (flushes). Raises ClusterError (or QuotaExceeded) before writing anything it keeps."""
    if not permissions.can_create_vm(owner):
        raise ClusterError(f"{owner.username} may not create VMs.")
    fqdn, label = check_fqdn(req.fqdn)
    public_ip = check_public_ip(req.public_ip)
    if not 0 <= req.computes <= MAX_COMPUTES:
        raise ClusterError(f"A cluster has 0 to {MAX_COMPUTES} computes.")
    if req.computes and len(compute_name(label, req.computes - 1)) > 8:
        raise ClusterError(f"The computes are named {compute_name(label, 0)} to {compute_name(label, req.computes - 1)}"
                           f": VM names have at most 8 characters, so shorten the FQDN's first label to "
                           f"{8 - len(str(req.computes - 1)) - 1} characters.")
    appliance = db.session.get(Appliance, req.appliance_id)
    if appliance is None or appliance.state != ApplianceState.READY.value or not appliance.disks:
        raise ClusterError("Choose a ready appliance for the cluster's VMs.")
    fe_disk = check_sizing("frontend", req.frontend, appliance)
    cn_disk = check_sizing("computes", req.compute, appliance)
    vlan = check_vlan(req.vlan)
    public = None
    if req.public_network_id is not None:
        public = db.session.get(Network, req.public_network_id)
        if public is None:
            raise ClusterError("The chosen public network no longer exists.")
    total_vms = 1 + req.computes
    total_mem = req.frontend.memory_mb + req.computes * req.compute.memory_mb
    total_disk = disk_total(appliance, fe_disk) + req.computes * disk_total(appliance, cn_disk)
    try:
        quotas.reserve(owner.id, vms=total_vms, memory_mb=total_mem, disk_gb=total_disk)
    except quotas.QuotaExceeded as exc:
        raise ClusterError(f"The cluster's {total_vms} VMs ({total_mem} MB, {total_disk} GB) do not fit: {exc}") \
            from None
    for i in range(req.computes):
        _check_free_name(compute_name(label, i))
    _check_free_name(label)
    try:
        private = networks.create(name=network_name(label), kind="isolated", uplink=req.uplink, vlan=vlan,
                                  cidr=PRIVATE_CIDR, description=f"Private network of virtual cluster {fqdn}")
    except networks.NetworkError as exc:
        raise ClusterError(str(exc)) from None
    servers = eligible_servers(req.server_ids, [public, private])
    cluster = VirtualCluster(name=fqdn, public_ip=public_ip, owner_id=owner.id, vlan=vlan, network_id=private.id,
                             appliance_id=appliance.id, compute_memory_mb=req.compute.memory_mb,
                             compute_vcpus=req.compute.vcpus, compute_disk_gb=cn_disk, clone=req.clone,
                             server_ids=",".join(str(s.id) for s in servers))
    db.session.add(cluster)
    db.session.flush()
    mac_list = macs.rocks_macs(public_ip, 2 + req.computes, taken=macs.taken_macs())
    placer = _Placer()
    where = round_robin(servers, req.computes)
    fe = _add_vm(cluster, owner, appliance, FRONTEND, 0, label, req.frontend, fe_disk, where[0], placer,
                 mac_list[0], private)
    _add_nic(fe, 1, mac_list[1], public)
    if public is not None and public.cidr and ipaddress.IPv4Address(public_ip) in ipaddress.IPv4Network(public.cidr):
        try:
            networks.add_reservation(public, mac_list[1], public_ip)
        except networks.NetworkError as exc:
            raise ClusterError(str(exc)) from None
    for i in range(req.computes):
        _add_vm(cluster, owner, appliance, COMPUTE, i, compute_name(label, i), req.compute, cn_disk, where[i + 1],
                placer, mac_list[2 + i], private)
    actionlog.record("cluster-created", target_type="cluster", target_label=fqdn,
                     detail=f"{public_ip}, VLAN {vlan}, {req.computes} compute(s) on "
                            f"{', '.join(s.hostname for s in servers)}")
    db.session.flush()
    return cluster


def _check_free_name(name: str) -> None:
    try:
        vms.check_name(name)
    except vms.VMError as exc:
        raise ClusterError(f"{exc} The cluster names its VMs after the FQDN's first label: choose another.") from None


def _add_vm(cluster: VirtualCluster, owner: User, appliance: Appliance, role: str, index: int, name: str,
            sizing: Sizing, disk_gb: int, server: Server, placer: _Placer, mac: str, private: Network) -> VM:
    placement = placer.place(server, name, sizing.memory_mb, disk_total(appliance, disk_gb))
    try:
        vm = vms.record_new_vm(owner=owner, name=name, appliance=appliance, memory_mb=sizing.memory_mb,
                               vcpus=sizing.vcpus, placement=placement, clone=cluster.clone, usb_tablet=False, mac=mac)
    except (vms.VMError, quotas.QuotaExceeded, macs.MacError) as exc:
        raise ClusterError(f"{name}: {exc}") from None
    if vm.vdisks[0].size_gb < disk_gb:
        vm.vdisks[0].size_gb = disk_gb
    nic = vm.nics[0]
    nic.network_id, nic.network = private.id, private
    networks.add_reservation(private, mac, private_ip(role, index))
    db.session.add(ClusterMember(vm_id=vm.id, cluster_id=cluster.id, role=role, index=index))
    db.session.flush()
    return vm


def _add_nic(vm: VM, position: int, mac: str, net: Network | None) -> None:
    nic = NIC(vm_id=vm.id, position=position, mac=mac, network_id=net.id if net else None)
    db.session.add(nic)
    vm.nics.append(nic)
    db.session.flush()


def server_list(cluster: VirtualCluster) -> list[Server]:
    ids = [int(x) for x in (cluster.server_ids or "").split(",") if x]
    found = {s.id: s for s in db.session.execute(db.select(Server).where(Server.id.in_(ids))).scalars()}
    return [found[i] for i in ids if i in found]


def add_computes(cluster: VirtualCluster, count: int) -> list[VM]:
    """Record *count* more computes (creating), each on the chosen server with the fewest of the cluster's VMs."""
    if not 1 <= count <= MAX_COMPUTES - len(computes(cluster)):
        raise ClusterError(f"Add 1 to {MAX_COMPUTES - len(computes(cluster))} computes (a cluster has at most "
                           f"{MAX_COMPUTES}).")
    appliance = cluster.appliance
    if appliance is None or appliance.state != ApplianceState.READY.value:
        raise ClusterError("The cluster's appliance is no longer in the library; computes cannot be added.")
    fe = frontend(cluster)
    label = fe.name if fe is not None else cluster.name.split(".")[0]
    start = max((m.index for m in cluster.members if m.role == COMPUTE), default=-1) + 1
    if len(compute_name(label, start + count - 1)) > 8:
        raise ClusterError(f"{compute_name(label, start + count - 1)} would be longer than 8 characters.")
    owner = cluster.owner
    per_vm = disk_total(appliance, cluster.compute_disk_gb)
    try:
        quotas.reserve(owner.id, vms=count, memory_mb=count * cluster.compute_memory_mb, disk_gb=count * per_vm)
    except quotas.QuotaExceeded as exc:
        raise ClusterError(f"{count} more compute(s) do not fit: {exc}") from None
    private = cluster.network
    if private is None:
        raise ClusterError("The cluster has lost its private network; delete and recreate it.")
    servers = eligible_servers([s.id for s in server_list(cluster)], [private])
    load = {s.id: 0 for s in servers}
    for m in cluster.members:
        if m.vm.server_id in load:
            load[m.vm.server_id] += 1
    mac_list = macs.rocks_macs(cluster.public_ip, count, taken=macs.taken_macs())
    placer = _Placer()
    added = []
    sizing = Sizing(cluster.compute_memory_mb, cluster.compute_vcpus, cluster.compute_disk_gb)
    for k in range(count):
        server = min(servers, key=lambda s: (load[s.id], servers.index(s)))
        load[server.id] += 1
        added.append(_add_vm(cluster, owner, appliance, COMPUTE, start + k, compute_name(label, start + k), sizing,
                             cluster.compute_disk_gb, server, placer, mac_list[k], private))
    actionlog.record("cluster-computes-added", target_type="cluster", target_label=cluster.name,
                     detail=", ".join(v.name for v in added))
    return added


def frontend(cluster: VirtualCluster) -> VM | None:
    return next((m.vm for m in cluster.members if m.role == FRONTEND), None)


def computes(cluster: VirtualCluster) -> list[VM]:
    return [m.vm for m in sorted(cluster.members, key=lambda m: m.index) if m.role == COMPUTE]


def vms_of(cluster: VirtualCluster) -> list[VM]:
    fe = frontend(cluster)
    return ([fe] if fe is not None else []) + computes(cluster)


BUSY = (VMState.MIGRATING.value,)


def power_order(cluster: VirtualCluster, action: str) -> list[VM]:
    """The VMs an action applies to, in order: start the frontend first, stop it last."""
    if action not in ACTIONS:
        raise ClusterError(f"Unknown cluster action {action!r}: start, shutdown or poweroff.")
    order = vms_of(cluster) if action == "start" else list(reversed(vms_of(cluster)))
    todo = [vm for vm in order if vm.state in vms.ACTIONS[action]]
    if not todo:
        raise ClusterError(f"Nothing to {ACTIONS[action].lower()} in {cluster.name}: "
                           + (", ".join(f"{v.name} is {v.state_enum.label}" for v in order) or "it has no VMs")
                           + ".")
    return todo


def check_remove_compute(cluster: VirtualCluster, vm: VM) -> None:
    if vm not in computes(cluster):
        raise ClusterError(f"{vm.name} is not a compute of {cluster.name}.")
    try:
        vms.check_delete(vm)
    except vms.VMError as exc:
        raise ClusterError(str(exc)) from None


def check_delete(cluster: VirtualCluster) -> None:
    """A cluster goes whatever its VMs do (running ones are powered off; ones whose creation died are removed
    too), but not while one of them migrates. A task of the cluster's own under way makes a delete "busy"."""
    busy = [v.name for v in vms_of(cluster) if v.state in BUSY]
    if busy:
        raise ClusterError(f"{', '.join(busy)} {'is' if len(busy) == 1 else 'are'} moving to another server; "
                           "delete the cluster when that ends.")


def status(cluster: VirtualCluster) -> str:
    """One word for the cluster: creating, partial, running, off, or mixed."""
    states = {v.state for v in vms_of(cluster)}
    if not states:
        return "empty"
    for word in (VMState.CREATING.value, VMState.PARTIAL.value):
        if word in states:
            return word
    return states.pop() if len(states) == 1 else "mixed"


# --- who sees what ------------------------------------------------------------------------------------

def visible(stmt: Select, user: User) -> Select:
    return stmt if permissions.is_manager(user) else stmt.where(VirtualCluster.owner_id == user.id)


def can_see(user: User, cluster: VirtualCluster) -> bool:
    return permissions.is_manager(user) or cluster.owner_id == user.id


def can_change(user: User, cluster: VirtualCluster) -> bool:
    """Adding, removing and deleting change what the cluster takes: managers, and power users for their own."""
    return permissions.is_manager(user) or (user.role == Role.POWER.value and not user.disabled
                                            and cluster.owner_id == user.id)


def all_visible(user: User) -> list[VirtualCluster]:
    return list(db.session.execute(visible(db.select(VirtualCluster), user).order_by(VirtualCluster.name)).scalars())


def get_or_404(cluster_id: int) -> VirtualCluster:
    """Someone else's cluster is as absent as a missing one (pages and API alike)."""
    cluster = db.session.get(VirtualCluster, cluster_id)
    if cluster is None or not can_see(current_user, cluster):
        abort(404)
    return cluster


def submit_task(cluster: VirtualCluster, kind: str, func, title: str, *args, timeout: int | None = None
                ) -> tasks.Submitted:
    """A task on a cluster: one at a time per cluster (the key ``cluster:<id>``), pages and API alike."""
    return tasks.submit(kind, func, title=title, requester_id=current_user.id, target=cluster,
                        key=f"cluster:{cluster.id}", args=(cluster.id, *args), timeout=timeout)

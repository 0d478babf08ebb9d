"""Jobs for virtual clusters: create (network, disks and domains on every server at once), power the
whole cluster in order, add and remove computes, delete.

Creation works per server in parallel: one thread per server opens its own session, makes the
cluster's network segments, caches the appliance's disks once, makes every VM's disks (linked
clones, or copies) and defines the domains. The threads touch no database; they report through a
queue and the job's own thread writes progress. A failure anywhere removes everything the task
made on every server (domains, disks, cached bases no other VM uses, bridges and VLAN carriers) and
the cluster's rows.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import attributes, clusters, networks, servers, vms
from ..extensions import db
from ..models import VM, ApplianceDisk, Server, ServerStatus, VirtualCluster, VMState, utcnow
from ..vmm import domains, images, netdev, seed
from ..vmm.domain import render
from ..vmm.session import Target, open_session
from . import Progress, task_job
from . import vms as vm_jobs


def _cluster(cluster_id: int) -> VirtualCluster:
    cluster = db.session.get(VirtualCluster, cluster_id)
    if cluster is None:
        raise LookupError("the cluster was deleted meanwhile")
    return cluster


@dataclass
class DiskWork:
    vm: str
    path: str
    source: str  # the appliance's local disk file
    sha256: str | None
    base: str | None  # clone: the cached base on the server
    grow_gb: int | None  # resize to this size after making it


@dataclass
class ServerWork:
    """What one server gets: plain values only (the thread has no database)."""

    hostname: str
    target: Target
    segments: list = field(default_factory=list)
    disks: list[DiskWork] = field(default_factory=list)
    seeds: list[tuple[seed.Seed, str]] = field(default_factory=list)  # cloud-init appliances: (seed, its path)
    domains: list[tuple[str, str]] = field(default_factory=list)  # (VM name, domain XML)


def plan(cluster: VirtualCluster, members: list[VM]) -> list[ServerWork]:
    """Record each disk's path, then describe every server's work (the chosen servers get the network
    even without a VM)."""
    by_server: dict[int, ServerWork] = {}
    peers_all = sorted(s.address for s in db.session.execute(
        db.select(Server).where(Server.status == ServerStatus.UP.value)).scalars())

    def work_for(server: Server) -> ServerWork:
        if server.id not in by_server:
            by_server[server.id] = ServerWork(server.hostname, servers.target_for(server))
        return by_server[server.id]

    def add_segments(work: ServerWork, server: Server, nets) -> None:
        peers = tuple(a for a in peers_all if a != server.address)
        for net in nets:
            seg = networks.segment(net, server, peers)
            if seg not in work.segments:
                work.segments.append(seg)

    for server in clusters.server_list(cluster):
        if cluster.network is not None:
            add_segments(work_for(server), server, [cluster.network])
    for vm in members:
        appl_disks = db.session.execute(db.select(ApplianceDisk).where(ApplianceDisk.appliance_id == vm.appliance_id)
                                        .order_by(ApplianceDisk.position)).scalars().all()
        work = work_for(vm.server)
        add_segments(work, vm.server, [n.network for n in vm.nics if n.network is not None])
        for d, vd in zip(appl_disks, vm.vdisks):
            vd.path = vms.disk_path(vm, vd.position)
            base = vms.base_path(vm.disk, d.appliance_id, d.sha256) if vm.is_clone else None
            vd.backing_path = base
            size = vms.appliance_disk_sizes(vm.appliance)[vd.position]
            work.disks.append(DiskWork(vm.name, vd.path, d.path, d.sha256, base,
                                       vd.size_gb if vd.size_gb > size else None))
    db.session.commit()
    for vm in members:
        if attributes.wants_seed(vm):
            by_server[vm.server_id].seeds.append((attributes.seed_for(vm), vms.seed_path(vm)))
        by_server[vm.server_id].domains.append((vm.name, render(vm_jobs.domain_spec(vm))))
    return list(by_server.values())


def _build(work: ServerWork, events: queue.Queue) -> None:
    """One server's share (runs in a thread): network, cached bases, disks, cloud-init seeds, domains."""
    with open_session(work.target) as session:
        for seg in work.segments:
            if isinstance(seg, netdev.NatNetwork):
                netdev.ensure_nat(session, seg)
            else:
                how = netdev.ensure(session, seg)
                events.put(("log", f"Bridge {seg.bridge} on {work.hostname}"
                                   + (f" (VLAN {seg.vlan} as {how})" if seg.vlan is not None else "") + " is ready."))
        for base in dict.fromkeys(d.base for d in work.disks if d.base):
            d = next(x for x in work.disks if x.base == base)
            if images.cached_copy(session, Path(d.source), base, sha256=d.sha256):
                events.put(("log", f"Cached the appliance's disk on {work.hostname}."))
        for d in work.disks:
            if d.base:
                images.clone(session, d.base, d.path)
            else:
                images.copy_in(session, Path(d.source), d.path, sha256=d.sha256)
            if d.grow_gb:
                images.resize(session, d.path, d.grow_gb)
            events.put(("disk", d.vm))
        for data, path in work.seeds:
            seed.write(session, data, path)
        for name, xml in work.domains:
            domains.define(session, xml)
            events.put(("defined", name))


def build(progress: Progress, cluster: VirtualCluster, members: list[VM]) -> None:
    """Make the members on their servers, every server at once; raises the first failure after all ended."""
    progress.step(f"Planning {len(members)} VM(s) of {cluster.name}", 5)
    shares = plan(cluster, members)
    progress.step(f"Creating the network, disks and domains on {', '.join(w.hostname for w in shares)} at once", 10)
    events: queue.Queue = queue.Queue()
    total = sum(len(w.disks) + len(w.domains) for w in shares) or 1
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, len(shares)), thread_name_prefix="cluster") as pool:
        futures = [pool.submit(_build, w, events) for w in shares]
        while not all(f.done() for f in futures) or not events.empty():
            try:
                kind, what = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "log":
                progress.log(what)
                continue
            done += 1
            progress.items(done, total, pct_from=10, pct_to=95, noun="disks and domains")
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    for vm in members:
        vm.state, vm.state_changed_at = VMState.OFF.value, utcnow()
    db.session.commit()


def _remove(progress: Progress, vm_ids: list[int]) -> None:
    """Delete VMs with everything they have on their servers (the VM delete job's own steps)."""
    for vm_id in vm_ids:
        if db.session.get(VM, vm_id) is not None:
            vm_jobs.delete_vm.__wrapped__(progress, vm_id)


def _drop_network(progress: Progress, cluster: VirtualCluster) -> None:
    """The private network's bridge and VLAN carrier from every server that is up, then its row."""
    net = cluster.network
    if net is None:
        return
    for server in db.session.execute(db.select(Server).where(Server.status == ServerStatus.UP.value)).scalars():
        with servers.session_for(server) as session:
            if netdev.release(session, networks.segment(net, server)):
                progress.log(f"Removed {net.name}'s bridge and VLAN {net.vlan} from {server.hostname}.")
    cluster.network_id = None
    db.session.delete(net)
    db.session.commit()


def remove_cluster(progress: Progress, cluster_id: int) -> str:
    cluster = _cluster(cluster_id)
    name = cluster.name
    ids = [vm.id for vm in reversed(clusters.vms_of(cluster))]
    progress.step(f"Removing {len(ids)} VM(s) of {name}", 10)
    _remove(progress, ids)
    cluster = _cluster(cluster_id)
    progress.step(f"Removing {name}'s private network from the servers", 90)
    _drop_network(progress, cluster)
    db.session.delete(_cluster(cluster_id))
    db.session.commit()
    return name


@task_job
def create_cluster(progress: Progress, cluster_id: int) -> str:
    cluster = _cluster(cluster_id)
    try:
        build(progress, cluster, clusters.vms_of(cluster))
    except BaseException as exc:
        db.session.rollback()
        progress.log(f"Creating the cluster failed ({exc}); removing everything this task made.")
        remove_cluster(progress, cluster_id)
        raise
    return cluster.name


@task_job
def add_computes(progress: Progress, cluster_id: int, vm_ids: list[int]) -> str:
    cluster = _cluster(cluster_id)
    added = [db.session.get(VM, i) for i in vm_ids]
    try:
        build(progress, cluster, [vm for vm in added if vm is not None])
    except BaseException as exc:
        db.session.rollback()
        progress.log(f"Adding computes failed ({exc}); removing the new ones.")
        _remove(progress, vm_ids)
        raise
    return ", ".join(vm.name for vm in added if vm is not None)


@task_job
def remove_compute(progress: Progress, cluster_id: int, vm_id: int) -> str:
    vm = db.session.get(VM, vm_id)
    name = vm.name if vm is not None else str(vm_id)
    progress.step(f"Removing compute {name}", 10)
    _remove(progress, [vm_id])
    return name


@task_job
def delete_cluster(progress: Progress, cluster_id: int) -> str:
    return remove_cluster(progress, cluster_id)


@task_job
def power_cluster(progress: Progress, cluster_id: int, action: str) -> str:
    """Start: the frontend first, then the computes; shut down or power off: the computes, then the frontend."""
    cluster = _cluster(cluster_id)
    order = [(vm.id, vm.name) for vm in clusters.power_order(cluster, action)]
    for n, (vm_id, name) in enumerate(order):
        progress.step(f"{clusters.ACTIONS[action]}: {name} ({n + 1} of {len(order)})", 5 + 90 * n // len(order))
        vm_jobs.power_vm.__wrapped__(progress, vm_id, action)
    return f"{clusters.ACTIONS[action]}: {', '.join(name for _, name in order)}"

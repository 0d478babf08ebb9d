"""Jobs for VMs: create (full copy or clone), power actions, delete, clean up."""

from __future__ import annotations

import posixpath
from pathlib import Path

from .. import attributes, license_keys, networks, servers, vms
from ..extensions import db
from ..models import VM, ApplianceDisk, VMState, utcnow
from ..vmm import domains, images, seed
from ..vmm.domain import DiskSpec, DomainSpec, NicSpec, render
from ..vmm.domains import DomainState
from . import Progress, TaskCancelled, backups, task_job
from . import livesync as livesync_jobs
from . import networks as network_jobs

# what a power action leaves the VM in, by the domain state it leaves
_VM_STATE = {DomainState.RUNNING: VMState.RUNNING, DomainState.SHUTOFF: VMState.OFF,
             DomainState.PAUSED: VMState.PAUSED, DomainState.SAVED: VMState.SAVED}


def _vm(vm_id: int) -> VM:
    vm = db.session.get(VM, vm_id)
    if vm is None:
        raise LookupError("the VM was deleted meanwhile")
    return vm


def domain_spec(vm: VM) -> DomainSpec:
    with_seed = attributes.wants_seed(vm)
    return DomainSpec(
        name=vm.name, uuid=vms.domain_uuid(vm), memory_mb=vm.memory_mb, vcpus=vm.vcpus,
        domain_type=vm.server.domain_type,
        disks=tuple(DiskSpec(d.path, bus=d.bus, format=d.format) for d in vm.vdisks),
        nics=tuple(nic_spec(n) for n in vm.nics),
        cdrom=vms.iso_path(vm.disk, vm.iso) if vm.iso is not None else None,
        seed=vms.seed_path(vm) if with_seed else None,
        usb_tablet=vm.usb_tablet, serial_log=vms.serial_log_path(vm),
        description=f"Corral VM {vm.vmid} owned by {vm.owner.username}",
        extra_oem=networks.oem_strings(vm) + license_keys.oem_strings(vm) + ((seed.OEM_STRING,) if with_seed else ()),
    )


def write_seed(progress: Progress, session, vm: VM, *, at: str | None = None) -> bool:
    """Render the VM's NoCloud seed ISO from its attributes and NICs onto its server (cloud-init appliances),
    or *at* another path (a move's target)."""
    if not attributes.wants_seed(vm):
        return False
    data = attributes.seed_for(vm)
    progress.log(f"Writing the cloud-init seed ({len(data.attributes)} attribute(s), {len(data.nics)} NIC(s)).")
    seed.write(session, data, at or vms.seed_path(vm))
    return True


def nic_spec(nic) -> NicSpec:
    """On the network's bridge (bridged, isolated), on its libvirt network (NAT), or user-mode without one."""
    net = nic.network
    if net is None:
        return NicSpec(nic.mac)
    if net.kind == "nat":
        return NicSpec(nic.mac, network=networks.libvirt_name(net))
    return NicSpec(nic.mac, bridge=net.bridge)


def _set_state(vm: VM, state: VMState) -> None:
    vm.state, vm.state_changed_at = state.value, utcnow()


@task_job
def create_vm(progress: Progress, vm_id: int) -> str:
    """Copy (or clone) the appliance's disks to the server, define the domain, leave it off."""
    vm = _vm(vm_id)
    disks = db.session.execute(db.select(ApplianceDisk).where(ApplianceDisk.appliance_id == vm.appliance_id)
                               .order_by(ApplianceDisk.position)).scalars().all()
    total = sum(d.file_size_bytes or 0 for d in disks) or 1
    done = 0
    server = vm.server
    try:
        with servers.session_for(server) as session:
            if vm.iso is not None:
                _create_blank(session, progress, vm)
            for d, vd in zip(disks, vm.vdisks):
                path = vms.disk_path(vm, vd.position)
                if vm.is_clone:
                    base = vms.base_path(vm.disk, d.appliance_id, d.sha256)
                    progress.step(f"Caching the appliance's disk {d.position} on {server.hostname}", 5)
                    if not images.cached_copy(session, Path(d.path), base, sha256=d.sha256,
                                              progress=_copied(progress, done, total, pct_to=80)):
                        progress.log(f"Base {posixpath.basename(base)} is cached on the server.")
                    progress.step(f"Creating clone disk {d.position}", 85)
                    images.clone(session, base, path)
                    vd.backing_path = base
                else:
                    progress.step(f"Copying disk {d.position} to {server.hostname}", 5)
                    images.copy_in(session, Path(d.path), path, sha256=d.sha256,
                                   progress=_copied(progress, done, total, pct_to=85))
                vd.path = path
                done += d.file_size_bytes or 0
            db.session.commit()
            progress.step("Defining the VM", 90)
            progress.check_cancel()
            network_jobs.ensure_for(progress, session, vm)
            write_seed(progress, session, vm)
            domains.define(session, render(domain_spec(vm)))
        _set_state(vm, VMState.OFF)
        db.session.commit()
        livesync_jobs.after_create(progress, vm_id)
        return vm.name
    except BaseException as exc:
        # What was made stays until "Delete partially created VM" removes it all.
        db.session.rollback()
        vm = _vm(vm_id)
        _set_state(vm, VMState.PARTIAL)
        db.session.commit()
        if isinstance(exc, TaskCancelled):
            progress.log("Cancelled; the VM is partially created: delete it to remove what was made.")
        raise


def _copied(progress: Progress, before: int, total: int, *, pct_to: int):
    """A copy's byte callback counting the bytes of the disks copied *before* it towards *total*."""
    return lambda n, _t: progress.bytes(before + n, total, pct_from=5, pct_to=pct_to)


def _create_blank(session, progress: Progress, vm: VM) -> None:
    """Cache the ISO on the server disk once, then create the VM's empty disks."""
    iso = vm.iso
    target = vms.iso_path(vm.disk, iso)
    progress.step(f"Copying the ISO {iso.name} to {vm.server.hostname}", 5)
    if not images.cached_copy(session, Path(iso.path), target, sha256=iso.sha256,
                              progress=lambda n, t: progress.bytes(n, t, pct_from=5, pct_to=70)):
        progress.log(f"{iso.name} is cached on the server.")
    for vd in vm.vdisks:
        progress.step(f"Creating disk {vd.position} ({vd.size_gb} GB, {vd.bus})", 75)
        vd.path = vms.disk_path(vm, vd.position)
        images.create_blank(session, vd.path, vd.size_gb)
    db.session.commit()


def _unshared_caches(vm: VM) -> list[str]:
    """The clone bases and ISO copies of this VM that no other VM on its server disk uses."""
    if vm.disk is None:
        return []
    others = db.session.execute(db.select(VM).where(VM.disk_id == vm.disk_id, VM.id != vm.id)).scalars().all()
    in_use = {d.backing_path for o in others for d in o.vdisks if d.backing_path}
    in_use |= {vms.iso_path(vm.disk, o.iso) for o in others if o.iso is not None}
    mine = {d.backing_path for d in vm.vdisks if d.backing_path}
    if vm.iso is not None:
        mine.add(vms.iso_path(vm.disk, vm.iso))
    return sorted(mine - in_use)


@task_job
def power_vm(progress: Progress, vm_id: int, action: str) -> str:
    vm = _vm(vm_id)
    label = vms.ACTION_LABELS[action]
    progress.step(f"{label}: {vm.name} on {vm.server.hostname}", 10)
    if action == "shutdown":
        progress.step("Pressing the power button; waiting for the guest to power off", 40)
    elif action == "save":
        progress.step("Saving memory to disk", 30)
    with servers.session_for(vm.server) as session:
        if action == "start":
            network_jobs.ensure_for(progress, session, vm)
            if write_seed(progress, session, vm):  # attributes may have changed since the last boot
                domains.define(session, render(domain_spec(vm)))
        result = domains.power(session, vm.name, action, check=progress.check_cancel, log=progress.log)
    new = _VM_STATE[result]
    vm = _vm(vm_id)
    _set_state(vm, new)
    db.session.commit()
    livesync_jobs.after_power(progress, vm_id, action)
    return new.value


@task_job
def delete_vm(progress: Progress, vm_id: int) -> str:
    """Remove the domain and every file of the VM from every server involved, then the row.

    A cached clone base or ISO goes too when no other VM on that server disk uses it.
    """
    vm = _vm(vm_id)
    name = vm.name
    shared = _unshared_caches(vm)
    backups.remove_all(progress, vm)
    livesync_jobs.forget(progress, vm)
    places = {s: d for s, d in ((vm.backup_server, vm.backup_disk), (vm.server, vm.disk)) if s is not None}
    for server, disk in places.items():
        progress.step(f"Removing {name} from {server.hostname}", 30)
        with servers.session_for(server) as session:
            domains.undefine(session, name)
            network_jobs.release_idle(progress, session, server, besides=vm.id)
            if disk is not None:  # its folder there (on a backup server: what failover put beside the copy)
                images.remove_tree(session, vms.vm_dir(vm, disk), under=disk.mountpoint)
                if server is vm.server and shared:
                    progress.log(f"Removing cached {', '.join(posixpath.basename(p) for p in shared)}: "
                                 "no other VM uses it.")
                    images.remove_cached(session, shared)
            domains.remove_serial_log(session, vms.serial_log_path(vm))
    progress.step("Removing the VM's records", 90)
    vm = _vm(vm_id)
    license_keys.release(vm)
    db.session.delete(vm)
    db.session.commit()
    return name


@task_job
def apply_settings(progress: Progress, vm_id: int) -> str:
    """Make the server match the VM's recorded settings: grow disks, redefine the domain."""
    vm = _vm(vm_id)
    with servers.session_for(vm.server) as session:
        for d in vm.vdisks:
            found = images.info(session, d.path)
            wanted = d.size_gb * images.GIB
            if found.virtual_size < wanted:
                progress.step(f"Growing disk {d.position} to {d.size_gb} GB", 30)
                images.resize(session, d.path, d.size_gb)
        progress.step("Redefining the VM with its new memory, vCPUs and NICs", 70)
        domains.define(session, render(domain_spec(vm)))
        network_jobs.release_idle(progress, session, vm.server)
    return vm.name

"""Jobs for VMs: create (full copy or clone), power actions, delete, clean up."""

from __future__ import annotations

import posixpath
import shutil
import time
from pathlib import Path

import libvirt

from .. import servers, vms
from ..extensions import db
from ..models import VM, ApplianceDisk, VMState, utcnow
from ..vmm import images
from ..vmm.domain import DiskSpec, DomainSpec, NicSpec, render
from ..vmm.errors import VmmError
from . import Progress, TaskCancelled, task_job

SHUTDOWN_PRESSES = 12  # ACPI power button presses, 10 s apart


def _vm(vm_id: int) -> VM:
    vm = db.session.get(VM, vm_id)
    if vm is None:
        raise LookupError("the VM was deleted meanwhile")
    return vm


def domain_spec(vm: VM) -> DomainSpec:
    return DomainSpec(
        name=vm.name, uuid=vms.domain_uuid(vm), memory_mb=vm.memory_mb, vcpus=vm.vcpus,
        domain_type=vm.server.domain_type,
        disks=tuple(DiskSpec(d.path, bus=d.bus, format=d.format) for d in vm.vdisks),
        nics=tuple(nic_spec(n) for n in vm.nics),
        cdrom=vms.iso_path(vm.disk, vm.iso) if vm.iso is not None else None,
        usb_tablet=vm.usb_tablet, serial_log=vms.serial_log_path(vm),
        description=f"Corral VM {vm.vmid} owned by {vm.owner.username}",
    )


def nic_spec(nic) -> NicSpec:
    """Bridged onto the network's bridge, on its libvirt network, or user-mode without a network."""
    net = nic.network
    if net is None:
        return NicSpec(nic.mac)
    if net.kind == "bridged":
        return NicSpec(nic.mac, bridge=net.bridge)
    return NicSpec(nic.mac, network=net.name)


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
                    _ensure_base(session, progress, Path(d.path), base, d.sha256, done, total)
                    progress.step(f"Creating clone disk {d.position}", 85)
                    images.clone(session, base, path)
                    vd.backing_path = base
                else:
                    progress.step(f"Copying disk {d.position} to {server.hostname}", 5)
                    images.copy_in(session, Path(d.path), path, sha256=d.sha256,
                                   progress=lambda n, _t, base=done: progress.bytes(base + n, total, pct_from=5,
                                                                                    pct_to=85))
                vd.path = path
                done += d.file_size_bytes or 0
            db.session.commit()
            progress.step("Defining the VM", 90)
            progress.check_cancel()
            session.libvirt().defineXML(render(domain_spec(vm)))
        _set_state(vm, VMState.OFF)
        db.session.commit()
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


def _create_blank(session, progress: Progress, vm: VM) -> None:
    """Cache the ISO on the server disk once, then create the VM's empty disks."""
    iso = vm.iso
    target = vms.iso_path(vm.disk, iso)
    progress.step(f"Copying the ISO {iso.name} to {vm.server.hostname}", 5)
    if images.exists(session, target):
        progress.log(f"{iso.name} is cached on the server.")
    else:
        images.copy_in(session, Path(iso.path), target, sha256=iso.sha256,
                       progress=lambda n, t: progress.bytes(n, t, pct_from=5, pct_to=70))
    for vd in vm.vdisks:
        progress.step(f"Creating disk {vd.position} ({vd.size_gb} GB, {vd.bus})", 75)
        vd.path = vms.disk_path(vm, vd.position)
        images.create_blank(session, vd.path, vd.size_gb)
    db.session.commit()


def _ensure_base(session, progress: Progress, local: Path, base: str, sha256: str, done: int, total: int) -> None:
    """Copy the appliance disk to the server's base cache once (under a lock on the server)."""
    if images.exists(session, base):
        progress.log(f"Base {posixpath.basename(base)} is cached on the server.")
        return
    lock = base + ".lock"
    session.run(["mkdir", "-p", posixpath.dirname(base)])
    session.run(["touch", lock])
    # Another job may be copying the same base: take the lock by waiting for it.
    session.run(images.flock_argv(lock, ["true"]), timeout=3600)
    if images.exists(session, base):
        return
    images.copy_in(session, local, base, sha256=sha256,
                   progress=lambda n, _t: progress.bytes(done + n, total, pct_from=5, pct_to=80))
    session.run(["chmod", "0444", base])


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


def _domain(session, vm: VM) -> libvirt.virDomain:
    try:
        return session.libvirt().lookupByName(vm.name)
    except libvirt.libvirtError as exc:
        raise VmmError(f"{vm.name} is not defined on {vm.server.hostname}: {exc.get_error_message()}") from exc


def _wait_state(dom: libvirt.virDomain, wanted: set[int], timeout: float, progress: Progress) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dom.state()[0] in wanted:
            return True
        progress.check_cancel()
        time.sleep(0.5)
    return False


@task_job
def power_vm(progress: Progress, vm_id: int, action: str) -> str:
    vm = _vm(vm_id)
    progress.step(f"{vms.ACTION_LABELS[action]}: {vm.name} on {vm.server.hostname}", 10)
    with servers.session_for(vm.server) as session:
        dom = _domain(session, vm)
        try:
            if action in ("start", "restore"):
                dom.create()  # a managed save image is restored automatically
                new = VMState.RUNNING
            elif action == "shutdown":
                progress.step("Pressing the power button; waiting for the guest to power off", 40)
                # A guest that is still booting misses the ACPI event: press again every 10 s.
                for attempt in range(SHUTDOWN_PRESSES):
                    if not dom.isActive():
                        break
                    dom.shutdown()
                    if _wait_state(dom, {libvirt.VIR_DOMAIN_SHUTOFF}, 10, progress):
                        break
                    progress.log(f"No reaction to power button press {attempt + 1}; pressing again.")
                else:
                    raise VmmError(f"{vm.name} did not shut down within {SHUTDOWN_PRESSES * 10} s; use Power off.")
                new = VMState.OFF
            elif action == "poweroff":
                dom.destroy()
                new = VMState.OFF
            elif action == "reboot":
                dom.reboot()
                new = VMState.RUNNING
            elif action == "pause":
                dom.suspend()
                new = VMState.PAUSED
            elif action == "resume":
                dom.resume()
                new = VMState.RUNNING
            elif action == "save":
                progress.step("Saving memory to disk", 30)
                dom.managedSave()
                new = VMState.SAVED
            else:
                raise VmmError(f"unknown action {action}")
        except libvirt.libvirtError as exc:
            raise VmmError(f"{vms.ACTION_LABELS[action]} failed on {vm.server.hostname}: "
                           f"{exc.get_error_message()}") from exc
    vm = _vm(vm_id)
    _set_state(vm, new)
    db.session.commit()
    return new.value


@task_job
def delete_vm(progress: Progress, vm_id: int) -> str:
    """Remove the domain and every file of the VM from every server involved, then the row.

    A cached clone base or ISO goes too when no other VM on that server disk uses it.
    """
    vm = _vm(vm_id)
    name = vm.name
    shared = _unshared_caches(vm)
    for server in {s for s in (vm.server, vm.backup_server) if s is not None}:
        progress.step(f"Removing {name} from {server.hostname}", 30)
        with servers.session_for(server) as session:
            try:
                dom = session.libvirt().lookupByName(name)
            except libvirt.libvirtError:
                dom = None
            if dom is not None:
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            if vm.disk is not None:
                images.remove_tree(session, vms.vm_dir(vm), under=vm.disk.mountpoint)
                if server is vm.server and shared:
                    progress.log(f"Removing cached {', '.join(posixpath.basename(p) for p in shared)}: "
                                 "no other VM uses it.")
                    session.run(["rm", "-f", "--", *shared, *(p + ".lock" for p in shared)], check=False)
            session.run(["rm", "-f", vms.serial_log_path(vm)], check=False)
    progress.step("Removing the VM's records", 90)
    vm = _vm(vm_id)
    db.session.delete(vm)
    db.session.commit()
    return name


CONSOLE_BYTES = 8192


def read_console(vm_id: int) -> None:
    """Fetch the tail of a VM's serial log into Redis for the dashboard (no Task row)."""
    from . import get_app
    from ..extensions import queues

    app = get_app()
    with app.app_context():
        vm = db.session.get(VM, vm_id)
        if vm is None or vm.server is None:
            return
        key = console_key(vm_id)
        try:
            with servers.session_for(vm.server) as session:
                r = session.run(["tail", "-c", str(CONSOLE_BYTES), vms.serial_log_path(vm)], check=False, timeout=20)
            text = r.stdout if r.ok else f"(no console log yet: {r.stderr.strip() or 'the VM has not run'})"
        except VmmError as exc:
            text = f"(console log unavailable: {exc})"
        queues.redis.set(key, text, ex=300)


def console_key(vm_id: int) -> str:
    from flask import current_app

    return f"{current_app.config['QUEUE_PREFIX']}:console:{vm_id}"


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
        progress.step("Redefining the VM with its new memory and vCPUs", 70)
        session.libvirt().defineXML(render(domain_spec(vm)))
    return vm.name


@task_job
def copy_back(progress: Progress, vm_id: int, name: str, user_id: int) -> str:
    """Flatten each disk on the server, fetch it into the library as a new appliance."""
    from .. import actionlog, library
    from ..models import Appliance

    vm = _vm(vm_id)
    src = vm.appliance
    row = Appliance(name=name, description=f"Copied back from VM {vm.name} (VMID {vm.vmid})",
                    min_memory_mb=src.min_memory_mb if src else min(128, vm.memory_mb),
                    max_memory_mb=src.max_memory_mb if src else max(vm.memory_mb, 4096), vcpus=vm.vcpus,
                    os_hint=src.os_hint if src else None, source="copy", state="importing", created_by_id=user_id)
    db.session.add(row)
    db.session.flush()
    folder = library.appliance_dir(row.id)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with servers.session_for(vm.server) as session:
            for i, vd in enumerate(vm.vdisks):
                flat = posixpath.join(vms.vm_dir(vm), f"copyback-{vd.position}.qcow2")
                progress.step(f"Flattening disk {vd.position} on {vm.server.hostname}", 10 + 70 * i // len(vm.vdisks))
                try:
                    session.run(["qemu-img", "convert", "-O", "qcow2", vd.path, flat], timeout=3600)
                    progress.step(f"Fetching disk {vd.position} into the library", 20 + 70 * i // len(vm.vdisks))
                    local = folder / f"fetch-{vd.position}.qcow2"
                    session.get(flat, local, lambda n, t: progress.bytes(n, t))
                finally:
                    session.run(["rm", "-f", flat], check=False)
                library.add_disk_file(row, vd.position, local, move=True)
        row.state = "ready"
        actionlog.record("appliance-added", target=row, user_id=user_id, detail=f"copied back from {vm.name}")
        db.session.commit()
    except BaseException:
        db.session.rollback()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return name

"""VM rules: names, VMIDs, placement, creation records, power transitions.

Plain functions that flush and never commit. The create request calls
:func:`record_new_vm` inside one transaction with the quota reservation, so
the VM row (state ``creating``), its disks and NICs exist before the job
starts and a failure leaves a row the UI explains ("partially created").
"""

from __future__ import annotations

import posixpath
import re
import uuid
from dataclasses import dataclass

from sqlalchemy import func

from . import actionlog, macs, quotas
from .extensions import db
from .models import NIC, VM, Appliance, Server, ServerDisk, ServerStatus, User, VirtualDisk, VMState

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,7}$")
GIB = 1024 ** 3


class VMError(Exception):
    """A VM request that cannot be done, with a message for the user."""


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME_RE.match(name):
        raise VMError("A VM name has 1 to 8 letters, digits or hyphens, and starts with a letter or digit.")
    if db.session.execute(db.select(VM.id).where(func.lower(VM.name) == name.lower())).first():
        raise VMError(f"A VM called {name} exists already.")
    return name


def next_vmid() -> int:
    return (db.session.execute(db.select(func.max(VM.vmid))).scalar_one() or 100) + 1


@dataclass
class Placement:
    server: Server
    disk: ServerDisk
    reason: str


def place(memory_mb: int, disk_gb: int, *, server_id: int | None = None, disk_id: int | None = None) -> Placement:
    """Pick a server and VM disk: the chosen ones, or enough free memory and the
    disk with the most free space and fewest VMs."""
    if disk_id is not None:
        disk = db.session.get(ServerDisk, disk_id)
        if disk is None or (server_id is not None and disk.server_id != server_id):
            raise VMError("That VM disk does not belong to the chosen server.")
        server = disk.server
        if server.status != ServerStatus.UP.value:
            raise VMError(f"{server.hostname} is {server.status_enum.label}; choose a server that is up.")
        return Placement(server, disk, f"{server.hostname}:{disk.mountpoint}, as chosen")
    servers = db.session.execute(
        db.select(Server).where(Server.status == ServerStatus.UP.value,
                                *([Server.id == server_id] if server_id else []))
    ).scalars().all()
    if not servers:
        raise VMError("No VM server is up" + (" with that id." if server_id else "; add or mark one up first."))
    vm_counts = dict(db.session.execute(
        db.select(VM.disk_id, func.count()).where(VM.disk_id.is_not(None)).group_by(VM.disk_id)).all())
    candidates = []
    for s in servers:
        free_mem = s.free_memory_mb if s.free_memory_mb is not None else s.memory_mb
        if free_mem < memory_mb:
            continue
        for d in s.disks:
            free = d.free_gb if d.free_gb is not None else d.size_gb
            if free >= disk_gb:
                candidates.append((free, -vm_counts.get(d.id, 0), -s.id, s, d, free_mem))
    if not candidates:
        raise VMError(f"No server that is up has {memory_mb} MB of free memory and {disk_gb} GB free on a VM disk.")
    candidates.sort(key=lambda c: c[:3], reverse=True)
    free, neg_count, _, server, disk, free_mem = candidates[0]
    reason = (f"{server.hostname}:{disk.mountpoint} has the most free space ({free} GB, {-neg_count} VM(s)) "
              f"among servers with {memory_mb} MB free ({free_mem} MB here)")
    return Placement(server, disk, reason)


def vm_dir(vm: VM) -> str:
    return posixpath.join(vm.disk.mountpoint, "corral-vms", vm.name)


def base_path(disk: ServerDisk, appliance_id: int, sha256: str) -> str:
    return posixpath.join(disk.mountpoint, "corral-bases", f"appliance-{appliance_id}-{sha256[:16]}.qcow2")


def disk_path(vm: VM, position: int) -> str:
    return posixpath.join(vm_dir(vm), f"disk{position}.qcow2")


def serial_log_path(vm: VM) -> str:
    return f"/var/log/libvirt/qemu/{vm.name}.serial.log"


def record_new_vm(*, owner: User, name: str, appliance: Appliance, memory_mb: int, vcpus: int,
                  placement: Placement, clone: bool, usb_tablet: bool, mac: str | None) -> VM:
    """Reserve quota and add the VM row (creating), its disks and its NIC."""
    if appliance.state != "ready" or not appliance.disks:
        raise VMError(f"The appliance {appliance.name} is not ready.")
    if not appliance.min_memory_mb <= memory_mb <= appliance.max_memory_mb:
        raise VMError(f"{appliance.name} needs between {appliance.min_memory_mb} and {appliance.max_memory_mb} MB "
                      f"of memory.")
    disk_gb = sum(max(1, -(-(d.virtual_size_bytes or 0) // GIB)) for d in appliance.disks)
    quotas.reserve(owner.id, vms=1, memory_mb=memory_mb, disk_gb=disk_gb)
    name = check_name(name)
    if mac:
        mac = macs.check_custom(mac)
    vm = VM(vmid=next_vmid(), name=name, owner_id=owner.id, memory_mb=memory_mb, vcpus=vcpus,
            server_id=placement.server.id, disk_id=placement.disk.id, is_clone=clone, usb_tablet=usb_tablet,
            appliance_id=appliance.id, state=VMState.CREATING.value)
    db.session.add(vm)
    db.session.flush()
    for d in appliance.disks:
        db.session.add(VirtualDisk(vm_id=vm.id, position=d.position, size_gb=max(1, -(-(d.virtual_size_bytes or 0) // GIB)),
                                   bus="virtio", format="qcow2"))
    db.session.add(NIC(vm_id=vm.id, position=0, mac=mac or macs.generated(vm.vmid, 0)))
    db.session.flush()
    actionlog.record("vm-created", target=vm, detail=f"from {appliance.name} on {placement.server.hostname}"
                     f"{' (clone)' if clone else ''}: {placement.reason}")
    return vm


def domain_uuid(vm: VM) -> str:
    """A stable libvirt UUID per VM (so a redefinition keeps its identity)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"corral-vm-{vm.vmid}"))


# Which power actions make sense in which state (buttons are context-sensitive).
ACTIONS = {
    "start": {VMState.OFF.value, VMState.CRASHED.value},
    "shutdown": {VMState.RUNNING.value},
    "poweroff": {VMState.RUNNING.value, VMState.PAUSED.value, VMState.CRASHED.value, VMState.UNKNOWN.value},
    "reboot": {VMState.RUNNING.value},
    "pause": {VMState.RUNNING.value},
    "resume": {VMState.PAUSED.value},
    "save": {VMState.RUNNING.value, VMState.PAUSED.value},
    "restore": {VMState.SAVED.value},
}
ACTION_LABELS = {"start": "Power on", "shutdown": "Shut down", "poweroff": "Power off", "reboot": "Reboot",
                 "pause": "Pause", "resume": "Resume", "save": "Save to disk", "restore": "Restore"}


def allowed_actions(vm: VM) -> list[str]:
    return [a for a, states in ACTIONS.items() if vm.state in states]


def check_action(vm: VM, action: str) -> None:
    if action not in ACTIONS:
        raise VMError(f"Unknown action {action!r}.")
    if vm.state not in ACTIONS[action]:
        raise VMError(f"{ACTION_LABELS[action]} is not possible while {vm.name} is {vm.state_enum.label}.")
    if vm.server is None or vm.server.status != ServerStatus.UP.value:
        raise VMError(f"{vm.name}'s server is not up.")


def change_owner(vm: VM, new_owner: User) -> None:
    """Give the VM to someone else; their quota must have room for it."""
    if new_owner.id == vm.owner_id:
        raise VMError(f"{new_owner.username} owns {vm.name} already.")
    if new_owner.disabled:
        raise VMError(f"{new_owner.username} is disabled.")
    if new_owner.role == "power":
        quotas.reserve(new_owner.id, vms=1, memory_mb=vm.memory_mb, disk_gb=vm.disk_gb)
    old = vm.owner.username
    vm.owner_id = new_owner.id
    actionlog.record("vm-owner-changed", target=vm, detail=f"{old} -> {new_owner.username}")
    db.session.flush()


def check_settings(vm: VM, *, memory_mb: int, vcpus: int, disk_sizes: list[int]) -> None:
    """Settings change only while the VM is off, within the appliance's range and the owner's quota."""
    if vm.state != VMState.OFF.value:
        raise VMError(f"Change settings while {vm.name} is off (it is {vm.state_enum.label}).")
    if vm.appliance and not vm.appliance.min_memory_mb <= memory_mb <= vm.appliance.max_memory_mb:
        raise VMError(f"{vm.appliance.name} needs between {vm.appliance.min_memory_mb} and "
                      f"{vm.appliance.max_memory_mb} MB of memory.")
    current = [d.size_gb for d in vm.vdisks]
    if len(disk_sizes) != len(current) or any(new < old for new, old in zip(disk_sizes, current)):
        raise VMError("Disks can only grow (shrinking would destroy data).")
    owner = vm.owner
    if owner.role == "power":
        extra_mem = max(0, memory_mb - vm.memory_mb)
        extra_disk = sum(disk_sizes) - sum(current)
        quotas.reserve(owner.id, vms=0, memory_mb=extra_mem, disk_gb=extra_disk)


MAX_BLANK_DISKS = 3


def iso_path(disk: ServerDisk, iso) -> str:
    """Where an ISO is cached on a server disk (shared by the VMs that boot from it)."""
    return posixpath.join(disk.mountpoint, "corral-isos", f"iso-{iso.id}-{(iso.sha256 or 'nosum')[:16]}.iso")


def record_new_blank_vm(*, owner: User, name: str, iso, memory_mb: int, vcpus: int, placement: Placement,
                        disks: list[tuple[int, str]], usb_tablet: bool, mac: str | None) -> VM:
    """Reserve quota and add a blank VM (ISO as CD-ROM, one to three new disks)."""
    if not 1 <= len(disks) <= MAX_BLANK_DISKS:
        raise VMError(f"A blank VM has one to {MAX_BLANK_DISKS} disks.")
    for size, bus in disks:
        if size < 1 or size > 16384:
            raise VMError("Each disk needs a size between 1 and 16384 GB.")
        if bus not in ("ide", "scsi", "virtio"):
            raise VMError(f"Unknown disk bus {bus!r}.")
    quotas.reserve(owner.id, vms=1, memory_mb=memory_mb, disk_gb=sum(size for size, _ in disks))
    name = check_name(name)
    if mac:
        mac = macs.check_custom(mac)
    vm = VM(vmid=next_vmid(), name=name, owner_id=owner.id, memory_mb=memory_mb, vcpus=vcpus,
            server_id=placement.server.id, disk_id=placement.disk.id, usb_tablet=usb_tablet, iso_id=iso.id,
            state=VMState.CREATING.value)
    db.session.add(vm)
    db.session.flush()
    for position, (size, bus) in enumerate(disks):
        db.session.add(VirtualDisk(vm_id=vm.id, position=position, size_gb=size, bus=bus, format="qcow2"))
    db.session.add(NIC(vm_id=vm.id, position=0, mac=mac or macs.generated(vm.vmid, 0)))
    db.session.flush()
    actionlog.record("vm-created", target=vm, detail=f"blank, booting {iso.name}, disks "
                     f"{', '.join(f'{s} GB {b}' for s, b in disks)} on {placement.server.hostname}")
    return vm

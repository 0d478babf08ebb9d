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
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func

from . import actionlog, license_keys, macs, quotas
from .extensions import db
from .models import (NIC, VM, Appliance, ApplianceState, ClusterMember, Role, Server, ServerDisk, ServerStatus, User,
                     VirtualDisk, VMState)

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


def place(memory_mb: int, disk_gb: int, *, server_id: int | None = None, disk_id: int | None = None,
          eligible: Callable[[Server], bool] | None = None) -> Placement:
    """Pick a server and VM disk: the chosen ones, or enough free memory and the
    disk with the most free space and fewest VMs (among servers *eligible* says carry the VM's networks)."""
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
        if eligible is not None and not eligible(s):
            continue
        free_mem = s.free_memory_mb if s.free_memory_mb is not None else s.memory_mb
        if free_mem < memory_mb:
            continue
        for d in s.disks:
            free = d.free_gb if d.free_gb is not None else d.size_gb
            if free >= disk_gb:
                candidates.append((free, -vm_counts.get(d.id, 0), -s.id, s, d, free_mem))
    if not candidates:
        lacking = [s.hostname for s in servers if eligible is not None and not eligible(s)]
        raise VMError(f"No server that is up has {memory_mb} MB of free memory and {disk_gb} GB free on a VM disk"
                      + (f" ({', '.join(lacking)} lack the VM's networks)." if lacking else "."))
    candidates.sort(key=lambda c: c[:3], reverse=True)
    free, neg_count, _, server, disk, free_mem = candidates[0]
    reason = (f"{server.hostname}:{disk.mountpoint} has the most free space ({free} GB, {-neg_count} VM(s)) "
              f"among servers with {memory_mb} MB free ({free_mem} MB here)")
    return Placement(server, disk, reason)


def vm_dir(vm: VM, disk: ServerDisk | None = None) -> str:
    """The VM's folder on its own disk, or on *disk* (its LiveSync backup's, a move's target)."""
    return posixpath.join((disk or vm.disk).mountpoint, "corral-vms", vm.name)


def base_path(disk: ServerDisk, appliance_id: int, sha256: str) -> str:
    return posixpath.join(disk.mountpoint, "corral-bases", f"appliance-{appliance_id}-{sha256[:16]}.qcow2")


def disk_path(vm: VM, position: int) -> str:
    return posixpath.join(vm_dir(vm), f"disk{position}.qcow2")


def seed_path(vm: VM) -> str:
    """The VM's NoCloud seed ISO (portal/vmm/seed.py), in its folder: deleting the VM removes it."""
    return posixpath.join(vm_dir(vm), "seed.iso")


def serial_log_path(vm: VM) -> str:
    return f"/var/log/libvirt/qemu/{vm.name}.serial.log"


def check_fits(server: Server, disk: ServerDisk | None, *, memory_mb: int, new_disk_gb: int) -> None:
    """What a server can hold bounds every size a form accepts (create, blank create, settings).

    A VM's memory is at most the server's memory; new disk space (a new VM's
    disks, or what a resize adds) at most what the VM disk has free (its size
    until the first poll measured it). Quotas bound a power user's total; this
    bounds everyone's single request, managers' included.
    """
    if server.memory_mb <= 0:
        raise VMError(f"The memory of {server.hostname} is not known yet; wait for its first poll.")
    if memory_mb > server.memory_mb:
        raise VMError(f"{memory_mb} MB of memory do not fit on {server.hostname}: it has {server.memory_mb} MB "
                      f"in all.")
    if disk is None or new_disk_gb <= 0:
        return
    free = disk.free_gb if disk.free_gb is not None else disk.size_gb
    if new_disk_gb > free:
        raise VMError(f"{new_disk_gb} GB of new disk do not fit on {server.hostname}:{disk.mountpoint}: it has "
                      f"{free} GB free.")


def appliance_disk_sizes(appliance: Appliance) -> list[int]:
    """Each appliance disk's virtual size in whole GB (at least 1): what a VM made from it holds."""
    return [max(1, -(-(d.virtual_size_bytes or 0) // GIB)) for d in appliance.disks]


@dataclass(frozen=True)
class NewDisk:
    position: int
    size_gb: int
    bus: str = "virtio"


def _record_vm(*, owner: User, name: str, memory_mb: int, vcpus: int, placement: Placement, disks: list[NewDisk],
               usb_tablet: bool, mac: str | None, detail: str, **fields) -> VM:
    """The part every create shares: bounds, quota, name, MAC, the rows and the action log."""
    quotas.reserve(owner.id, vms=1, memory_mb=memory_mb, disk_gb=sum(d.size_gb for d in disks))
    check_fits(placement.server, placement.disk, memory_mb=memory_mb, new_disk_gb=sum(d.size_gb for d in disks))
    name = check_name(name)
    if mac:
        mac = macs.check_custom(mac)
    vm = VM(vmid=next_vmid(), name=name, owner_id=owner.id, memory_mb=memory_mb, vcpus=vcpus,
            server_id=placement.server.id, disk_id=placement.disk.id, usb_tablet=usb_tablet,
            state=VMState.CREATING.value, **fields)
    db.session.add(vm)
    db.session.flush()
    for d in disks:
        db.session.add(VirtualDisk(vm_id=vm.id, position=d.position, size_gb=d.size_gb, bus=d.bus, format="qcow2"))
    db.session.add(NIC(vm_id=vm.id, position=0, mac=mac or macs.generated(vm.vmid, 0)))
    db.session.flush()
    actionlog.record("vm-created", target=vm, detail=detail)
    return vm


def record_new_vm(*, owner: User, name: str, appliance: Appliance, memory_mb: int, vcpus: int,
                  placement: Placement, clone: bool, usb_tablet: bool, mac: str | None) -> VM:
    """Reserve quota and add the VM row (creating), its disks and its NIC."""
    if appliance.state != ApplianceState.READY.value or not appliance.disks:
        raise VMError(f"The appliance {appliance.name} is not ready.")
    if not appliance.min_memory_mb <= memory_mb <= appliance.max_memory_mb:
        raise VMError(f"{appliance.name} needs between {appliance.min_memory_mb} and {appliance.max_memory_mb} MB "
                      f"of memory.")
    disks = [NewDisk(d.position, size) for d, size in zip(appliance.disks, appliance_disk_sizes(appliance))]
    vm = _record_vm(owner=owner, name=name, memory_mb=memory_mb, vcpus=vcpus, placement=placement, disks=disks,
                    usb_tablet=usb_tablet, mac=mac, is_clone=clone, appliance_id=appliance.id,
                    detail=f"from {appliance.name} on {placement.server.hostname}"
                           f"{' (clone)' if clone else ''}: {placement.reason}")
    try:
        license_keys.assign(vm, appliance)
    except license_keys.LicenseKeyError as exc:
        raise VMError(str(exc)) from None
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
    if new_owner.role == Role.POWER.value:
        quotas.reserve(new_owner.id, vms=1, memory_mb=vm.memory_mb, disk_gb=vm.disk_gb)
    old = vm.owner.username
    vm.owner_id = new_owner.id
    actionlog.record("vm-owner-changed", target=vm, detail=f"{old} -> {new_owner.username}")
    db.session.flush()


DELETABLE = (VMState.OFF.value, VMState.PARTIAL.value, VMState.SAVED.value, VMState.CRASHED.value)


def check_delete(vm: VM) -> None:
    """A VM is deleted while nothing runs in it (off, saved, crashed, or partially created)."""
    if vm.state not in DELETABLE:
        raise VMError(f"Power {vm.name} off before deleting it (it is {vm.state_enum.label}).")
    member = db.session.get(ClusterMember, vm.id)
    if member is not None and member.role == "frontend":
        raise VMError(f"{vm.name} is the frontend of virtual cluster {member.cluster.name}: delete the cluster "
                      "instead (its page removes every VM, disk and its VLAN).")


@dataclass(frozen=True)
class Sizes:
    """What settings change on a VM: memory, vCPUs and each disk's size."""

    memory_mb: int
    vcpus: int
    disk_gb: tuple[int, ...]

    @classmethod
    def of(cls, vm: VM) -> Sizes:
        return cls(vm.memory_mb, vm.vcpus, tuple(d.size_gb for d in vm.vdisks))

    def apply(self, vm: VM) -> None:
        """Record these sizes on the VM (flushes; the settings job makes the server match)."""
        vm.memory_mb, vm.vcpus = self.memory_mb, self.vcpus
        for d, size in zip(vm.vdisks, self.disk_gb):
            d.size_gb = size
        db.session.flush()

    def describe_change(self, new: Sizes) -> str:
        return (f"memory {self.memory_mb} -> {new.memory_mb} MB, vCPUs {self.vcpus} -> {new.vcpus}, "
                f"disks {list(self.disk_gb)} -> {list(new.disk_gb)} GB")


def check_settings(vm: VM, *, memory_mb: int, vcpus: int, disk_sizes: list[int]) -> None:
    """Settings change only while the VM is off, within the appliance's range, the owner's quota and
    what the VM's server can hold (who may change them at all is :func:`permissions.can_change_settings`)."""
    if vm.state != VMState.OFF.value:
        raise VMError(f"Change settings while {vm.name} is off (it is {vm.state_enum.label}).")
    if vm.appliance and not vm.appliance.min_memory_mb <= memory_mb <= vm.appliance.max_memory_mb:
        raise VMError(f"{vm.appliance.name} needs between {vm.appliance.min_memory_mb} and "
                      f"{vm.appliance.max_memory_mb} MB of memory.")
    current = [d.size_gb for d in vm.vdisks]
    if len(disk_sizes) != len(current) or any(new < old for new, old in zip(disk_sizes, current)):
        raise VMError("Disks can only grow (shrinking would destroy data).")
    if any(new > MAX_DISK_GB for new in disk_sizes):
        raise VMError(f"Each disk needs a size between 1 and {MAX_DISK_GB} GB.")
    extra_disk = sum(disk_sizes) - sum(current)
    owner = vm.owner
    if owner.role == Role.POWER.value:
        quotas.reserve(owner.id, vms=0, memory_mb=max(0, memory_mb - vm.memory_mb), disk_gb=extra_disk)
    if vm.server is None:
        raise VMError(f"{vm.name} has no server; its settings cannot change.")
    check_fits(vm.server, vm.disk, memory_mb=memory_mb, new_disk_gb=extra_disk)


def change_settings(vm: VM, new: Sizes) -> Sizes:
    """Check and record new sizes (the settings job makes the server match); returns the old ones so
    that a task that cannot start can put them back. Flushes."""
    check_settings(vm, memory_mb=new.memory_mb, vcpus=new.vcpus, disk_sizes=list(new.disk_gb))
    old = Sizes.of(vm)
    new.apply(vm)
    actionlog.record("vm-settings-changed", target=vm, detail=old.describe_change(new))
    return old


MAX_BLANK_DISKS = 3
MAX_DISK_GB = 16384  # per disk, whatever the server: beyond it is a typing error


def iso_path(disk: ServerDisk, iso) -> str:
    """Where an ISO is cached on a server disk (shared by the VMs that boot from it)."""
    return posixpath.join(disk.mountpoint, "corral-isos", f"iso-{iso.id}-{(iso.sha256 or 'nosum')[:16]}.iso")


def record_new_blank_vm(*, owner: User, name: str, iso, memory_mb: int, vcpus: int, placement: Placement,
                        disks: list[tuple[int, str]], usb_tablet: bool, mac: str | None) -> VM:
    """Reserve quota and add a blank VM (ISO as CD-ROM, one to three new disks)."""
    if not 1 <= len(disks) <= MAX_BLANK_DISKS:
        raise VMError(f"A blank VM has one to {MAX_BLANK_DISKS} disks.")
    for size, bus in disks:
        if size < 1 or size > MAX_DISK_GB:
            raise VMError(f"Each disk needs a size between 1 and {MAX_DISK_GB} GB.")
        if bus not in ("ide", "scsi", "virtio"):
            raise VMError(f"Unknown disk bus {bus!r}.")
    return _record_vm(owner=owner, name=name, memory_mb=memory_mb, vcpus=vcpus, placement=placement,
                      disks=[NewDisk(position, size, bus) for position, (size, bus) in enumerate(disks)],
                      usb_tablet=usb_tablet, mac=mac, iso_id=iso.id,
                      detail=f"blank, booting {iso.name}, disks {', '.join(f'{s} GB {b}' for s, b in disks)} "
                             f"on {placement.server.hostname}")

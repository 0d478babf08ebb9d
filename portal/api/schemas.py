"""Marshmallow schemas of the JSON API: what goes in (validated) and what comes out (documented)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from .. import vms as vms_mod
from ..models import BackupMode, ServerStatus, TaskState, VMState

MAX_ID = 2 ** 31 - 1
Id = lambda **kw: fields.Int(validate=validate.Range(1, MAX_ID), **kw)  # noqa: E731


class Error(Schema):
    code = fields.Str(required=True, metadata={"description": "Stable: clients branch on it."})
    message = fields.Str(required=True)
    task = fields.Int(metadata={"description": "code busy: the task already under way."})
    retry_after = fields.Int()
    fields = fields.Dict(keys=fields.Str(), values=fields.List(fields.Str()), required=True)  # last: shadows


class ErrorEnvelope(Schema):
    error = fields.Nested(Error, required=True)


class PageQuery(Schema):
    limit = fields.Int(load_default=50, validate=validate.Range(1, 200))
    cursor = fields.Str(load_default=None, validate=validate.Length(max=64))


def page_of(item: type[Schema], name: str) -> type[Schema]:
    return Schema.from_dict({"items": fields.List(fields.Nested(item), required=True),
                             "next_cursor": fields.Str(allow_none=True, required=True)}, name=name)


# --- Users ---------------------------------------------------------------------------------

class UserRef(Schema):
    id = fields.Int(required=True)
    username = fields.Str(required=True)


class User(Schema):
    id = fields.Int(required=True)
    username = fields.Str(required=True)
    email = fields.Str(allow_none=True, required=True)
    role = fields.Str(required=True)
    disabled = fields.Bool(required=True)
    max_vms = fields.Int(required=True)
    max_memory_mb = fields.Int(required=True)
    max_disk_gb = fields.Int(required=True)


class Me(User):
    token_scope = fields.Str(allow_none=True, required=True,
                             metadata={"description": "read or write; null for a cookie session"})


# --- Tasks ---------------------------------------------------------------------------------

class Task(Schema):
    id = fields.Int(required=True)
    url = fields.Str(required=True)
    kind = fields.Str(required=True)
    title = fields.Str(required=True)
    state = fields.Str(required=True, validate=validate.OneOf([s.value for s in TaskState]))
    step = fields.Str(allow_none=True, required=True)
    pct = fields.Int(allow_none=True, required=True)
    bytes_done = fields.Int(allow_none=True, required=True)
    bytes_total = fields.Int(allow_none=True, required=True)
    eta_seconds = fields.Int(allow_none=True, required=True)
    error = fields.Str(allow_none=True, required=True)
    target_type = fields.Str(allow_none=True, required=True)
    target_id = fields.Int(allow_none=True, required=True)
    requester = fields.Nested(UserRef, allow_none=True, required=True)
    created_at = fields.DateTime(required=True)
    finished_at = fields.DateTime(allow_none=True, required=True)


class Accepted(Schema):
    task = fields.Nested(Task, required=True)
    task_url = fields.Str(required=True, metadata={"description": "Poll it (GET, optionally ?wait=30)."})


class TaskQuery(PageQuery):
    state = fields.Str(load_default=None, validate=validate.OneOf([s.value for s in TaskState]))
    kind = fields.Str(load_default=None, validate=validate.Length(max=32))


class TaskWait(Schema):
    wait = fields.Int(load_default=0, validate=validate.Range(0, 60),
                      metadata={"description": "Seconds to wait for the task to end before answering."})


# --- Servers -------------------------------------------------------------------------------

class ServerDisk(Schema):
    id = fields.Int(required=True)
    mountpoint = fields.Str(required=True)
    size_gb = fields.Int(required=True)
    free_gb = fields.Int(allow_none=True, required=True)
    shared_group = fields.Str(allow_none=True, required=True)


class Server(Schema):
    id = fields.Int(required=True)
    hostname = fields.Str(required=True)
    address = fields.Str(required=True)
    status = fields.Str(required=True, validate=validate.OneOf([s.value for s in ServerStatus]))
    cpus = fields.Int(required=True)
    memory_mb = fields.Int(required=True)
    free_memory_mb = fields.Int(allow_none=True, required=True)
    domain_type = fields.Str(required=True)
    last_seen = fields.DateTime(allow_none=True, required=True)
    last_error = fields.Str(allow_none=True, required=True)
    vm_count = fields.Int(required=True)
    disks = fields.List(fields.Nested(ServerDisk), required=True)


class ServerQuery(PageQuery):
    status = fields.Str(load_default=None, validate=validate.OneOf([s.value for s in ServerStatus]))


# --- VMs -----------------------------------------------------------------------------------

class VirtualDisk(Schema):
    position = fields.Int(required=True)
    size_gb = fields.Int(required=True)
    bus = fields.Str(required=True)


class VM(Schema):
    id = fields.Int(required=True, metadata={"description": "Stable id in this portal's database"})
    vmid = fields.Int(required=True, metadata={"description": "Cluster-wide VMID"})
    name = fields.Str(required=True)
    url = fields.Str(required=True)
    state = fields.Str(required=True, validate=validate.OneOf([s.value for s in VMState]))
    owner = fields.Nested(UserRef, required=True)
    memory_mb = fields.Int(required=True)
    vcpus = fields.Int(required=True)
    disk_gb = fields.Int(required=True)
    disks = fields.List(fields.Nested(VirtualDisk), required=True)
    macs = fields.List(fields.Str(), required=True, metadata={"description": "NIC MAC addresses in order"})
    server = fields.Str(allow_none=True, required=True, metadata={"description": "hostname"})
    server_id = fields.Int(allow_none=True, required=True)
    backup_server = fields.Str(allow_none=True, required=True)
    livesync = fields.Str(allow_none=True, required=True, metadata={"description": "LiveSync state, if protected"})
    is_clone = fields.Bool(required=True)
    appliance_id = fields.Int(allow_none=True, required=True)
    created_at = fields.DateTime(required=True)
    actions = fields.List(fields.Str(), required=True, metadata={"description": "Power actions possible now"})


class VMQuery(PageQuery):
    state = fields.Str(load_default=None, validate=validate.OneOf([s.value for s in VMState]))
    server = fields.Str(load_default=None, validate=validate.Length(max=255), metadata={"description": "hostname"})
    owner = fields.Str(load_default=None, validate=validate.Length(max=64), metadata={"description": "username"})
    q = fields.Str(load_default=None, validate=validate.Length(max=8), metadata={"description": "name contains"})


def _mac():
    return fields.Str(load_default=None, allow_none=True, validate=validate.Length(max=17))


def _backup_mode():
    return fields.Str(load_default=BackupMode.NONE.value, validate=validate.OneOf([m.value for m in BackupMode]),
                      metadata={"description": "LiveSync protection, applied by the create task"})


class NewVM(Schema):
    name = fields.Str(required=True, validate=validate.Length(1, 8))
    appliance_id = Id(required=True)
    memory_mb = fields.Int(required=True, validate=validate.Range(16, 1 << 22))
    vcpus = fields.Int(load_default=1, validate=validate.Range(1, 64))
    server_disk_id = Id(load_default=None, allow_none=True,
                        metadata={"description": "A server's VM disk; omitted: automatic placement"})
    clone = fields.Bool(load_default=False)
    usb_tablet = fields.Bool(load_default=False)
    mac = _mac()
    backup_mode = _backup_mode()
    backup_server_id = Id(load_default=None, allow_none=True, metadata={"description": "LiveSync backup server"})


class NewDisk(Schema):
    size_gb = fields.Int(required=True, validate=validate.Range(1, vms_mod.MAX_DISK_GB))
    bus = fields.Str(load_default="virtio", validate=validate.OneOf(["virtio", "ide", "scsi"]))


class NewBlankVM(Schema):
    name = fields.Str(required=True, validate=validate.Length(1, 8))
    iso_id = Id(required=True)
    memory_mb = fields.Int(load_default=1024, validate=validate.Range(64, 1 << 22))
    vcpus = fields.Int(load_default=1, validate=validate.Range(1, 64))
    server_disk_id = Id(load_default=None, allow_none=True)
    disks = fields.List(fields.Nested(NewDisk), load_default=lambda: [{"size_gb": 10, "bus": "virtio"}],
                        validate=validate.Length(1, vms_mod.MAX_BLANK_DISKS))
    usb_tablet = fields.Bool(load_default=False)
    mac = _mac()
    backup_mode = _backup_mode()
    backup_server_id = Id(load_default=None, allow_none=True, metadata={"description": "LiveSync backup server"})


class PowerAction(Schema):
    action = fields.Str(required=True, validate=validate.OneOf(list(vms_mod.ACTIONS)))


class Settings(Schema):
    memory_mb = fields.Int(validate=validate.Range(16, 1 << 22))
    vcpus = fields.Int(validate=validate.Range(1, 64))
    disk_gb = fields.List(fields.Int(validate=validate.Range(1, vms_mod.MAX_DISK_GB)), validate=validate.Length(1, 16),
                          metadata={"description": "Each disk's new size in order (disks only grow)"})


class NewOwner(Schema):
    owner = fields.Str(required=True, validate=validate.Length(1, 64), metadata={"description": "username"})


class Move(Schema):
    mode = fields.Str(required=True, validate=validate.OneOf(["live", "cold"]))
    server_id = Id(required=True)


class Empty(Schema):
    pass


# --- Library and the action log ---------------------------------------------------------------

class Appliance(Schema):
    id = fields.Int(required=True)
    name = fields.Str(required=True)
    description = fields.Str(allow_none=True, required=True)
    state = fields.Str(required=True)
    min_memory_mb = fields.Int(required=True)
    max_memory_mb = fields.Int(required=True)
    vcpus = fields.Int(required=True)
    os_hint = fields.Str(allow_none=True, required=True)
    disk_gb = fields.List(fields.Int(), required=True)


class Iso(Schema):
    id = fields.Int(required=True)
    name = fields.Str(required=True)
    size_bytes = fields.Int(required=True)


class ActionLogEntry(Schema):
    id = fields.Int(required=True)
    at = fields.DateTime(required=True)
    user = fields.Str(allow_none=True, required=True)
    action = fields.Str(required=True)
    target_type = fields.Str(allow_none=True, required=True)
    target_id = fields.Int(allow_none=True, required=True)
    target_label = fields.Str(allow_none=True, required=True)
    detail = fields.Str(allow_none=True, required=True)
    task_id = fields.Int(allow_none=True, required=True)


class ActionLogQuery(PageQuery):
    user = fields.Str(load_default=None, validate=validate.Length(max=64),
                      metadata={"description": "username (managers)"})
    action = fields.Str(load_default=None, validate=validate.Length(max=64))


VMPage = page_of(VM, "VMPage")
ServerPage = page_of(Server, "ServerPage")
TaskPage = page_of(Task, "TaskPage")
UserPage = page_of(User, "UserPage")
AppliancePage = page_of(Appliance, "AppliancePage")
IsoPage = page_of(Iso, "IsoPage")
ActionLogPage = page_of(ActionLogEntry, "ActionLogPage")


class ApplianceUpload(Schema):
    """The form fields of an appliance upload (multipart/form-data, beside the files in ``disks``)."""
    name = fields.Str(required=True)
    description = fields.Str(load_default="", validate=validate.Length(max=2000))
    min_memory_mb = fields.Int(load_default=256, validate=validate.Range(16, 1 << 22))
    max_memory_mb = fields.Int(load_default=4096, validate=validate.Range(16, 1 << 22))
    vcpus = fields.Int(load_default=1, validate=validate.Range(1, 64))
    os_hint = fields.Str(load_default="", validate=validate.Length(max=64))


class OvaImport(Schema):
    """The form fields of an OVA import (multipart/form-data, beside the package in ``ova``)."""
    name = fields.Str(load_default="", metadata={"description": "empty: the name in the OVF"})
    description = fields.Str(load_default="", validate=validate.Length(max=2000))

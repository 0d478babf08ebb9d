"""The resources of /api/v1. Each view: load through ``permissions``, authorise, call the same domain
function as the page, commit once (``views_common.start``), answer JSON. Long work answers 202 with its task."""

from __future__ import annotations

import time
from functools import partial

from flask import current_app, request, url_for
from flask_login import current_user
from marshmallow import EXCLUDE
from sqlalchemy import func
from sqlalchemy.orm import joinedload, selectinload

from .. import backups, livesync, moves, permissions, quotas, servers as servers_mod, tasks as tasks_mod, vms as vms_mod
from ..extensions import db
from ..macs import MacError
from ..models import ACTIVE_TASK_STATES, VM, ActionLog, Appliance, IsoImage, Server, ServerDisk, Task, User
from ..views_common import start, submit_vm_task
from . import schemas as s
from .core import ApiError, page, refused
from .core import operation as _operation

operation = partial(_operation, prepared=True)  # these views build plain JSON values (see vm_out and friends)

# --- JSON shapes (as the schemas document them) ---------------------------------------------

def iso(when) -> str | None:
    return when.isoformat() if when is not None else None



def vm_out(vm: VM) -> dict:
    ls = getattr(vm, "livesync", None)
    return {"id": vm.id, "vmid": vm.vmid, "name": vm.name, "url": f"{request.script_root}/api/v1/vms/{vm.id}",
            "state": vm.state, "owner": {"id": vm.owner.id, "username": vm.owner.username},
            "memory_mb": vm.memory_mb, "vcpus": vm.vcpus, "disk_gb": vm.disk_gb,
            "disks": [{"position": d.position, "size_gb": d.size_gb, "bus": d.bus} for d in vm.vdisks],
            "macs": [n.mac for n in vm.nics],
            "server": vm.server.hostname if vm.server else None, "server_id": vm.server_id,
            "backup_server": vm.backup_server.hostname if vm.backup_server else None,
            "livesync": ls.state if ls is not None else None, "is_clone": vm.is_clone,
            "appliance_id": vm.appliance_id, "created_at": iso(vm.created_at), "actions": vms_mod.allowed_actions(vm)}


def task_out(task: Task) -> dict:
    return {"id": task.id, "url": url_for("api_v1.get_task", task_id=task.id), "kind": task.kind, "title": task.title,
            "state": task.state, "step": task.step, "pct": task.pct, "bytes_done": task.bytes_done,
            "bytes_total": task.bytes_total, "eta_seconds": task.eta_seconds, "error": task.error,
            "target_type": task.target_type, "target_id": task.target_id,
            "requester": {"id": task.requester.id, "username": task.requester.username} if task.requester else None,
            "created_at": iso(task.created_at), "finished_at": iso(task.finished_at)}


def server_out(server: Server, vm_count: int) -> dict:
    return {"id": server.id, "hostname": server.hostname, "address": server.address, "status": server.status,
            "cpus": server.cpus, "memory_mb": server.memory_mb, "free_memory_mb": server.free_memory_mb,
            "domain_type": server.domain_type, "last_seen": iso(server.last_seen), "last_error": server.last_error,
            "vm_count": vm_count, "disks": [{"id": d.id, "mountpoint": d.mountpoint, "size_gb": d.size_gb,
                                             "free_gb": d.free_gb, "shared_group": d.shared_group}
                                            for d in server.disks]}


def user_out(user: User) -> dict:
    return {k: getattr(user, k) for k in ("id", "username", "email", "role", "disabled", "max_vms", "max_memory_mb",
                                          "max_disk_gb")}


def accepted(task: Task) -> dict:
    return {"task": task_out(task), "task_url": url_for("api_v1.get_task", task_id=task.id)}


def launched(sub: tasks_mod.Submitted, *, not_started=None) -> dict:
    """Commit once and enqueue; 202 with the task, 409 ``busy`` with the one under way, 503 if the queue is away."""
    task, problem = start(sub, not_started=not_started)
    if problem == "busy":
        raise ApiError(409, "busy", f"That is busy with task {task.id} ({task.title}); try again when it ends.",
                       task=task.id)
    if problem:
        raise ApiError(503, "queue_unavailable", f"{problem} Try again shortly.")
    return accepted(task)


def _vm(vm_id: int) -> VM:
    return permissions.get_vm_or_404(vm_id)


def _forbid_unless(allowed: bool) -> None:
    if not allowed:
        raise ApiError(403, "forbidden", "You are not allowed to do that.")


def _manager_only() -> None:
    _forbid_unless(permissions.can_manage(current_user))


# --- Who am I ------------------------------------------------------------------------------

@operation("GET", "/me", summary="The user this token (or session) acts as", tag="users", response=s.Me)
def me():
    from flask import g

    token = g.get("api_token")
    return {**user_out(current_user), "token_scope": token.scope if token is not None else None}


# --- VMs -----------------------------------------------------------------------------------

@operation("GET", "/vms", summary="List VMs (yours; a manager's: all)", tag="vms", query=s.VMQuery,
           response=s.VMPage)
def list_vms(query):
    # Many-to-one joined into the page's one query; the VMs' disks and NICs in one query each.
    stmt = permissions.visible_vms(db.select(VM), current_user).options(
        joinedload(VM.owner).load_only(User.id, User.username), joinedload(VM.server), joinedload(VM.backup_server),
        joinedload(VM.livesync), selectinload(VM.vdisks), selectinload(VM.nics))
    if query["state"]:
        stmt = stmt.where(VM.state == query["state"])
    if query["q"]:
        stmt = stmt.where(VM.name.contains(query["q"], autoescape=True))
    if query["server"]:
        stmt = stmt.where(VM.server_id.in_(db.select(Server.id).where(Server.hostname == query["server"])))
    if query["owner"]:
        stmt = stmt.where(VM.owner_id.in_(db.select(User.id).where(User.username == query["owner"])))
    result = page(stmt, VM.id, query)
    return {**result, "items": [vm_out(v) for v in result["items"]]}


@operation("GET", "/vms/<int:vm_id>", summary="Show a VM", tag="vms", response=s.VM)
def get_vm(vm_id: int):
    return vm_out(_vm(vm_id))


def _placement(memory_mb: int, disk_gb: int, disk_id: int | None) -> vms_mod.Placement:
    if disk_id is not None and db.session.get(ServerDisk, disk_id) is None:
        raise ApiError(422, "invalid", "No such VM disk.", {"server_disk_id": ["No such VM disk."]})
    return vms_mod.place(memory_mb, disk_gb, disk_id=disk_id)


CREATE_REFUSALS = (vms_mod.VMError, quotas.QuotaExceeded, MacError, livesync.LiveSyncError)


def _protect_new(vm: VM, body: dict) -> None:
    """The backup mode and server asked for at creation (LiveSync), recorded with the VM as the page does."""
    if body["backup_mode"] != "none" or body["backup_server_id"]:
        livesync.set_protection(vm, body["backup_mode"], body["backup_server_id"])


@operation("POST", "/vms", summary="Create a VM from an appliance", tag="vms", body=s.NewVM, response=s.Accepted,
           status=202)
def create_vm(body):
    from ..jobs.vms import create_vm as create_job

    _forbid_unless(permissions.can_create_vm(current_user))
    appliance = db.session.get(Appliance, body["appliance_id"])
    if appliance is None or appliance.state != "ready":
        raise ApiError(422, "invalid", "No ready appliance with that id.", {"appliance_id": ["No ready appliance."]})
    try:
        placement = _placement(body["memory_mb"], sum(vms_mod.appliance_disk_sizes(appliance)), body["server_disk_id"])
        vm = vms_mod.record_new_vm(owner=current_user._get_current_object(), name=body["name"], appliance=appliance,
                                   memory_mb=body["memory_mb"], vcpus=body["vcpus"], placement=placement,
                                   clone=body["clone"], usb_tablet=body["usb_tablet"], mac=body["mac"] or None)
        _protect_new(vm, body)
    except CREATE_REFUSALS as exc:
        db.session.rollback()
        raise refused(exc) from exc
    return launched(tasks_mod.submit("vm-create", create_job, title=f"Create VM {vm.name}",
                                     requester_id=current_user.id, target=vm, args=(vm.id,)))


@operation("POST", "/vms/blank", summary="Create a blank VM that boots an ISO", tag="vms", body=s.NewBlankVM,
           response=s.Accepted, status=202)
def create_blank_vm(body):
    from ..jobs.vms import create_vm as create_job

    _forbid_unless(permissions.can_create_vm(current_user))
    iso = db.session.get(IsoImage, body["iso_id"])
    if iso is None:
        raise ApiError(422, "invalid", "No ISO with that id.", {"iso_id": ["No such ISO."]})
    disks = [(d["size_gb"], d["bus"]) for d in body["disks"]]
    try:
        placement = _placement(body["memory_mb"], sum(size for size, _ in disks), body["server_disk_id"])
        vm = vms_mod.record_new_blank_vm(owner=current_user._get_current_object(), name=body["name"], iso=iso,
                                         memory_mb=body["memory_mb"], vcpus=body["vcpus"], placement=placement,
                                         disks=disks, usb_tablet=body["usb_tablet"], mac=body["mac"] or None)
        _protect_new(vm, body)
    except CREATE_REFUSALS as exc:
        db.session.rollback()
        raise refused(exc) from exc
    return launched(submit_vm_task(vm, "vm-create", create_job, f"Create blank VM {vm.name}"))


@operation("POST", "/vms/<int:vm_id>/power", summary="Power action: start, shutdown, poweroff, reboot, pause, "
           "resume, save, restore", tag="vms", body=s.PowerAction, response=s.Accepted, status=202)
def power_vm(vm_id: int, body):
    from ..jobs.vms import power_vm as power_job

    vm, action = _vm(vm_id), body["action"]
    _forbid_unless(permissions.can_operate_vm(current_user, vm))
    try:
        vms_mod.check_action(vm, action)
    except vms_mod.VMError as exc:
        raise refused(exc) from exc
    return launched(submit_vm_task(vm, f"vm-{action}", power_job, f"{vms_mod.ACTION_LABELS[action]} {vm.name}",
                                   action))


@operation("PATCH", "/vms/<int:vm_id>", summary="Change memory, vCPUs and disk sizes (VM off)", tag="vms",
           body=s.Settings, response=s.Accepted, status=202)
def change_settings(vm_id: int, body):
    from ..jobs.vms import apply_settings

    vm = _vm(vm_id)
    _forbid_unless(permissions.can_change_settings(current_user, vm))
    now = vms_mod.Sizes.of(vm)
    try:
        old = vms_mod.change_settings(vm, vms_mod.Sizes(body.get("memory_mb", now.memory_mb),
                                                        body.get("vcpus", now.vcpus),
                                                        tuple(body.get("disk_gb", now.disk_gb))))
    except (vms_mod.VMError, quotas.QuotaExceeded) as exc:
        db.session.rollback()
        raise refused(exc) from exc
    return launched(submit_vm_task(vm, "vm-settings", apply_settings, f"Apply settings of {vm.name}"),
                    not_started=lambda: old.apply(vm))


@operation("PUT", "/vms/<int:vm_id>/owner", summary="Give a VM to another user (managers)", tag="vms",
           body=s.NewOwner, response=s.VM)
def change_owner(vm_id: int, body):
    vm = _vm(vm_id)
    _forbid_unless(permissions.can_change_owner(current_user))
    new_owner = db.session.execute(db.select(User).where(User.username == body["owner"])).scalar_one_or_none()
    if new_owner is None:
        raise ApiError(422, "invalid", "No such user.", {"owner": ["No such user."]})
    try:
        vms_mod.change_owner(vm, new_owner)
    except (vms_mod.VMError, quotas.QuotaExceeded) as exc:
        db.session.rollback()
        raise refused(exc) from exc
    db.session.commit()
    return vm_out(vm)


@operation("DELETE", "/vms/<int:vm_id>", summary="Delete a VM (off, saved, crashed or partial)", tag="vms",
           response=s.Accepted, status=202)
def delete_vm(vm_id: int):
    from .. import actionlog
    from ..jobs.vms import delete_vm as delete_job

    vm = _vm(vm_id)
    _forbid_unless(permissions.can_delete_vm(current_user, vm))
    try:
        vms_mod.check_delete(vm)
    except vms_mod.VMError as exc:
        raise refused(exc) from exc
    actionlog.record("vm-delete-requested", target=vm)
    return launched(submit_vm_task(vm, "vm-delete", delete_job, f"Delete VM {vm.name}"))


@operation("POST", "/vms/<int:vm_id>/move", summary="Migrate (live) or move (cold) a VM to another server",
           tag="vms", body=s.Move, response=s.Accepted, status=202)
def move_vm(vm_id: int, body):
    vm = _vm(vm_id)
    _forbid_unless(permissions.can_move_vm(current_user, vm))
    try:
        cand = moves.check_target(vm, body["mode"], body["server_id"])
    except moves.MoveError as exc:
        raise refused(exc) from exc
    return launched(moves.submit(vm, cand, body["mode"], moves.default_options(), current_user.id))


@operation("POST", "/vms/<int:vm_id>/backups", summary="Back up a VM now", tag="vms", response=s.Accepted,
           status=202)
def back_up_vm(vm_id: int):
    from ..jobs.backups import back_up_vm as backup_job

    vm = _vm(vm_id)
    _forbid_unless(backups.can_back_up(current_user, vm))
    try:
        backups.check_backup(vm)
    except backups.BackupRefused as exc:
        raise refused(exc) from exc
    return launched(submit_vm_task(vm, "vm-backup", backup_job, f"Back up {vm.name}"))


# --- Servers -------------------------------------------------------------------------------

def _vm_counts() -> dict[int, int]:
    return dict(db.session.execute(db.select(VM.server_id, func.count()).group_by(VM.server_id)).all())


@operation("GET", "/servers", summary="List VM servers (managers)", tag="servers", query=s.ServerQuery,
           response=s.ServerPage)
def list_servers(query):
    _manager_only()
    stmt = db.select(Server).options(selectinload(Server.disks))
    if query["status"]:
        stmt = stmt.where(Server.status == query["status"])
    result, counts = page(stmt, Server.id, query), _vm_counts()
    return {**result, "items": [server_out(x, counts.get(x.id, 0)) for x in result["items"]]}


def _server(server_id: int) -> Server:
    _manager_only()
    server = db.session.get(Server, server_id)
    if server is None:
        raise ApiError(404, "not_found", "No such server.")
    return server


@operation("GET", "/servers/<int:server_id>", summary="Show a VM server (managers)", tag="servers",
           response=s.Server)
def get_server(server_id: int):
    server = _server(server_id)
    return server_out(server, _vm_counts().get(server.id, 0))


def _mark(server_id: int, change) -> dict:
    server = _server(server_id)
    try:
        change(server)
    except servers_mod.ServerError as exc:
        db.session.rollback()
        raise refused(exc) from exc
    db.session.commit()
    return server_out(server, _vm_counts().get(server.id, 0))


@operation("POST", "/servers/<int:server_id>/mark-down", summary="Mark a server down: polling stops (managers)",
           tag="servers", response=s.Server)
def mark_server_down(server_id: int):
    return _mark(server_id, servers_mod.mark_down)


@operation("POST", "/servers/<int:server_id>/mark-up", summary="Mark a server up: polling resumes (managers)",
           tag="servers", response=s.Server)
def mark_server_up(server_id: int):
    return _mark(server_id, servers_mod.mark_up)


# --- Library -------------------------------------------------------------------------------

@operation("GET", "/library/appliances", summary="List appliances", tag="library", query=s.PageQuery,
           response=s.AppliancePage)
def list_appliances(query):
    stmt = db.select(Appliance).options(selectinload(Appliance.disks))
    if not permissions.can_manage(current_user):
        stmt = stmt.where(Appliance.state == "ready")
    result = page(stmt, Appliance.id, query)
    return {**result, "items": [{**{k: getattr(a, k) for k in ("id", "name", "description", "state", "min_memory_mb",
                                                                  "max_memory_mb", "vcpus", "os_hint")},
                                 "disk_gb": vms_mod.appliance_disk_sizes(a)} for a in result["items"]]}


@operation("GET", "/library/isos", summary="List ISO images", tag="library", query=s.PageQuery,
           response=s.IsoPage)
def list_isos(query):
    result = page(db.select(IsoImage), IsoImage.id, query)
    return {**result, "items": [{"id": i.id, "name": i.name, "size_bytes": i.size_bytes} for i in result["items"]]}


# --- Users ---------------------------------------------------------------------------------

@operation("GET", "/users", summary="List users (managers)", tag="users", query=s.PageQuery, response=s.UserPage)
def list_users(query):
    _manager_only()
    result = page(db.select(User), User.id, query)
    return {**result, "items": [user_out(u) for u in result["items"]]}


# --- Tasks ---------------------------------------------------------------------------------

@operation("GET", "/tasks", summary="List tasks, newest first (yours and your VMs'; a manager's: all)",
           tag="tasks", query=s.TaskQuery, response=s.TaskPage)
def list_tasks(query):
    stmt = permissions.visible_tasks(db.select(Task).options(selectinload(Task.requester)), current_user)
    if query["state"]:
        stmt = stmt.where(Task.state == query["state"])
    if query["kind"]:
        stmt = stmt.where(Task.kind == query["kind"])
    result = page(stmt, Task.id, query, newest_first=True)
    return {**result, "items": [task_out(t) for t in result["items"]]}


@operation("GET", "/tasks/<int:task_id>", summary="Show a task and its progress; ?wait=N waits up to N s for "
           "its end", tag="tasks", query=s.TaskWait, response=s.Task)
def get_task(task_id: int, query):
    task = permissions.get_task_or_404(task_id)
    deadline = time.monotonic() + min(query["wait"], int(current_app.config["API_MAX_WAIT_SECONDS"]))
    while task.state in ACTIVE_TASK_STATES and time.monotonic() < deadline:
        db.session.commit()  # end the read transaction: the next read sees the worker's progress
        time.sleep(0.1)
        db.session.refresh(task)
    return task_out(task)


@operation("POST", "/tasks/<int:task_id>/cancel", summary="Ask a queued or running task to stop", tag="tasks",
           response=s.Task)
def cancel_task(task_id: int):
    task = permissions.get_task_or_404(task_id)
    _forbid_unless(permissions.can_cancel_task(current_user, task))
    if task.finished:
        raise ApiError(409, "refused", f"Task {task.id} has already {task.state}.")
    tasks_mod.cancel(task)
    db.session.commit()
    return task_out(task)


# --- Action log ----------------------------------------------------------------------------

@operation("GET", "/actionlog", summary="The action log, newest first (yours; a manager's: anyone's)",
           tag="actionlog", query=s.ActionLogQuery, response=s.ActionLogPage)
def list_actionlog(query):
    stmt = db.select(ActionLog).options(selectinload(ActionLog.user))
    if not permissions.is_manager(current_user):
        stmt = stmt.where(ActionLog.user_id == current_user.id)
    elif query["user"]:
        stmt = stmt.where(ActionLog.user_id.in_(db.select(User.id).where(User.username == query["user"])))
    if query["action"]:
        stmt = stmt.where(ActionLog.action == query["action"])
    result = page(stmt, ActionLog.id, query, newest_first=True)
    return {**result, "items": [{"id": e.id, "at": iso(e.at), "user": e.user.username if e.user else None,
                                 "action": e.action, "target_type": e.target_type, "target_id": e.target_id,
                                 "target_label": e.target_label, "detail": e.detail, "task_id": e.task_id}
                                for e in result["items"]]}


# --- Library uploads (multipart: the JSON body machinery does not apply) ----------------------

@operation("POST", "/library/appliances", summary="Upload an appliance (managers; multipart/form-data)",
           tag="library", response=s.Accepted, status=202, form=s.ApplianceUpload,
           files={"disks": (True, "one to four disk images: qcow2, raw, vmdk or vdi; may be .gz, .xz or .zst")})
def upload_appliance():
    """Form fields: name, and optionally description, min_memory_mb, max_memory_mb, vcpus, os_hint; one to
    four files in ``disks`` (qcow2, raw, vmdk or vdi; may be .gz, .xz or .zst). A task converts and checks
    them, as for the page's upload."""
    import shutil

    from .. import library
    from .core import load

    _manager_only()
    fields = load(s.ApplianceUpload(unknown=EXCLUDE), request.form.to_dict())
    files = [f for f in request.files.getlist("disks") if f and f.filename]
    try:
        name = library.check_upload(fields["name"], len(files), fields["min_memory_mb"], fields["max_memory_mb"])
    except library.LibraryError as exc:
        field = "disks" if "disk image" in str(exc) else "min_memory_mb" if "memory" in str(exc) else "name"
        raise ApiError(422, "invalid", str(exc), {field: [str(exc)]}) from exc
    sub, folder = library.submit_upload(files, {**fields, "name": name}, current_user.id)
    return launched(sub, not_started=lambda: shutil.rmtree(folder, ignore_errors=True))


@operation("POST", "/library/appliances/ova", summary="Import an OVA package (managers; multipart/form-data)",
           tag="library", response=s.Accepted, status=202, form=s.OvaImport,
           files={"ova": (False, "the OVA package (a tar of the OVF, its manifest and the disks)")})
def import_ova():
    """Form fields: optional name (empty: the OVF's own name) and description; the package in ``ova``. A task
    checks the manifest, reads the OVF and converts the disks, as for the page's import."""
    import shutil

    from .. import library
    from .core import load

    _manager_only()
    fields = load(s.OvaImport(unknown=EXCLUDE), request.form.to_dict())
    ova = request.files.get("ova")
    if ova is None or not ova.filename:
        raise ApiError(422, "invalid", "Send the OVA package in the field ova.", {"ova": ["Missing."]})
    try:
        name = library.check_ova_name(fields["name"])
    except library.LibraryError as exc:
        raise ApiError(422, "invalid", str(exc), {"name": [str(exc)]}) from exc
    sub, folder = library.submit_ova(ova, {**fields, "name": name}, current_user.id)
    return launched(sub, not_started=lambda: shutil.rmtree(folder, ignore_errors=True))

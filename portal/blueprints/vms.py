"""VMs area: the list and each VM's dashboard."""

from __future__ import annotations

import re

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy.orm import selectinload
from wtforms import BooleanField, FieldList, FormField, IntegerField, SelectChoice, SelectField, StringField
from wtforms.validators import DataRequired, Length, NumberRange, Optional

from .. import actionlog, macs, permissions, quotas, tasks, vms as vms_mod
from ..extensions import db, queues
from ..models import VM, Appliance, IsoImage, Server, ServerDisk, ServerStatus, Task, User, VMState
from ..views_common import page_or_partial, paginate

bp = Blueprint("vms", __name__, url_prefix="/vms")


def vm_list_query(user, *, state: str | None = None, q: str | None = None):
    stmt = permissions.visible_vms(db.select(VM), user).options(
        selectinload(VM.owner).load_only(User.id, User.username),
        selectinload(VM.server),
        selectinload(VM.vdisks),
    ).order_by(VM.name)
    if state:
        stmt = stmt.where(VM.state == state)
    if q:
        stmt = stmt.where(VM.name.contains(q.strip()[:8], autoescape=True))
    return stmt


@bp.route("/")
@login_required
def index():
    state = request.args.get("state") or None
    if state and state not in {s.value for s in VMState}:
        state = None
    q = request.args.get("q") or None
    page = paginate(vm_list_query(current_user, state=state, q=q))
    return page_or_partial("vms/index.html", "vms/_list.html", page=page, state=state, q=q,
                           states=list(VMState), can_create=permissions.can_create_vm(current_user))


@bp.route("/<int:vm_id>")
@login_required
def detail(vm_id: int):
    vm = permissions.get_vm_or_404(vm_id)
    history = db.session.execute(
        db.select(Task).where(Task.target_type == "vm", Task.target_id == vm.id)
        .order_by(Task.created_at.desc()).limit(20)
    ).scalars().all()
    owners = db.session.execute(db.select(User.id, User.username).where(User.disabled.is_(False))
                                .order_by(User.username)).all() if permissions.can_change_owner(current_user) else []
    return page_or_partial("vms/detail.html", "vms/_detail.html", vm=vm, history=history,
                           actions=vms_mod.allowed_actions(vm), labels=vms_mod.ACTION_LABELS,
                           can_delete=permissions.can_delete_vm(current_user, vm), owners=owners)


class NewVMForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=8)])
    appliance = SelectField("Appliance", coerce=int)
    memory_mb = IntegerField("Memory (MB)", validators=[DataRequired(), NumberRange(16, 1 << 22)])
    vcpus = IntegerField("vCPUs", default=1, validators=[NumberRange(1, 64)])
    placement = SelectField("Server and VM disk", default="auto")
    clone = BooleanField("Clone VM (copy-on-write overlay on a base cached on the server: ready in seconds)")
    usb_tablet = BooleanField("USB tablet (smooth mouse in the web console)")
    mac = StringField("Custom MAC (empty: generated from the VMID)", validators=[Optional(), Length(max=17)])


def _new_vm_form() -> NewVMForm:
    form = NewVMForm()
    appliances = db.session.execute(
        db.select(Appliance).where(Appliance.state == "ready").order_by(Appliance.name)).scalars().all()
    form.appliance.choices = [SelectChoice(a.id, f"{a.name} ({a.min_memory_mb}-{a.max_memory_mb} MB)")
                              for a in appliances]
    disks = db.session.execute(
        db.select(ServerDisk).join(Server).where(Server.status == ServerStatus.UP.value)
        .order_by(Server.hostname, ServerDisk.mountpoint)).scalars().all()
    if not form.is_submitted() and request.args.get("appliance", "").isdigit():
        form.appliance.data = int(request.args["appliance"])
    form.placement.choices = [SelectChoice("auto", "Automatic (enough free memory, most free disk, fewest VMs)")] + [
        SelectChoice(str(d.id), f"{d.server.hostname}:{d.mountpoint} ({d.free_gb if d.free_gb is not None else '?'} "
                                f"GB free)") for d in disks]
    return form


@bp.route("/new", methods=["GET", "POST"])
@login_required
def new():
    from ..jobs.vms import create_vm

    if not permissions.can_create_vm(current_user):
        abort(403)
    form = _new_vm_form()
    if not form.appliance.choices and request.method == "GET":
        flash("The library has no ready appliance yet; a manager adds one first.", "info")
    if form.validate_on_submit():
        appliance = db.session.get(Appliance, form.appliance.data)
        disk_id = None if form.placement.data == "auto" else int(form.placement.data)
        try:
            placement = vms_mod.place(form.memory_mb.data, 1, disk_id=disk_id)
            vm = vms_mod.record_new_vm(owner=current_user._get_current_object(), name=form.name.data,
                                       appliance=appliance, memory_mb=form.memory_mb.data, vcpus=form.vcpus.data,
                                       placement=placement, clone=form.clone.data, usb_tablet=form.usb_tablet.data,
                                       mac=form.mac.data or None)
        except (vms_mod.VMError, quotas.QuotaExceeded, macs.MacError) as exc:
            db.session.rollback()
            flash(str(exc), "error")
        else:
            try:
                sub = tasks.submit("vm-create", create_vm, title=f"Create VM {vm.name}", requester_id=current_user.id,
                                   target=vm, args=(vm.id,))
            except tasks.QueueUnavailable:
                flash("The task queue is not answering; the VM is recorded as partially created.", "error")
                vm.state = VMState.PARTIAL.value
                db.session.commit()
                return redirect(url_for("vms.detail", vm_id=vm.id))
            flash(f"Creating {vm.name} on {placement.server.hostname}: {placement.reason}.", "info")
            return redirect(url_for("tasks.detail", task_id=sub.task.id))
    status = 400 if form.is_submitted() else 200
    return render_template("vms/new.html", form=form, quota=quotas.lines(current_user)), status


def _vm_task(vm: VM, kind: str, func, title: str, *args):
    try:
        sub = tasks.submit(kind, func, title=title, requester_id=current_user.id, target=vm, key=f"vm:{vm.id}",
                           args=(vm.id, *args))
    except tasks.QueueUnavailable:
        flash("The task queue is not answering; nothing was started.", "error")
        return None
    if not sub.created:
        flash(f"{vm.name} is busy with task {sub.task.id} ({sub.task.title}); try again when it ends.", "info")
    return sub.task


@bp.post("/<int:vm_id>/power/<action>")
@login_required
def power(vm_id: int, action: str):
    from ..jobs.vms import power_vm

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_operate_vm(current_user, vm):
        abort(403)
    try:
        vms_mod.check_action(vm, action)
    except vms_mod.VMError as exc:
        flash(str(exc), "error")
    else:
        _vm_task(vm, f"vm-{action}", power_vm, f"{vms_mod.ACTION_LABELS[action]} {vm.name}", action)
    if request.headers.get("HX-Request"):
        return _state_panel(vm)
    return redirect(url_for("vms.detail", vm_id=vm.id))


@bp.post("/<int:vm_id>/delete")
@login_required
def delete(vm_id: int):
    from ..jobs.vms import delete_vm

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_delete_vm(current_user, vm):
        abort(403)
    if vm.state not in (VMState.OFF.value, VMState.PARTIAL.value, VMState.SAVED.value, VMState.CRASHED.value):
        flash(f"Power {vm.name} off before deleting it (it is {vm.state_enum.label}).", "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    actionlog.record("vm-delete-requested", target=vm)
    task = _vm_task(vm, "vm-delete", delete_vm, f"Delete VM {vm.name}")
    if task is None:
        return redirect(url_for("vms.detail", vm_id=vm.id))
    return redirect(url_for("tasks.detail", task_id=task.id))


def _state_panel(vm: VM):
    active = db.session.execute(
        db.select(Task).where(Task.target_type == "vm", Task.target_id == vm.id,
                              Task.state.in_(["queued", "running"]))).scalars().first()
    return render_template("vms/_state.html", vm=vm, actions=vms_mod.allowed_actions(vm), active=active,
                           labels=vms_mod.ACTION_LABELS)


@bp.route("/<int:vm_id>/_state")
@login_required
def state(vm_id: int):
    return _state_panel(permissions.get_vm_or_404(vm_id))


@bp.route("/<int:vm_id>/_console")
@login_required
def console(vm_id: int):
    """The serial log's tail, fetched by a worker (never over SSH in this request)."""
    from ..jobs.vms import console_key, read_console

    vm = permissions.get_vm_or_404(vm_id)
    key = console_key(vm.id)
    text = queues.redis.get(key)
    # At most one fetch every 2 s per VM, whoever is watching.
    if queues.redis.set(f"{key}:pending", 1, nx=True, ex=2):
        queues.queue().enqueue(read_console, vm.id, result_ttl=0, failure_ttl=60, job_timeout=60)
    return render_template("vms/_console.html", vm=vm, text=text.decode(errors="replace") if text else None)


class SettingsForm(FlaskForm):
    memory_mb = IntegerField("Memory (MB)", validators=[DataRequired(), NumberRange(16, 1 << 22)])
    vcpus = IntegerField("vCPUs", validators=[DataRequired(), NumberRange(1, 64)])


@bp.post("/<int:vm_id>/settings")
@login_required
def settings(vm_id: int):
    from ..jobs.vms import apply_settings

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_operate_vm(current_user, vm):
        abort(403)
    form = SettingsForm()
    sizes = []
    for d in vm.vdisks:
        raw = request.form.get(f"disk-{d.position}", str(d.size_gb))
        sizes.append(int(raw) if raw.isdigit() else -1)
    if not form.validate_on_submit():
        flash("; ".join(e for errs in form.errors.values() for e in errs), "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    try:
        vms_mod.check_settings(vm, memory_mb=form.memory_mb.data, vcpus=form.vcpus.data, disk_sizes=sizes)
    except (vms_mod.VMError, quotas.QuotaExceeded) as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    changes = f"memory {vm.memory_mb} -> {form.memory_mb.data} MB, vCPUs {vm.vcpus} -> {form.vcpus.data}, " \
              f"disks {[d.size_gb for d in vm.vdisks]} -> {sizes} GB"
    vm.memory_mb, vm.vcpus = form.memory_mb.data, form.vcpus.data
    for d, size in zip(vm.vdisks, sizes):
        d.size_gb = size
    actionlog.record("vm-settings-changed", target=vm, detail=changes)
    task = _vm_task(vm, "vm-settings", apply_settings, f"Apply settings of {vm.name}")
    return redirect(url_for("tasks.detail", task_id=task.id) if task else url_for("vms.detail", vm_id=vm.id))


@bp.post("/<int:vm_id>/owner")
@login_required
def change_owner(vm_id: int):
    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_change_owner(current_user):
        abort(403)
    new_owner = db.session.get(User, request.form.get("owner", type=int) or 0)
    if new_owner is None:
        flash("Choose the new owner from the list.", "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    try:
        vms_mod.change_owner(vm, new_owner)
    except (vms_mod.VMError, quotas.QuotaExceeded) as exc:
        db.session.rollback()
        flash(str(exc), "error")
    else:
        db.session.commit()
        flash(f"{vm.name} now belongs to {new_owner.username}.", "success")
    return redirect(url_for("vms.detail", vm_id=vm.id))


BUS_CHOICES = [SelectChoice("virtio", "virtio (fastest)"), SelectChoice("ide", "IDE (any guest)"),
               SelectChoice("scsi", "SCSI (cannot boot: data disks only)")]


class BlankDiskForm(FlaskForm):
    class Meta:
        csrf = False

    size_gb = IntegerField("Size (GB)", validators=[Optional(), NumberRange(1, 16384)])
    bus = SelectField("Bus", choices=BUS_CHOICES, default="virtio")


class NewBlankVMForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=8)])
    iso = SelectField("Boot ISO", coerce=int)
    memory_mb = IntegerField("Memory (MB)", default=1024, validators=[DataRequired(), NumberRange(64, 1 << 22)])
    vcpus = IntegerField("vCPUs", default=1, validators=[NumberRange(1, 64)])
    placement = SelectField("Server and VM disk", default="auto")
    disks = FieldList(FormField(BlankDiskForm), min_entries=vms_mod.MAX_BLANK_DISKS,
                      max_entries=vms_mod.MAX_BLANK_DISKS)
    usb_tablet = BooleanField("USB tablet (smooth mouse in the web console)")
    mac = StringField("Custom MAC (empty: generated from the VMID)", validators=[Optional(), Length(max=17)])


@bp.route("/new-blank", methods=["GET", "POST"])
@login_required
def new_blank():
    from ..jobs.vms import create_vm

    if not permissions.can_create_vm(current_user):
        abort(403)
    form = NewBlankVMForm()
    isos = db.session.execute(db.select(IsoImage).order_by(IsoImage.name)).scalars().all()
    form.iso.choices = [SelectChoice(i.id, i.name) for i in isos]
    form.placement.choices = _new_vm_form().placement.choices
    if not form.is_submitted() and form.disks[0].size_gb.data is None:
        form.disks[0].size_gb.data = 10
    if form.validate_on_submit():
        disks = [(d.size_gb.data, d.bus.data) for d in form.disks if d.size_gb.data]
        disk_id = None if form.placement.data == "auto" else int(form.placement.data)
        try:
            placement = vms_mod.place(form.memory_mb.data, sum(s for s, _ in disks) or 1, disk_id=disk_id)
            vm = vms_mod.record_new_blank_vm(
                owner=current_user._get_current_object(), name=form.name.data, iso=db.session.get(IsoImage, form.iso.data),
                memory_mb=form.memory_mb.data, vcpus=form.vcpus.data, placement=placement, disks=disks,
                usb_tablet=form.usb_tablet.data, mac=form.mac.data or None)
        except (vms_mod.VMError, quotas.QuotaExceeded, macs.MacError) as exc:
            db.session.rollback()
            flash(str(exc), "error")
        else:
            task = _vm_task(vm, "vm-create", create_vm, f"Create blank VM {vm.name}")
            if task is None:
                vm.state = VMState.PARTIAL.value
                db.session.commit()
                return redirect(url_for("vms.detail", vm_id=vm.id))
            return redirect(url_for("tasks.detail", task_id=task.id))
    status = 400 if form.is_submitted() else 200
    return render_template("vms/new_blank.html", form=form, quota=quotas.lines(current_user)), status


@bp.post("/<int:vm_id>/copy-back")
@login_required
def copy_back(vm_id: int):
    from ..jobs.vms import copy_back as copy_back_job

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_manage(current_user):
        abort(403)
    name = (request.form.get("name") or "").strip()
    problem = None
    if vm.state != VMState.OFF.value:
        problem = f"Power {vm.name} off first (it is {vm.state_enum.label})."
    elif not re.match(r"^[A-Za-z0-9][A-Za-z0-9._ -]{1,63}$", name):
        problem = "An appliance name has 2 to 64 letters, digits, spaces, dots, dashes or underscores."
    elif db.session.execute(db.select(Appliance.id).where(Appliance.name == name)).first():
        problem = f"An appliance called {name} exists already."
    if problem:
        flash(problem, "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    task = _vm_task(vm, "vm-copy-back", copy_back_job, f"Copy {vm.name} back as appliance {name}", name,
                    current_user.id)
    return redirect(url_for("tasks.detail", task_id=task.id) if task else url_for("vms.detail", vm_id=vm.id))

"""VMs area: the list and each VM's dashboard."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy.orm import selectinload
from wtforms import BooleanField, FieldList, FormField, HiddenField, IntegerField, SelectChoice, SelectField, StringField
from wtforms.validators import DataRequired, Length, NumberRange, Optional

from .. import actionlog, library, livesync, macs, networks, offerings, permissions, quotas, tasks, vms as vms_mod
from ..extensions import db
from ..models import ACTIVE_TASK_STATES, VM, Appliance, ApplianceState, IsoImage, Server, ServerDisk, ServerStatus, Task, User, VMState
from ..views_common import launch, page_or_partial, paginate, submit_vm_task

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
    can_settings = permissions.can_change_settings(current_user, vm)
    return page_or_partial("vms/detail.html", "vms/_detail.html", vm=vm, history=history,
                           actions=vms_mod.allowed_actions(vm), labels=vms_mod.ACTION_LABELS,
                           can_delete=permissions.can_delete_vm(current_user, vm), owners=owners,
                           can_settings=can_settings, managers=[] if can_settings else permissions.managers())


class NewVMForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=8)])
    appliance = SelectField("Appliance", coerce=int)
    memory_mb = IntegerField("Memory (MB)", validators=[DataRequired(), NumberRange(16, 1 << 22)])
    vcpus = IntegerField("vCPUs", default=1, validators=[NumberRange(1, 64)])
    placement = SelectField("Server and VM disk", default="auto")
    clone = BooleanField("Clone VM (copy-on-write overlay on a base cached on the server: ready in seconds)")
    usb_tablet = BooleanField("USB tablet (smooth mouse in the web console)")
    mac = StringField("Custom MAC (empty: generated from the VMID)", validators=[Optional(), Length(max=17)])
    offering = HiddenField()  # ordered from the catalog: bounded by that offering


def _new_vm_form() -> NewVMForm:
    form = NewVMForm()
    appliances = db.session.execute(
        db.select(Appliance).where(Appliance.state == ApplianceState.READY.value).order_by(Appliance.name)).scalars().all()
    form.appliance.choices = [SelectChoice(a.id, f"{a.name} ({a.min_memory_mb}-{a.max_memory_mb} MB)")
                              for a in appliances]
    disks = db.session.execute(
        db.select(ServerDisk).join(Server).where(Server.status == ServerStatus.UP.value)
        .order_by(Server.hostname, ServerDisk.mountpoint)).scalars().all()
    if not form.is_submitted() and request.args.get("appliance", "").isdigit():
        form.appliance.data = int(request.args["appliance"])
    if not form.is_submitted() and request.args.get("offering", "").isdigit():
        try:
            offering = offerings.get_orderable(current_user, int(request.args["offering"]))
        except offerings.OfferingError as exc:
            flash(str(exc), "error")
        else:
            form.offering.data = str(offering.id)
            form.appliance.data, form.memory_mb.data, form.vcpus.data = (offering.appliance_id, offering.memory_mb,
                                                                         offering.vcpus)
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
            offering = None
            if form.offering.data:
                offering = offerings.get_orderable(current_user, int(form.offering.data or 0))
                offerings.check_order(current_user, offering, appliance_id=form.appliance.data,
                                      memory_mb=form.memory_mb.data, vcpus=form.vcpus.data,
                                      backup_mode=request.form.get("backup_mode", "none"))
            nets = networks.from_form(request.form)
            placement = vms_mod.place(form.memory_mb.data, sum(vms_mod.appliance_disk_sizes(appliance)),
                                      disk_id=disk_id, eligible=networks.carries_all(nets))
            vm = vms_mod.record_new_vm(owner=current_user._get_current_object(), name=form.name.data,
                                       appliance=appliance, memory_mb=form.memory_mb.data, vcpus=form.vcpus.data,
                                       placement=placement, clone=form.clone.data, usb_tablet=form.usb_tablet.data,
                                       mac=form.mac.data or None)
            networks.attach(vm, nets)
            if offering is not None:
                offerings.after_order(vm, offering)
            _protect_new(vm)
        except (vms_mod.VMError, quotas.QuotaExceeded, macs.MacError, offerings.OfferingError,
                livesync.LiveSyncError, networks.NetworkError) as exc:
            db.session.rollback()
            flash(str(exc), "error")
        else:
            sub = tasks.submit("vm-create", create_vm, title=f"Create VM {vm.name}", requester_id=current_user.id,
                               target=vm, args=(vm.id,))
            task = launch(sub)
            if task is None:
                return redirect(url_for("vms.detail", vm_id=vm.id))
            flash(f"Creating {vm.name} on {placement.server.hostname}: {placement.reason}.", "info")
            return redirect(url_for("tasks.detail", task_id=task.id))
    status = 400 if form.is_submitted() else 200
    offering = db.session.get(offerings.Offering, int(form.offering.data)) if (form.offering.data or "").isdigit() \
        else None
    return render_template("vms/new.html", form=form, quota=quotas.lines(current_user), offering=offering,
                           backup_preset=offerings.backup_preset(offering)), status


def _protect_new(vm: VM) -> None:
    """The create form's backup mode and server (LiveSync): recorded with the VM, applied by its create job."""
    mode, raw = request.form.get("backup_mode", "none"), request.form.get("backup_server", "")
    if mode != "none" or raw:
        livesync.set_protection(vm, mode, int(raw) if raw.isdigit() else None)


def _vm_task(vm: VM, kind: str, func, title: str, *args, not_started=None):
    """One task per VM at a time: a second request while one is active changes nothing and shows that one."""
    name = vm.name
    sub = submit_vm_task(vm, kind, func, title, *args)
    return launch(sub, busy=f"{name} is busy with task {sub.task.id} ({sub.task.title}); try again when it ends.",
                  not_started=not_started)


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
    try:
        vms_mod.check_delete(vm)
    except vms_mod.VMError as exc:
        flash(str(exc), "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    actionlog.record("vm-delete-requested", target=vm)
    task = _vm_task(vm, "vm-delete", delete_vm, f"Delete VM {vm.name}")
    if task is None:
        return redirect(url_for("vms.detail", vm_id=vm.id))
    return redirect(url_for("tasks.detail", task_id=task.id))


def _state_panel(vm: VM):
    active = db.session.execute(
        db.select(Task).where(Task.target_type == "vm", Task.target_id == vm.id,
                              Task.state.in_(ACTIVE_TASK_STATES))).scalars().first()
    return render_template("vms/_state.html", vm=vm, actions=vms_mod.allowed_actions(vm), active=active,
                           labels=vms_mod.ACTION_LABELS)


@bp.route("/<int:vm_id>/_state")
@login_required
def state(vm_id: int):
    return _state_panel(permissions.get_vm_or_404(vm_id))


@bp.route("/<int:vm_id>/_console")
@login_required
def console(vm_id: int):
    """The serial log's tail from the VM's console buffer: one Redis read, no job and
    no SSH, so any number of viewers cost the server nothing more."""
    from .. import consoles

    vm = permissions.get_vm_or_404(vm_id)
    return render_template("vms/_console.html", vm=vm, console=consoles.view(vm))


class SettingsForm(FlaskForm):
    memory_mb = IntegerField("Memory (MB)", validators=[DataRequired(), NumberRange(16, 1 << 22)])
    vcpus = IntegerField("vCPUs", validators=[DataRequired(), NumberRange(1, 64)])


@bp.post("/<int:vm_id>/settings")
@login_required
def settings(vm_id: int):
    from ..jobs.vms import apply_settings

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_change_settings(current_user, vm):
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
        old = vms_mod.change_settings(vm, vms_mod.Sizes(form.memory_mb.data, form.vcpus.data, tuple(sizes)))
    except (vms_mod.VMError, quotas.QuotaExceeded) as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    # A task that cannot start leaves the VM as it was: its recorded sizes go back.
    task = _vm_task(vm, "vm-settings", apply_settings, f"Apply settings of {vm.name}",
                    not_started=lambda: old.apply(vm))
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

    size_gb = IntegerField("Size (GB)", validators=[Optional(), NumberRange(1, vms_mod.MAX_DISK_GB)])
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
            nets = networks.from_form(request.form)
            placement = vms_mod.place(form.memory_mb.data, sum(s for s, _ in disks) or 1, disk_id=disk_id,
                                      eligible=networks.carries_all(nets))
            vm = vms_mod.record_new_blank_vm(
                owner=current_user._get_current_object(), name=form.name.data, iso=db.session.get(IsoImage, form.iso.data),
                memory_mb=form.memory_mb.data, vcpus=form.vcpus.data, placement=placement, disks=disks,
                usb_tablet=form.usb_tablet.data, mac=form.mac.data or None)
            networks.attach(vm, nets)
            _protect_new(vm)
        except (vms_mod.VMError, quotas.QuotaExceeded, macs.MacError, livesync.LiveSyncError,
                networks.NetworkError) as exc:
            db.session.rollback()
            flash(str(exc), "error")
        else:
            task = _vm_task(vm, "vm-create", create_vm, f"Create blank VM {vm.name}")
            if task is None:  # the queue did not answer: the VM is partially created, its page says so
                return redirect(url_for("vms.detail", vm_id=vm.id))
            return redirect(url_for("tasks.detail", task_id=task.id))
    status = 400 if form.is_submitted() else 200
    return render_template("vms/new_blank.html", form=form, quota=quotas.lines(current_user)), status


@bp.post("/<int:vm_id>/copy-back")
@login_required
def copy_back(vm_id: int):
    from ..jobs.library import copy_back as copy_back_job

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_manage(current_user):
        abort(403)
    name = (request.form.get("name") or "").strip()
    problem = None
    if vm.state != VMState.OFF.value:
        problem = f"Power {vm.name} off first (it is {vm.state_enum.label})."
    else:
        try:
            name = library.check_new_name(name)
        except library.LibraryError as exc:
            problem = str(exc)
    if problem:
        flash(problem, "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    task = _vm_task(vm, "vm-copy-back", copy_back_job, f"Copy {vm.name} back as appliance {name}", name,
                    current_user.id)
    return redirect(url_for("tasks.detail", task_id=task.id) if task else url_for("vms.detail", vm_id=vm.id))

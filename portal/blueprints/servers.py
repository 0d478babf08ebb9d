"""VM Servers area (managers): list, add over SSH, disks, mark down/up, delete."""

from __future__ import annotations

import json

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy import func
from wtforms import BooleanField, FieldList, FormField, IntegerField, PasswordField, SelectChoice, SelectField, StringField
from wtforms.validators import DataRequired, Length, NumberRange, Optional

from .. import moves, permissions, secrets_relay, servers as servers_mod, tasks
from ..extensions import db
from ..models import VM, CheckResult, Server, ServerDisk, Task, TaskState
from ..permissions import manager_required
from ..views_common import launch, page_or_partial, paginate

bp = Blueprint("servers", __name__, url_prefix="/servers")


class AddServerForm(FlaskForm):
    hostname = StringField("Host name", validators=[DataRequired(), Length(max=253)])
    address = StringField("Address (IP or DNS name; empty: the host name)", validators=[Optional(), Length(max=253)])
    port = IntegerField("SSH port", default=22, validators=[NumberRange(1, 65535)])
    password = PasswordField("Root password (used once to install Corral's SSH key, never stored)",
                             validators=[DataRequired(), Length(max=512)])


class DiskForm(FlaskForm):
    class Meta:
        csrf = False

    mountpoint = StringField("Mountpoint", validators=[Optional(), Length(max=255)])
    size_gb = IntegerField("Size (GB; empty: as detected)", validators=[Optional(), NumberRange(1, 1024 * 1024)])


class ReviewForm(FlaskForm):
    cpus = IntegerField("CPUs (sockets)", validators=[NumberRange(1, 1024)])
    cores_per_cpu = IntegerField("Cores per CPU", validators=[NumberRange(1, 1024)])
    hyperthreading = BooleanField("Hyperthreading")
    memory_mb = IntegerField("Memory (MB)", validators=[NumberRange(1, 1 << 30)])
    nics = IntegerField("NICs", validators=[NumberRange(0, 64)])
    mhz = IntegerField("MHz", validators=[NumberRange(0, 100000)])
    domain_type = SelectField("Guests run as", choices=[SelectChoice("kvm", "KVM"), SelectChoice("qemu", "QEMU (TCG)")])
    disks = FieldList(FormField(DiskForm), min_entries=servers_mod.MAX_DISKS, max_entries=servers_mod.MAX_DISKS)


class AddDiskForm(FlaskForm):
    mountpoint = StringField("Mountpoint", validators=[DataRequired(), Length(max=255)])
    size_gb = IntegerField("Size (GB; empty: as detected)", validators=[Optional(), NumberRange(1, 1024 * 1024)])


def _server_rows(servers: list[Server]) -> list[dict]:
    """Per-server VM counts and disk totals in two grouped queries (no N+1)."""
    ids = [s.id for s in servers]
    vm_counts = dict(db.session.execute(
        db.select(VM.server_id, func.count()).where(VM.server_id.in_(ids)).group_by(VM.server_id)
    ).all()) if ids else {}
    disks = {sid: (size, free) for sid, size, free in db.session.execute(
        db.select(ServerDisk.server_id, func.sum(ServerDisk.size_gb), func.sum(ServerDisk.free_gb))
        .where(ServerDisk.server_id.in_(ids)).group_by(ServerDisk.server_id)
    ).all()} if ids else {}
    rows = []
    for s in servers:
        size, free = disks.get(s.id, (0, None))
        rows.append({"server": s, "vm_count": vm_counts.get(s.id, 0), "disk_gb": size or 0, "disk_free_gb": free})
    return rows


@bp.route("/")
@login_required
@manager_required
def index():
    page = paginate(db.select(Server).order_by(Server.hostname))
    return page_or_partial("servers/index.html", "servers/_list.html", page=page, rows=_server_rows(page.items))


@bp.route("/<int:server_id>")
@login_required
@manager_required
def detail(server_id: int):
    server = db.get_or_404(Server, server_id)
    return page_or_partial("servers/detail.html", "servers/_detail.html", server=server,
                           vms=servers_mod.vms_on(server), row=_server_rows([server])[0], disk_form=AddDiskForm(),
                           partners={d.id: moves.shared_partners(d) for d in server.disks})


def _submit(kind, func, *, title, target=None, key="default", args=()):
    sub = tasks.submit(kind, func, title=title, requester_id=current_user.id, target=target, key=key, args=args)
    return launch(sub, busy="That is already under way; here it is.")


@bp.route("/add", methods=["GET", "POST"])
@login_required
@manager_required
def add():
    from ..jobs.servers import probe_new_server

    form = AddServerForm()
    if form.validate_on_submit():
        try:
            hostname = servers_mod.check_hostname(form.hostname.data)
            address = servers_mod.check_address(form.address.data or hostname)
        except servers_mod.ServerError as exc:
            form.hostname.errors.append(str(exc))
        else:
            task = _submit("server-probe", probe_new_server, title=f"Add server {hostname}",
                           key=f"server-probe:{hostname}", args=(hostname, address, form.port.data, "ssh"))
            if task is not None:
                secrets_relay.put(f"task-{task.id}", form.password.data)
                return redirect(url_for("servers.review", task_id=task.id))
    status = 400 if form.is_submitted() else 200
    return render_template("servers/add.html", form=form), status


def _probe_task(task_id: int) -> Task:
    task = permissions.get_task_or_404(task_id)
    if task.kind != "server-probe":
        abort(404)
    return task


@bp.route("/add/<int:task_id>", methods=["GET", "POST"])
@login_required
@manager_required
def review(task_id: int):
    """Follow the first contact; then review the detected facts and declare disks."""
    from ..jobs.servers import register_server

    task = _probe_task(task_id)
    found = json.loads(task.result) if task.state == TaskState.SUCCEEDED.value and task.result else None
    form = ReviewForm()
    if found and not form.is_submitted():
        f = found["facts"]
        for name in ("cpus", "cores_per_cpu", "hyperthreading", "memory_mb", "nics", "mhz"):
            getattr(form, name).data = f[name]
        form.domain_type.data = found["domain_type"]
        form.disks[0].mountpoint.data = "/var/lib/corral/disk1"
    if found and form.validate_on_submit():
        disks = [servers_mod.DiskSpec(d.mountpoint.data.strip(), d.size_gb.data)
                 for d in form.disks if d.mountpoint.data and d.mountpoint.data.strip()]
        try:
            servers_mod.check_disks(disks)
            servers_mod.check_hostname(found["hostname"])
        except servers_mod.ServerError as exc:
            flash(str(exc), "error")
        else:
            facts = dict(found["facts"], **{n: getattr(form, n).data for n in
                                            ("cpus", "cores_per_cpu", "hyperthreading", "memory_mb", "nics", "mhz")})
            payload = json.dumps({**found, "facts": facts, "domain_type": form.domain_type.data,
                                  "disks": [{"mountpoint": d.mountpoint, "size_gb": d.size_gb} for d in disks]})
            reg = _submit("server-register", register_server, title=f"Register server {found['hostname']}",
                          key=f"server-register:{found['hostname']}", args=(payload,))
            if reg is not None:
                return redirect(url_for("tasks.detail", task_id=reg.id))
    status = 400 if form.is_submitted() else 200
    return render_template("servers/review.html", task=task, found=found, form=form), status


@bp.post("/<int:server_id>/disks")
@login_required
@manager_required
def add_disk(server_id: int):
    from ..jobs.servers import add_server_disk

    server = db.get_or_404(Server, server_id)
    form = AddDiskForm()
    if form.validate_on_submit():
        try:
            (spec,) = servers_mod.check_disks([servers_mod.DiskSpec(form.mountpoint.data.strip(), form.size_gb.data)])
            if len(server.disks) >= servers_mod.MAX_DISKS:
                raise servers_mod.ServerError(f"{server.hostname} has {servers_mod.MAX_DISKS} VM disks already.")
        except servers_mod.ServerError as exc:
            flash(str(exc), "error")
        else:
            task = _submit("server-disk-add", add_server_disk, title=f"Add VM disk {spec.mountpoint} to {server.hostname}",
                           target=server, key=f"server-disk-add:{server.id}:{spec.mountpoint}",
                           args=(server.id, spec.mountpoint, spec.size_gb))
            if task is not None:
                return redirect(url_for("tasks.detail", task_id=task.id))
    else:
        flash("; ".join(e for errs in form.errors.values() for e in errs), "error")
    return redirect(url_for("servers.detail", server_id=server.id))


def _change(server_id: int, change, message: str):
    server = db.get_or_404(Server, server_id)
    try:
        change(server)
    except servers_mod.ServerError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("servers.detail", server_id=server_id))
    db.session.commit()
    flash(message.format(name=server.hostname), "success")
    return None


@bp.post("/<int:server_id>/mark-down")
@login_required
@manager_required
def mark_down(server_id: int):
    return _change(server_id, servers_mod.mark_down, "{name} is marked down: Corral stops polling it.") or \
        redirect(url_for("servers.detail", server_id=server_id))


@bp.post("/<int:server_id>/mark-up")
@login_required
@manager_required
def mark_up(server_id: int):
    return _change(server_id, servers_mod.mark_up, "{name} is marked up: polling resumes.") or \
        redirect(url_for("servers.detail", server_id=server_id))


@bp.post("/<int:server_id>/delete")
@login_required
@manager_required
def delete(server_id: int):
    return _change(server_id, servers_mod.delete, "The definition of {name} was deleted.") or \
        redirect(url_for("servers.index"))


@bp.post("/<int:server_id>/disks/<int:disk_id>/shared")
@login_required
@manager_required
def declare_shared(server_id: int, disk_id: int):
    """Claim a VM disk is the same storage as another server's: a task verifies it, then records it."""
    from ..jobs.moves import verify_shared_disk

    disk = db.get_or_404(ServerDisk, disk_id)
    other = db.session.get(ServerDisk, request.form.get("other_disk_id", type=int) or 0)
    try:
        if disk.server_id != server_id:
            abort(404)
        moves.check_shared_claim(disk, other)
    except moves.MoveError as exc:
        flash(str(exc), "error")
        return redirect(url_for("servers.detail", server_id=server_id))
    return _to_task(_submit("disk-share", verify_shared_disk, target=disk.server, key=f"disk-share:{disk.id}",
                            title=f"Verify {disk.mountpoint} shared by {disk.server.hostname} and "
                                  f"{other.server.hostname}", args=(disk.id, other.id, current_user.id)), server_id)


def _to_task(task, server_id: int):
    return redirect(url_for("tasks.detail", task_id=task.id) if task else url_for("servers.detail",
                                                                                  server_id=server_id))


@bp.post("/<int:server_id>/evacuate")
@login_required
@manager_required
def evacuate(server_id: int):
    """Migrate every running VM off the server, then mark it down (one task; a report at the end)."""
    from ..jobs.moves import evacuate_server

    server = db.get_or_404(Server, server_id)
    return _to_task(_submit("server-evacuate", evacuate_server, target=server, title=f"Evacuate {server.hostname}",
                            args=(server.id, moves.default_options(), current_user.id)), server_id)


@bp.route("/<int:server_id>/graphs")
@login_required
@manager_required
def graphs(server_id: int):
    from .. import graphs as graphs_mod

    server = db.get_or_404(Server, server_id)
    range_key = request.args.get("range", "1h")
    if range_key not in graphs_mod.RANGES:
        range_key = "1h"
    memory_svg, disk_svg = graphs_mod.server_graphs(server.id, range_key)
    return render_template("servers/graphs.html", server=server, range_key=range_key, memory_svg=memory_svg,
                           disk_svg=disk_svg, ranges=[(k, v[0]) for k, v in graphs_mod.RANGES.items()])


@bp.route("/<int:server_id>/_health")
@login_required
@manager_required
def health(server_id: int):
    server = db.get_or_404(Server, server_id)
    results = db.session.execute(
        db.select(CheckResult).where(CheckResult.server_id == server.id).order_by(CheckResult.check)
    ).scalars().all()
    return render_template("servers/_health.html", server=server, results=results)


@bp.route("/<int:server_id>/_domains")
@login_required
@manager_required
def domains(server_id: int):
    server = db.get_or_404(Server, server_id)
    return render_template("servers/_domains.html", server=server, vms=servers_mod.vms_on(server))

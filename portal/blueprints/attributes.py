"""Attributes for lights-out installs: managers set global, appliance and OS-type attributes; a VM's own
attributes are set on its page by managers and its owner when a power user (a regular owner reads them)."""

from __future__ import annotations

from flask import Blueprint, abort, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import attributes, permissions
from ..extensions import db
from ..models import VM, Appliance
from ..views_common import apply_change

bp = Blueprint("attributes", __name__, url_prefix="/attributes")

ERRORS = (attributes.AttributeError_,)


@bp.app_template_global("vm_attributes")
def vm_attributes(vm: VM) -> list[attributes.Resolved]:
    """The VM's resolved attributes for its page (which only managers and the owner see)."""
    return attributes.resolve(vm)


def _scope_from_form() -> attributes.Scope:
    """The manager scope a form names: global, appliance (id) or os (name)."""
    scope, target = request.form.get("scope", ""), request.form.get("target", "")
    if scope == "global":
        return attributes.GLOBAL
    if scope == "appliance":
        if not target.isdigit():
            abort(404)
        return attributes.for_appliance(db.get_or_404(Appliance, int(target)))
    if scope == "os":
        return attributes.for_os(target)
    abort(400)


def _back(scope: attributes.Scope):
    if scope.scope == "appliance":
        return redirect(url_for("attributes.appliance", appliance_id=scope.appliance.id))
    if scope.scope == "os":
        return redirect(url_for("attributes.os_type", os_type=scope.os_type))
    return redirect(url_for("attributes.index"))


@bp.route("/")
@login_required
@permissions.manager_required
def index():
    appliances = db.session.execute(db.select(Appliance).order_by(Appliance.name)).scalars().all()
    return render_template("attributes/index.html", attrs=attributes.listed(attributes.GLOBAL),
                           appliances=appliances, os_types=attributes.os_types())


@bp.route("/appliances/<int:appliance_id>")
@login_required
@permissions.manager_required
def appliance(appliance_id: int):
    row = db.get_or_404(Appliance, appliance_id)
    return render_template("attributes/appliance.html", appliance=row,
                           attrs=attributes.listed(attributes.for_appliance(row)))


@bp.post("/appliances/<int:appliance_id>/settings")
@login_required
@permissions.manager_required
def appliance_settings(appliance_id: int):
    row = db.get_or_404(Appliance, appliance_id)

    def change() -> str:
        attributes.set_appliance_os(row, os_type=request.form.get("os_type", ""),
                                    cloud_init=bool(request.form.get("cloud_init")))
        return (f"{row.name}: OS type {row.os_type or 'none'}; its VMs "
                f"{'get a cloud-init seed CD-ROM at create and every power on' if row.cloud_init else 'get no seed'}.")

    apply_change(change, ERRORS)
    return redirect(url_for("attributes.appliance", appliance_id=row.id))


@bp.route("/os/<os_type>")
@login_required
@permissions.manager_required
def os_type(os_type: str):
    try:
        scope = attributes.for_os(os_type)
    except attributes.AttributeError_:
        abort(404)
    appliances = db.session.execute(db.select(Appliance).where(Appliance.os_type == os_type)
                                    .order_by(Appliance.name)).scalars().all()
    return render_template("attributes/os.html", os_type=os_type, attrs=attributes.listed(scope),
                           appliances=appliances)


def _in_form_scope(act):
    """Run *act(scope)* for the scope the form names (a bad OS type is refused like a bad key), then go back."""
    seen: list[attributes.Scope] = []

    def change() -> str:
        seen.append(_scope_from_form())
        return act(seen[0])

    apply_change(change, ERRORS)
    return _back(seen[0] if seen else attributes.GLOBAL)


@bp.post("/set")
@login_required
@permissions.manager_required
def set_attr():
    def act(scope: attributes.Scope) -> str:
        attr = attributes.set_attr(scope, request.form.get("key", ""), request.form.get("value", ""))
        return f"{attr.key} set at {scope.label}."

    return _in_form_scope(act)


@bp.post("/unset")
@login_required
@permissions.manager_required
def unset_attr():
    def act(scope: attributes.Scope) -> str:
        key = request.form.get("key", "")
        attributes.unset(scope, key)
        return f"{key} removed from {scope.label}."

    return _in_form_scope(act)


def _vm_for_change(vm_id: int) -> VM:
    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_change_settings(current_user, vm):
        abort(403)
    return vm


@bp.post("/vm/<int:vm_id>")
@login_required
def vm_set(vm_id: int):
    vm = _vm_for_change(vm_id)
    key = request.form.get("key", "")

    def change() -> str:
        attr = attributes.set_attr(attributes.for_vm(vm), key, request.form.get("value", ""))
        return (f"{attr.key} set on {vm.name}"
                + ("; the guest reads it at its next power on." if attributes.wants_seed(vm) else "."))

    apply_change(change, ERRORS)
    return redirect(url_for("vms.detail", vm_id=vm.id))


@bp.post("/vm/<int:vm_id>/unset")
@login_required
def vm_unset(vm_id: int):
    vm = _vm_for_change(vm_id)
    key = request.form.get("key", "")

    def change() -> str:
        attributes.unset(attributes.for_vm(vm), key)
        return f"{key} removed from {vm.name}."

    apply_change(change, ERRORS)
    return redirect(url_for("vms.detail", vm_id=vm.id))

"""License key pool (managers): paste keys per appliance, see which VM holds each, remove free ones."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import actionlog, license_keys, permissions
from ..extensions import db
from ..models import VM, Appliance, LicenseKey
from ..views_common import apply_change

bp = Blueprint("license_keys", __name__, url_prefix="/license-keys")


@bp.app_template_global("license_key")
def license_key(vm: VM) -> str | None:
    """The VM's key for its page: managers and the owner only."""
    return license_keys.key_for(vm, current_user)


@bp.route("/")
@login_required
@permissions.manager_required
def index():
    appliances = db.session.execute(db.select(Appliance).order_by(Appliance.name)).scalars().all()
    return render_template("license_keys/index.html", appliances=appliances,
                           pools={a.id: license_keys.pool(a) for a in appliances})


@bp.post("/<int:appliance_id>")
@login_required
@permissions.manager_required
def add(appliance_id: int):
    appliance = db.get_or_404(Appliance, appliance_id)

    def change() -> str:
        n = license_keys.add_keys(appliance, request.form.get("keys", ""))
        actionlog.record("license-keys-added", target=appliance, detail=f"{n} new key(s)")
        return f"{n} new key(s) for {appliance.name}; its VMs now need one."

    apply_change(change, (license_keys.LicenseKeyError,))
    return redirect(url_for("license_keys.index"))


@bp.post("/<int:appliance_id>/not-required")
@login_required
@permissions.manager_required
def not_required(appliance_id: int):
    appliance = db.get_or_404(Appliance, appliance_id)

    def change() -> str:
        appliance.license_required = False
        actionlog.record("license-keys-not-required", target=appliance)
        return f"New VMs from {appliance.name} no longer take a key."

    apply_change(change, ())
    return redirect(url_for("license_keys.index"))


@bp.post("/key/<int:key_id>/delete")
@login_required
@permissions.manager_required
def delete(key_id: int):
    key = db.get_or_404(LicenseKey, key_id)

    def change() -> str:
        license_keys.delete_free(key)
        return "Key removed from the pool."

    apply_change(change, (license_keys.LicenseKeyError,))
    return redirect(url_for("license_keys.index"))

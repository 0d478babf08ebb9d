"""The service catalog: everyone browses, managers publish, those allowed order (the create form)."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import actionlog, offerings, permissions, pricing
from ..extensions import db
from ..models import Appliance, ApplianceState, Offering

bp = Blueprint("offerings", __name__, url_prefix="/catalog")


@bp.route("/")
@login_required
def index():
    manager = permissions.is_manager(current_user)
    return render_template("offerings/index.html", offerings=offerings.catalog(published_only=not manager),
                           may_order=lambda o: offerings.may_order(current_user, o), plans=offerings.BACKUP_PLANS,
                           disk_gb=offerings.disk_gb, price=pricing.price_text, managers=permissions.managers(),
                           currency=current_app.config["METERING_CURRENCY"],
                           can_create=permissions.can_create_vm(current_user))


def _form(offering: Offering | None):
    f = request.form
    if request.method == "POST":
        try:
            saved = offerings.save(
                offering, name=f.get("name", ""), description=f.get("description", ""),
                appliance_id=f.get("appliance_id", type=int), memory_mb=f.get("memory_mb", type=int),
                vcpus=f.get("vcpus", type=int), backup=f.get("backup", ""), monthly_price=f.get("monthly_price", ""),
                roles=f.getlist("roles"), usernames=f.get("users", ""), published=bool(f.get("published")))
        except offerings.OfferingError as exc:
            db.session.rollback()
            flash(str(exc), "error")
        else:
            actionlog.record("offering-saved", target=saved)
            db.session.commit()
            flash(f"Offering {saved.name} saved.", "ok")
            return redirect(url_for("offerings.index"))
    appliances = db.session.execute(db.select(Appliance).where(Appliance.state == ApplianceState.READY.value)
                                    .order_by(Appliance.name)).scalars().all()
    status = 400 if request.method == "POST" else 200
    return render_template("offerings/form.html", offering=offering, appliances=appliances, form=f,
                           plans=offerings.BACKUP_PLANS, price=pricing.price_text,
                           currency=current_app.config["METERING_CURRENCY"]), status


@bp.route("/new", methods=["GET", "POST"])
@login_required
@permissions.manager_required
def new():
    return _form(None)


@bp.route("/<int:offering_id>/edit", methods=["GET", "POST"])
@login_required
@permissions.manager_required
def edit(offering_id: int):
    return _form(db.get_or_404(Offering, offering_id))


@bp.post("/<int:offering_id>/delete")
@login_required
@permissions.manager_required
def delete(offering_id: int):
    offering = db.get_or_404(Offering, offering_id)
    actionlog.record("offering-deleted", target=offering)
    db.session.delete(offering)
    db.session.commit()
    flash(f"Offering {offering.name} removed from the catalog (VMs ordered from it stay).", "ok")
    return redirect(url_for("offerings.index"))

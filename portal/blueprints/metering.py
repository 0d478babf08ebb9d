"""Usage and charges: reports per user and period (page with chart, CSV, printable invoice); price sheets."""

from __future__ import annotations

import csv
import io

from flask import Blueprint, Response, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import actionlog, metering, permissions, pricing
from ..extensions import db
from ..models import Appliance, PriceSheet, User

bp = Blueprint("metering", __name__, url_prefix="/usage")


def _report() -> tuple[pricing.Report, str]:
    """The report the query asks for: everyone sees their own; managers anyone's (or everyone's)."""
    owner: User | None = current_user
    if permissions.is_manager(current_user):
        wanted = request.args.get("user", type=int)
        owner = db.session.get(User, wanted) if wanted else None
        if wanted and owner is None:
            abort(404)
    try:
        start, end, label = pricing.period(request.args.get("month"), request.args.get("from"),
                                           request.args.get("to"), metering.now().date())
    except pricing.PricingError as exc:
        flash(str(exc), "error")
        start, end, label = pricing.period(None, None, None, metering.now().date())
    return pricing.report(start, end, owner), label


def _context(rep: pricing.Report, label: str) -> dict:
    currency = current_app.config["METERING_CURRENCY"]
    users = []
    if permissions.is_manager(current_user):
        users = db.session.execute(db.select(User).order_by(User.username)).scalars().all()
    return {"rep": rep, "label": label, "currency": currency, "units": pricing.UNITS, "money": pricing.money,
            "users": users, "args": request.args}


@bp.route("/")
@login_required
def report():
    rep, label = _report()
    return render_template("metering/report.html", chart=pricing.svg_chart(rep.daily_cents,
                                                                         current_app.config["METERING_CURRENCY"]),
                           **_context(rep, label))


@bp.route("/report.csv")
@login_required
def report_csv():
    rep, label = _report()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["owner", "vm", "vm_id", "price_sheet", "first_hour", "last_hour",
                     *[f"{UNIT[2].lower()}_{UNIT[3].replace('-', '_')}" for UNIT in pricing.UNITS.values()],
                     f"amount_{current_app.config['METERING_CURRENCY'].lower()}"])
    for ln in rep.lines:
        writer.writerow([ln.owner_name, ln.vm_name, ln.vm_id, ln.sheet.name if ln.sheet else "",
                         f"{ln.first_hour:%Y-%m-%d %H:%M}", f"{ln.last_hour:%Y-%m-%d %H:%M}",
                         *[ln.quantity(col) for col in pricing.UNITS], pricing.money(ln.cents).replace(",", "")])
    writer.writerow(["total", "", "", "", "", "", *[""] * len(pricing.UNITS), pricing.money(rep.total_cents).replace(",", "")])
    who = rep.owner.username if rep.owner else "everyone"
    return Response(out.getvalue(), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="usage-{who}-{rep.start:%Y%m%d}-{rep.end:%Y%m%d}.csv"'})


@bp.route("/invoice")
@login_required
def invoice():
    rep, label = _report()
    return render_template("metering/invoice.html", **_context(rep, label))


@bp.route("/prices")
@login_required
@permissions.manager_required
def prices():
    appliances = db.session.execute(db.select(Appliance).order_by(Appliance.name)).scalars().all()
    return render_template("metering/prices.html", sheets=pricing.sheets(), units=pricing.UNITS,
                           price_text=pricing.price_text, appliances=appliances,
                           currency=current_app.config["METERING_CURRENCY"], form=request.form)


@bp.route("/prices", methods=["POST"])
@login_required
@permissions.manager_required
def add_price():
    f = request.form
    appliance_id = f.get("appliance_id", type=int) or None
    try:
        sheet = pricing.add_sheet(f.get("name", ""), f.get("effective_from", ""), appliance_id,
                                  {col: f.get(col, "") for col in pricing.UNITS}, current_user)
    except pricing.PricingError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return prices(), 400
    actionlog.record("price-sheet-add", user_id=current_user.id,
                     detail=f"{sheet.name} from {sheet.effective_from:%Y-%m-%d}")
    db.session.commit()
    flash(f"Price sheet {sheet.name} is in force from {sheet.effective_from:%Y-%m-%d}.", "ok")
    return redirect(url_for("metering.prices"))


@bp.route("/prices/<int:sheet_id>/delete", methods=["POST"])
@login_required
@permissions.manager_required
def delete_price(sheet_id: int):
    sheet = db.get_or_404(PriceSheet, sheet_id)
    name = sheet.name
    db.session.delete(sheet)
    actionlog.record("price-sheet-delete", user_id=current_user.id, detail=name)
    db.session.commit()
    flash(f"Price sheet {name} deleted; reports price its hours by the sheet in force before it.", "ok")
    return redirect(url_for("metering.prices"))

"""API v1 resources of metering, the service catalog and rebalancing (the same domain code as their pages)."""

from __future__ import annotations

from flask import current_app
from flask_login import current_user
from marshmallow import Schema, fields, validate

from .. import metering, offerings, permissions, pricing, rebalance
from ..extensions import db
from ..models import User
from .core import ApiError, operation
from .schemas import Id, UserRef

# --- schemas -------------------------------------------------------------------------------


class UsageQuery(Schema):
    user = Id(load_default=None, metadata={"description": "A manager may ask for anyone; omitted: a manager gets "
                                                          "everyone, others themselves."})
    month = fields.Str(load_default=None, validate=validate.Regexp(r"^\d{4}-\d{2}$"),
                       metadata={"description": "YYYY-MM (default: this month)"})
    since = fields.Date(load_default=None, data_key="from", metadata={"description": "first day (instead of month)"})
    until = fields.Date(load_default=None, data_key="to", metadata={"description": "last day, inclusive"})


class UsageLine(Schema):
    owner = fields.Nested(UserRef, required=True, metadata={"description": "who owned the VM in those hours"})
    vm_id = fields.Int(required=True)
    vm_name = fields.Str(required=True)
    price_sheet = fields.Str(allow_none=True, required=True)
    first_hour = fields.DateTime(required=True)
    last_hour = fields.DateTime(required=True)
    usage = fields.Dict(keys=fields.Str(), values=fields.Str(), required=True,
                        metadata={"description": "unit -> quantity (decimal string): vcpu_hours, memory_gib_hours, "
                                                 "disk_gib_hours, running_hours, defined_hours, livesync_hours, "
                                                 "backup_gib_hours"})
    amount = fields.Str(required=True, metadata={"description": "decimal string, rounded to the cent"})
    amount_cents = fields.Int(required=True)


class UsageDay(Schema):
    date = fields.Date(required=True)
    amount_cents = fields.Int(required=True)


class UsageReport(Schema):
    start = fields.DateTime(required=True)
    end = fields.DateTime(required=True, metadata={"description": "exclusive"})
    label = fields.Str(required=True)
    owner = fields.Nested(UserRef, allow_none=True, required=True, metadata={"description": "null: everyone"})
    currency = fields.Str(required=True)
    lines = fields.List(fields.Nested(UsageLine), required=True)
    daily = fields.List(fields.Nested(UsageDay), required=True)
    total = fields.Str(required=True)
    total_cents = fields.Int(required=True)


class Offering(Schema):
    id = fields.Int(required=True)
    name = fields.Str(required=True)
    description = fields.Str(allow_none=True, required=True)
    appliance = fields.Nested(Schema.from_dict({"id": fields.Int(required=True), "name": fields.Str(required=True)},
                                               name="OfferingAppliance"), required=True)
    memory_mb = fields.Int(required=True)
    vcpus = fields.Int(required=True)
    disk_gb = fields.Int(required=True)
    backup = fields.Str(required=True)
    monthly_price = fields.Str(required=True)
    published = fields.Bool(required=True)
    may_order = fields.Bool(required=True)


OfferingList = Schema.from_dict({"items": fields.List(fields.Nested(Offering), required=True)}, name="OfferingList")


class RebalanceMove(Schema):
    vm_id = fields.Int(required=True)
    vm_name = fields.Str(required=True)
    source = fields.Str(required=True)
    target = fields.Str(required=True)


class ServerLoad(Schema):
    server = fields.Str(required=True)
    cpu_before = fields.Float(required=True)
    cpu_after = fields.Float(required=True)
    memory_before = fields.Float(required=True)
    memory_after = fields.Float(required=True)


class RebalanceProposal(Schema):
    cpu_threshold = fields.Float(required=True)
    memory_threshold = fields.Float(required=True)
    moves = fields.List(fields.Nested(RebalanceMove), required=True)
    servers = fields.List(fields.Nested(ServerLoad), required=True)
    still_over = fields.List(fields.Str(), required=True)


# --- resources -------------------------------------------------------------------------------

UNIT_KEYS = {"vcpu_hour": "vcpu_hours", "memory_gb_hour": "memory_gib_hours", "disk_gb_hour": "disk_gib_hours",
             "running_hour": "running_hours", "defined_hour": "defined_hours", "livesync_hour": "livesync_hours",
             "backup_gb_hour": "backup_gib_hours"}


@operation("GET", "/usage", summary="Usage and charges per VM for a month or a date range (yours; a manager's: "
           "anyone's)", tag="usage", query=UsageQuery, response=UsageReport)
def usage_report(query):
    owner: User | None = current_user
    if query["user"] is not None and query["user"] != current_user.id:
        owner = db.session.get(User, query["user"]) if permissions.is_manager(current_user) else None
        if owner is None:
            raise ApiError(404, "not_found", "No such user (or not yours to see).")
    elif query["user"] is None and permissions.is_manager(current_user):
        owner = None
    try:
        start, end, label = pricing.period(query["month"], query["since"] and query["since"].isoformat(),
                                           query["until"] and query["until"].isoformat(), metering.now().date())
    except pricing.PricingError as exc:
        raise ApiError(422, "invalid", str(exc), {"month": [str(exc)]}) from None
    rep = pricing.report(start, end, owner)
    lines = [{"owner": {"id": ln.owner_id, "username": ln.owner_name}, "vm_id": ln.vm_id, "vm_name": ln.vm_name,
              "price_sheet": ln.sheet.name if ln.sheet else None, "first_hour": ln.first_hour,
              "last_hour": ln.last_hour, "usage": {UNIT_KEYS[col]: str(ln.quantity(col)) for col in pricing.UNITS},
              "amount": pricing.money(ln.cents).replace(",", ""), "amount_cents": ln.cents} for ln in rep.lines]
    return {"start": rep.start, "end": rep.end, "label": label,
            "owner": {"id": owner.id, "username": owner.username} if owner else None,
            "currency": current_app.config["METERING_CURRENCY"], "lines": lines,
            "daily": [{"date": d, "amount_cents": c} for d, c in rep.daily_cents],
            "total": pricing.money(rep.total_cents).replace(",", ""), "total_cents": rep.total_cents}


@operation("GET", "/offerings", summary="The service catalog (managers also see unpublished offerings)",
           tag="catalog", response=OfferingList)
def list_offerings():
    manager = permissions.is_manager(current_user)
    return {"items": [{"id": o.id, "name": o.name, "description": o.description,
                       "appliance": {"id": o.appliance.id, "name": o.appliance.name}, "memory_mb": o.memory_mb,
                       "vcpus": o.vcpus, "disk_gb": offerings.disk_gb(o), "backup": o.backup,
                       "monthly_price": pricing.price_text(o.monthly_price), "published": o.published,
                       "may_order": offerings.may_order(current_user, o)}
                      for o in offerings.catalog(published_only=not manager)]}


@operation("GET", "/rebalance", summary="The rebalancing proposal with before/after load per server (managers)",
           tag="rebalance", response=RebalanceProposal)
def rebalance_proposal():
    if not permissions.is_manager(current_user):
        raise ApiError(403, "forbidden", "You are not allowed to do that.")
    proposal, servers = rebalance.propose()
    t = rebalance.thresholds()
    return {"cpu_threshold": t.cpu, "memory_threshold": t.mem,
            "moves": [{"vm_id": m.vm_id, "vm_name": m.vm_name, "source": servers[m.source_id].hostname,
                       "target": servers[m.target_id].hostname} for m in proposal.moves],
            "servers": [{"server": servers[sid].hostname, "cpu_before": b[0], "cpu_after": proposal.after[sid][0],
                         "memory_before": b[1], "memory_after": proposal.after[sid][1]}
                        for sid, b in sorted(proposal.before.items())],
            "still_over": [servers[sid].hostname for sid in proposal.still_over]}

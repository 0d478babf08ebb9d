"""The service catalog: offerings managers publish and the rules for ordering one.

Ordering is creating a VM through the one create path (the create form and
:func:`portal.vms.record_new_vm`), preselected and bounded by the offering:
:func:`check_order` is asked before the VM is recorded, :func:`after_order`
adds what the offering promises beyond the VM (its backup schedule).
Functions flush; the edge commits.
"""

from __future__ import annotations

from . import backups, permissions, pricing
from .extensions import db
from .models import Appliance, ApplianceState, Offering, Role, User

BACKUP_PLANS = {"none": "No backups", "daily": "Daily backup at 02:00 UTC, keep 7",
                "weekly": "Weekly backup, Sundays 02:00 UTC, keep 4",
                "livesync": "LiveSync: a synchronous copy on a backup server",
                "livesync_failover": "LiveSync with automatic failover"}
# Plans that are a LiveSync backup mode of the VM (the orderer picks the backup server on the form).
LIVESYNC_PLANS = ("livesync", "livesync_failover")
ORDER_ROLES = (Role.POWER.value, Role.MANAGER.value)


class OfferingError(ValueError):
    """An offering that cannot be saved or ordered (the message says why)."""


def catalog(published_only: bool = True) -> list[Offering]:
    stmt = db.select(Offering).order_by(Offering.name)
    if published_only:
        stmt = stmt.where(Offering.published.is_(True))
    return list(db.session.execute(stmt).scalars())


def save(offering: Offering | None, *, name: str, description: str, appliance_id: int | None, memory_mb: int | None,
         vcpus: int | None, backup: str, monthly_price: str, roles: list[str], usernames: str,
         published: bool) -> Offering:
    """Create or change an offering (flushes); bad input raises :class:`OfferingError` and changes nothing."""
    name = (name or "").strip()
    if not name or len(name) > 64:
        raise OfferingError("Give the offering a name of at most 64 characters.")
    clash = db.session.execute(db.select(Offering.id).where(Offering.name == name)).scalar()
    if clash is not None and (offering is None or clash != offering.id):
        raise OfferingError(f"An offering called {name} exists already.")
    appliance = db.session.get(Appliance, appliance_id) if appliance_id else None
    if appliance is None or appliance.state != ApplianceState.READY.value:
        raise OfferingError("Choose a ready appliance.")
    if not memory_mb or not appliance.min_memory_mb <= memory_mb <= appliance.max_memory_mb:
        raise OfferingError(f"{appliance.name} takes between {appliance.min_memory_mb} and "
                            f"{appliance.max_memory_mb} MB of memory.")
    if not vcpus or not 1 <= vcpus <= 64:
        raise OfferingError("An offering has 1 to 64 vCPUs.")
    if backup not in BACKUP_PLANS:
        raise OfferingError("Choose a backup plan.")
    try:
        price = pricing.parse_price(monthly_price, "Monthly price")
    except pricing.PricingError as exc:
        raise OfferingError(str(exc)) from None
    roles = [r for r in roles if r in ORDER_ROLES]
    names = sorted({n.strip() for n in (usernames or "").replace(",", " ").split() if n.strip()})
    users = list(db.session.execute(db.select(User).where(User.username.in_(names))).scalars()) if names else []
    unknown = set(names) - {u.username for u in users}
    if unknown:
        raise OfferingError(f"No such user: {', '.join(sorted(unknown))}.")
    cannot = [u.username for u in users if u.role not in ORDER_ROLES]
    if cannot:
        raise OfferingError(f"Regular users do not create VMs: {', '.join(cannot)} (make them power users first).")
    if not roles and not users:
        raise OfferingError("Say who may order it: a role or some users.")
    if offering is None:
        offering = Offering()
        db.session.add(offering)
    offering.name, offering.description, offering.appliance_id = name, (description or "").strip() or None, appliance.id
    offering.memory_mb, offering.vcpus, offering.backup, offering.monthly_price = memory_mb, vcpus, backup, price
    offering.order_roles, offering.order_users, offering.published = ",".join(roles), users, published
    db.session.flush()
    return offering


def disk_gb(offering: Offering) -> int:
    from .vms import appliance_disk_sizes

    return sum(appliance_disk_sizes(offering.appliance))


def may_order(user: User, offering: Offering) -> bool:
    if not offering.published or not permissions.can_create_vm(user):
        return False
    return user.role in offering.order_roles.split(",") or any(u.id == user.id for u in offering.order_users)


def orderable(user: User) -> list[Offering]:
    return [o for o in catalog() if may_order(user, o)]


def get_orderable(user: User, offering_id: int) -> Offering:
    offering = db.session.get(Offering, offering_id)
    if offering is None or not may_order(user, offering):
        raise OfferingError("That offering does not exist or is not yours to order.")
    return offering


def check_order(user: User, offering: Offering, *, appliance_id: int, memory_mb: int, vcpus: int,
                backup_mode: str = "none") -> None:
    """A create request from an offering stays within it (the quota is checked by the create itself)."""
    if not may_order(user, offering):
        raise OfferingError(f"You may not order {offering.name}.")
    if appliance_id != offering.appliance_id:
        raise OfferingError(f"{offering.name} is made from {offering.appliance.name}.")
    if memory_mb > offering.memory_mb or vcpus > offering.vcpus:
        raise OfferingError(f"{offering.name} has at most {offering.memory_mb} MB of memory and "
                            f"{offering.vcpus} vCPU(s).")
    wanted = offering.backup if offering.backup in LIVESYNC_PLANS else "none"
    if backup_mode != wanted:
        raise OfferingError(f"{offering.name} comes with the backup mode {wanted}, not {backup_mode}.")


def backup_preset(offering: Offering | None) -> str | None:
    """The backup mode the create form preselects for an order (LiveSync plans), or None."""
    return offering.backup if offering is not None and offering.backup in LIVESYNC_PLANS else None


def after_order(vm, offering: Offering) -> None:
    """What the offering adds to the recorded VM: its backup schedule (flushes; LiveSync plans are the
    form's backup mode, recorded by the create like any other)."""
    if offering.backup == "daily":
        backups.set_schedule(vm, period="daily", hour=2, weekday=6, keep=7)
    elif offering.backup == "weekly":
        backups.set_schedule(vm, period="weekly", hour=2, weekday=6, keep=4)

"""The license key pool (GriVon): serial keys per appliance, one per VM created from it.

Managers paste keys (one per line, duplicates ignored); an appliance whose VMs need a key has
``license_required`` set. :func:`assign` takes a free key at create (refusing clearly when none is
left), the key is freed when its VM row goes (the foreign key sets it free, :func:`release` too).
"""

from __future__ import annotations

from .extensions import db
from .models import VM, Appliance, LicenseKey, Role, User

MAX_KEY = 255


class LicenseKeyError(ValueError):
    """No free key, or keys that cannot be added, with the reason."""


def add_keys(appliance: Appliance, text: str) -> int:
    """Add every non-empty line of *text* as a key of the appliance; returns how many were new."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise LicenseKeyError("Paste at least one key (one per line).")
    long = [ln for ln in lines if len(ln) > MAX_KEY]
    if long:
        raise LicenseKeyError(f"A key is at most {MAX_KEY} characters ({long[0][:20]}… is longer).")
    have = set(db.session.execute(db.select(LicenseKey.key).where(LicenseKey.appliance_id == appliance.id)).scalars())
    new = list(dict.fromkeys(ln for ln in lines if ln not in have))
    db.session.add_all(LicenseKey(appliance_id=appliance.id, key=k) for k in new)
    appliance.license_required = True
    db.session.flush()
    return len(new)


def pool(appliance: Appliance) -> list[LicenseKey]:
    return list(db.session.execute(db.select(LicenseKey).where(LicenseKey.appliance_id == appliance.id)
                                   .order_by(LicenseKey.vm_id.is_not(None), LicenseKey.id)).scalars())


def free_count(appliance: Appliance) -> int:
    return db.session.execute(db.select(db.func.count(LicenseKey.id)).where(
        LicenseKey.appliance_id == appliance.id, LicenseKey.vm_id.is_(None))).scalar_one()


def assign(vm: VM, appliance: Appliance) -> LicenseKey | None:
    """Give the new VM a free key when its appliance needs one; refuses when the pool is empty."""
    if not appliance.license_required:
        return None
    key = db.session.execute(db.select(LicenseKey).where(
        LicenseKey.appliance_id == appliance.id, LicenseKey.vm_id.is_(None)).order_by(LicenseKey.id).limit(1)
        .with_for_update()).scalar_one_or_none()
    if key is None:
        raise LicenseKeyError(f"{appliance.name} needs a license key and its pool has no free key left: "
                              "ask a manager to add keys.")
    key.vm_id = vm.id
    db.session.flush()
    return key


def release(vm: VM) -> None:
    db.session.execute(db.update(LicenseKey).where(LicenseKey.vm_id == vm.id).values(vm_id=None))


def key_for(vm: VM, user: User) -> str | None:
    """The VM's key, for managers and the VM's owner only."""
    if user.role != Role.MANAGER.value and user.id != vm.owner_id:
        return None
    return db.session.execute(db.select(LicenseKey.key).where(LicenseKey.vm_id == vm.id)).scalar_one_or_none()


def oem_strings(vm: VM) -> tuple[str, ...]:
    """``corral.license=KEY`` for the guest (SMBIOS OEM string), when the VM holds a key."""
    key = db.session.execute(db.select(LicenseKey.key).where(LicenseKey.vm_id == vm.id)).scalar_one_or_none()
    return (f"corral.license={key}",) if key else ()


def delete_free(key: LicenseKey) -> None:
    if key.vm_id is not None:
        raise LicenseKeyError("That key is held by a VM; it is freed when the VM is deleted.")
    db.session.delete(key)
    db.session.flush()

"""Attributes (Rocks' lights-out installs): key/value pairs set globally, per appliance, per OS type and per VM.

The more specific overrides, in that order: global (G) < appliance (A) < OS type
(O) < VM (H, Rocks' "host"); :func:`resolve` gives a VM's list with the source
letter of each value, like Rocks' ``list host attr``. A VM holding a key from the
license key pool gets it as the attribute ``license_key`` (H), which nobody
sets by hand. :func:`seed_for` turns a VM's resolved attributes and NICs into the
plain data ``portal.vmm.seed`` renders into a NoCloud ISO (in a job, never in a
request). Functions flush; the edge commits.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

from . import actionlog, vms
from .extensions import db
from .models import VM, Appliance, Attribute, LicenseKey, NetworkKind
from .vmm.seed import Seed, SeedNic

SCOPES = ("global", "appliance", "os", "vm")
LETTERS = {"global": "G", "appliance": "A", "os": "O", "vm": "H"}
SCOPE_LABELS = {"global": "global", "appliance": "appliance", "os": "OS type", "vm": "VM"}
KEY_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
OS_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,31}\Z")
MAX_VALUE = 4096
LICENSE_KEY = "license_key"
_BAD_CHARS = {"\u0085", "\u2028", "\u2029", "\ufeff"}


class AttributeError_(ValueError):
    """An attribute that cannot be set, with the reason for the user."""


def check_key(key: str) -> str:
    key = (key or "").strip()
    if not KEY_RE.match(key):
        raise AttributeError_("An attribute name has 1 to 64 letters, digits or underscores and does not start with "
                              f"a digit (it becomes a shell variable in the guest): {key[:70]!r} is not one.")
    if key == LICENSE_KEY:
        raise AttributeError_("license_key comes from the license key pool; it cannot be set by hand.")
    return key


def check_value(value: str) -> str:
    value = (value or "").replace("\r\n", "\n")
    if len(value) > MAX_VALUE:
        raise AttributeError_(f"An attribute value is at most {MAX_VALUE} characters ({len(value)} given).")
    for ch in value:
        if ch in "\n\t":
            continue
        if ch in _BAD_CHARS or unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn"):
            raise AttributeError_(f"An attribute value cannot hold the control character U+{ord(ch):04X}.")
    return value


def check_os_type(os_type: str) -> str:
    os_type = (os_type or "").strip()
    if not OS_RE.match(os_type):
        raise AttributeError_("An OS type is 1 to 32 lower-case letters, digits, dots, hyphens or underscores, "
                              f"starting with a letter or digit (e.g. debian12): {os_type[:40]!r} is not one.")
    return os_type


@dataclass(frozen=True)
class Scope:
    """Where an attribute lives: the scope and its object (an appliance, an OS type, a VM)."""

    scope: str
    appliance: Appliance | None = None
    os_type: str | None = None
    vm: VM | None = None

    @property
    def target(self) -> str:
        if self.scope == "appliance":
            return str(self.appliance.id)
        if self.scope == "vm":
            return str(self.vm.id)
        if self.scope == "os":
            return self.os_type
        return ""

    @property
    def label(self) -> str:
        if self.scope == "appliance":
            return f"appliance {self.appliance.name}"
        if self.scope == "vm":
            return f"VM {self.vm.name}"
        if self.scope == "os":
            return f"OS type {self.os_type}"
        return "global"

    def where(self):
        return (Attribute.scope == self.scope, Attribute.target == self.target)


GLOBAL = Scope("global")


def for_appliance(appliance: Appliance) -> Scope:
    return Scope("appliance", appliance=appliance)


def for_os(os_type: str) -> Scope:
    return Scope("os", os_type=check_os_type(os_type))


def for_vm(vm: VM) -> Scope:
    return Scope("vm", vm=vm)


def listed(scope: Scope) -> list[Attribute]:
    return list(db.session.execute(db.select(Attribute).where(*scope.where()).order_by(Attribute.key)).scalars())


def set_attr(scope: Scope, key: str, value: str) -> Attribute:
    """Set (add or change) one attribute at *scope*; flushes and logs the action (not the value: it may be secret)."""
    key, value = check_key(key), check_value(value)
    attr = db.session.execute(db.select(Attribute).where(*scope.where(), Attribute.key == key)).scalar_one_or_none()
    if attr is None:
        attr = Attribute(scope=scope.scope, target=scope.target, key=key, value=value,
                         appliance_id=scope.appliance.id if scope.appliance else None,
                         vm_id=scope.vm.id if scope.vm else None)
        db.session.add(attr)
    else:
        attr.value = value
    db.session.flush()
    actionlog.record("attribute-set", target=scope.vm or scope.appliance, detail=f"{scope.label}: {key}")
    return attr


def unset(scope: Scope, key: str) -> None:
    key = (key or "").strip()
    attr = db.session.execute(db.select(Attribute).where(*scope.where(), Attribute.key == key)).scalar_one_or_none()
    if attr is None:
        raise AttributeError_(f"No attribute {key[:70]!r} is set at {scope.label}.")
    db.session.delete(attr)
    db.session.flush()
    actionlog.record("attribute-unset", target=scope.vm or scope.appliance, detail=f"{scope.label}: {key}")


def parse_assignment(text: str) -> tuple[str, str]:
    """``key=value`` (as the CLI takes it) -> (key, value)."""
    key, sep, value = (text or "").partition("=")
    if not sep:
        raise AttributeError_("Write an attribute as key=value.")
    return check_key(key), check_value(value)


def os_types() -> list[str]:
    """The OS types appliances declare plus those with attributes, sorted."""
    declared = db.session.execute(db.select(Appliance.os_type).where(Appliance.os_type.is_not(None))).scalars()
    with_attrs = db.session.execute(db.select(Attribute.target).where(Attribute.scope == "os")).scalars()
    return sorted({*declared, *with_attrs} - {""})


def set_appliance_os(appliance: Appliance, *, os_type: str, cloud_init: bool) -> None:
    """An appliance's OS type (empty: none) and whether its guests read a cloud-init seed; flushes."""
    appliance.os_type = check_os_type(os_type) if (os_type or "").strip() else None
    appliance.cloud_init = bool(cloud_init)
    db.session.flush()
    actionlog.record("appliance-attributes-changed", target=appliance,
                     detail=f"OS type {appliance.os_type or 'none'}, cloud-init {'yes' if cloud_init else 'no'}")


@dataclass(frozen=True)
class Resolved:
    key: str
    value: str
    scope: str

    @property
    def source(self) -> str:
        return LETTERS[self.scope]


def resolve(vm: VM) -> list[Resolved]:
    """The VM's attributes, the more specific overriding (G < A < O < H), sorted by key; the pool's key as H.

    Callers show them only to those who may see the VM (managers and its owner), which keeps the license key
    to managers and the owner."""
    scopes = [GLOBAL]
    appliance = vm.appliance
    if appliance is not None:
        scopes.append(for_appliance(appliance))
        if appliance.os_type:
            scopes.append(Scope("os", os_type=appliance.os_type))
    scopes.append(for_vm(vm))
    found: dict[str, Resolved] = {}
    for scope in scopes:
        for attr in listed(scope):
            found[attr.key] = Resolved(attr.key, attr.value, scope.scope)
    key = db.session.execute(db.select(LicenseKey.key).where(LicenseKey.vm_id == vm.id)).scalar_one_or_none()
    if key is not None:
        found[LICENSE_KEY] = Resolved(LICENSE_KEY, key, "vm")
    return [found[k] for k in sorted(found)]


def wants_seed(vm: VM) -> bool:
    """VMs from an appliance that declares cloud-init support get a NoCloud seed CD-ROM."""
    return vm.appliance is not None and bool(vm.appliance.cloud_init) and vm.disk is not None


def _seed_nic(nic) -> SeedNic:
    name = f"eth{nic.position}"
    net = nic.network
    if net is None:
        return SeedNic(nic.mac, name)  # user-mode: QEMU's DHCP
    if net.cidr:
        subnet = ipaddress.ip_network(net.cidr, strict=False)
        for r in net.reservations:
            if r.mac.lower() == nic.mac.lower():
                gateway = str(subnet.network_address + 1) if net.kind == NetworkKind.NAT.value else None
                return SeedNic(nic.mac, name, address=f"{r.ip}/{subnet.prefixlen}", gateway=gateway)
    # isolated without a DHCP range has nobody to ask; bridged asks the site's DHCP, NAT libvirt's
    dhcp = not (net.kind == NetworkKind.ISOLATED.value and not net.dhcp_start)
    return SeedNic(nic.mac, name, dhcp=dhcp)


def seed_for(vm: VM) -> Seed:
    """What the VM's seed ISO holds: plain data for ``portal.vmm.seed``."""
    return Seed(instance_id=f"corral-{vms.domain_uuid(vm)}", hostname=vm.name,
                attributes=tuple((r.key, r.value) for r in resolve(vm)),
                nics=tuple(_seed_nic(n) for n in vm.nics))

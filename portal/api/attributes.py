"""API v1 attributes (lights-out installs): a VM's resolved list with sources, set and unset at each scope.

A VM's own attributes: managers and its owner when a power user (a regular owner reads them); global,
appliance and OS-type attributes: managers. The same domain code as the pages (portal/attributes.py).
"""

from __future__ import annotations

from flask_login import current_user
from marshmallow import Schema, fields, validate

from .. import attributes, permissions
from ..extensions import db
from ..models import Appliance
from .core import ApiError, operation
from .views import _forbid_unless, _manager_only, _vm

# --- schemas -------------------------------------------------------------------------------

KEY = fields.Str(required=True, validate=validate.Length(min=1, max=64),
                 metadata={"description": "letters, digits, underscores; not starting with a digit"})
SCOPE = fields.Str(required=True, validate=validate.OneOf(("global", "appliance", "os")),
                   metadata={"description": "global, appliance or os (a VM's own: /vms/{id}/attributes)"})
TARGET = fields.Str(load_default="", validate=validate.Length(max=32),
                    metadata={"description": "the appliance id or the OS type; empty for global"})


class AttributeOut(Schema):
    key = fields.Str(required=True)
    value = fields.Str(required=True)
    source = fields.Str(required=True, metadata={"description": "G global, A appliance, O OS type, H the VM"})
    scope = fields.Str(required=True)


class VMAttributes(Schema):
    vm = fields.Str(required=True)
    cloud_init = fields.Bool(required=True, metadata={"description": "the VM gets a seed CD-ROM at every power on"})
    items = fields.List(fields.Nested(AttributeOut), required=True)


class SetAttribute(Schema):
    key = KEY
    value = fields.Str(required=True, validate=validate.Length(max=attributes.MAX_VALUE))


class KeyQuery(Schema):
    key = KEY


class ScopeQuery(Schema):
    scope = SCOPE
    target = TARGET


class ScopeKeyQuery(ScopeQuery):
    key = KEY


class SetScoped(SetAttribute):
    scope = SCOPE
    target = TARGET


class ScopedAttributes(Schema):
    scope = fields.Str(required=True)
    target = fields.Str(required=True)
    items = fields.List(fields.Nested(AttributeOut), required=True)


# --- a VM's attributes -----------------------------------------------------------------------

def vm_out(vm) -> dict:
    return {"vm": vm.name, "cloud_init": attributes.wants_seed(vm),
            "items": [{"key": r.key, "value": r.value, "source": r.source, "scope": r.scope}
                      for r in attributes.resolve(vm)]}


def _set(scope: attributes.Scope, key: str, value: str) -> None:
    """Set and commit; a bad key or value: 422 naming it, nothing changed."""
    try:
        attributes.set_attr(scope, key, value)
    except attributes.AttributeError_ as exc:
        db.session.rollback()
        raise ApiError(422, "invalid", str(exc), {"key": [str(exc)]}) from exc
    db.session.commit()


def _unset(scope: attributes.Scope, key: str) -> None:
    """Unset and commit; a key not set there: 404."""
    try:
        attributes.unset(scope, key)
    except attributes.AttributeError_ as exc:
        db.session.rollback()
        raise ApiError(404, "not_found", str(exc)) from exc
    db.session.commit()


@operation("GET", "/vms/<int:vm_id>/attributes", summary="A VM's resolved attributes with their source "
                                                          "(Rocks' list host attr)", tag="attributes",
           response=VMAttributes)
def list_vm_attributes(vm_id: int):
    return vm_out(_vm(vm_id))


def _vm_to_change(vm_id: int):
    vm = _vm(vm_id)
    _forbid_unless(permissions.can_change_settings(current_user, vm))
    return vm


@operation("PUT", "/vms/<int:vm_id>/attributes", summary="Set one of a VM's own attributes (managers, power "
                                                          "owners); the guest reads it at its next power on",
           tag="attributes", body=SetAttribute, response=VMAttributes)
def set_vm_attribute(vm_id: int, body):
    vm = _vm_to_change(vm_id)
    _set(attributes.for_vm(vm), body["key"], body["value"])
    return vm_out(vm)


@operation("DELETE", "/vms/<int:vm_id>/attributes", summary="Unset one of a VM's own attributes (managers, "
                                                             "power owners)", tag="attributes", query=KeyQuery,
           response=VMAttributes)
def unset_vm_attribute(vm_id: int, query):
    vm = _vm_to_change(vm_id)
    _unset(attributes.for_vm(vm), query["key"])
    return vm_out(vm)


# --- global, appliance and OS-type attributes (managers) -------------------------------------

def _scope(scope: str, target: str) -> attributes.Scope:
    if scope == "global":
        return attributes.GLOBAL
    if scope == "appliance":
        appliance = db.session.get(Appliance, int(target)) if target.isdigit() and len(target) < 10 else None
        if appliance is None:
            raise ApiError(404, "not_found", "No such appliance.")
        return attributes.for_appliance(appliance)
    try:
        return attributes.for_os(target)
    except attributes.AttributeError_ as exc:
        raise ApiError(422, "invalid", str(exc), {"target": [str(exc)]}) from exc


def scoped_out(scope: attributes.Scope) -> dict:
    return {"scope": scope.scope, "target": scope.target,
            "items": [{"key": a.key, "value": a.value, "source": attributes.LETTERS[a.scope], "scope": a.scope}
                      for a in attributes.listed(scope)]}


@operation("GET", "/attributes", summary="Global, appliance or OS-type attributes (managers)", tag="attributes",
           query=ScopeQuery, response=ScopedAttributes)
def list_attributes(query):
    _manager_only()
    return scoped_out(_scope(query["scope"], query["target"]))


@operation("PUT", "/attributes", summary="Set a global, appliance or OS-type attribute (managers)",
           tag="attributes", body=SetScoped, response=ScopedAttributes)
def set_attribute(body):
    _manager_only()
    scope = _scope(body["scope"], body["target"])
    _set(scope, body["key"], body["value"])
    return scoped_out(scope)


@operation("DELETE", "/attributes", summary="Unset a global, appliance or OS-type attribute (managers)",
           tag="attributes", query=ScopeKeyQuery, response=ScopedAttributes)
def unset_attribute(query):
    _manager_only()
    scope = _scope(query["scope"], query["target"])
    _unset(scope, query["key"])
    return scoped_out(scope)


# --- an appliance's OS type and cloud-init flag (managers) -----------------------------------

class ApplianceCloudInit(Schema):
    os_type = fields.Str(load_default="", validate=validate.Length(max=32),
                         metadata={"description": "its OS type (OS attributes apply); empty: none"})
    cloud_init = fields.Bool(required=True, metadata={"description": "its guests run cloud-init: VMs get a seed "
                                                                    "CD-ROM at create and every power on"})


class ApplianceCloudInitOut(Schema):
    id = fields.Int(required=True)
    name = fields.Str(required=True)
    os_type = fields.Str(allow_none=True, required=True)
    cloud_init = fields.Bool(required=True)


@operation("PUT", "/library/appliances/<int:appliance_id>/cloud-init",
           summary="Set an appliance's OS type and whether its guests get a cloud-init seed (managers)",
           tag="attributes", body=ApplianceCloudInit, response=ApplianceCloudInitOut)
def set_appliance_cloud_init(appliance_id: int, body):
    _manager_only()
    appliance = db.session.get(Appliance, appliance_id)
    if appliance is None:
        raise ApiError(404, "not_found", "No such appliance.")
    try:
        attributes.set_appliance_os(appliance, os_type=body["os_type"], cloud_init=body["cloud_init"])
    except attributes.AttributeError_ as exc:
        db.session.rollback()
        raise ApiError(422, "invalid", str(exc), {"os_type": [str(exc)]}) from exc
    db.session.commit()
    return {"id": appliance.id, "name": appliance.name, "os_type": appliance.os_type,
            "cloud_init": appliance.cloud_init}

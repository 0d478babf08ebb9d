"""API v1 resources of networks and the license key pool (managers; the same domain code as their pages)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from .. import license_keys, networks
from ..extensions import db
from ..models import Appliance, Network
from .core import ApiError, operation
from .schemas import Id
from .views import _manager_only

# --- schemas -------------------------------------------------------------------------------


class Reservation(Schema):
    mac = fields.Str(required=True)
    ip = fields.Str(required=True)


class NetworkOut(Schema):
    id = fields.Int(required=True)
    name = fields.Str(required=True)
    kind = fields.Str(required=True, metadata={"description": "bridged, nat or isolated"})
    vlan = fields.Int(allow_none=True, required=True)
    cidr = fields.Str(allow_none=True, required=True)
    uplink = fields.Str(allow_none=True, required=True, metadata={"description": "the servers' NIC it rides on"})
    bridge = fields.Str(allow_none=True, required=True, metadata={"description": "the bridge on each server"})
    dhcp_start = fields.Str(allow_none=True, required=True)
    dhcp_end = fields.Str(allow_none=True, required=True)
    reservations = fields.List(fields.Nested(Reservation), required=True)
    vms = fields.List(fields.Str(), required=True, metadata={"description": "names of the VMs with a NIC on it"})


class NetworkList(Schema):
    items = fields.List(fields.Nested(NetworkOut), required=True)


class KeyQuery(Schema):
    appliance = Id(required=True, metadata={"description": "the appliance whose pool to list"})


class KeyOut(Schema):
    id = fields.Int(required=True)
    key = fields.Str(required=True)
    vm = fields.Str(allow_none=True, required=True, metadata={"description": "the VM holding it, or null: free"})
    added_at = fields.DateTime(required=True)


class KeyPool(Schema):
    appliance_id = fields.Int(required=True)
    license_required = fields.Bool(required=True)
    free = fields.Int(required=True)
    keys = fields.List(fields.Nested(KeyOut), required=True)


ONE_KEY = [validate.Length(min=1, max=license_keys.MAX_KEY),
           validate.Regexp(r"\A[^\r\n]+\Z", error="One key per item, no line breaks.")]


class AddKeys(Schema):
    appliance_id = Id(required=True)
    keys = fields.List(fields.Str(validate=ONE_KEY), required=True,
                       validate=validate.Length(min=1, max=10000))


# --- networks ------------------------------------------------------------------------------

def network_out(net: Network) -> dict:
    return {"id": net.id, "name": net.name, "kind": net.kind, "vlan": net.vlan, "cidr": net.cidr, "uplink": net.uplink,
            "bridge": networks.bridge_name(net), "dhcp_start": net.dhcp_start, "dhcp_end": net.dhcp_end,
            "reservations": [{"mac": r.mac, "ip": r.ip} for r in net.reservations],
            "vms": [vm.name for vm in networks.vms_on(net)]}


@operation("GET", "/networks", summary="List networks with their reservations and VMs (managers)",
           tag="networks", response=NetworkList)
def list_networks():
    _manager_only()
    return {"items": [network_out(n) for n in networks.all_networks()]}


@operation("GET", "/networks/<int:network_id>", summary="Show a network (managers)", tag="networks",
           response=NetworkOut)
def get_network(network_id: int):
    _manager_only()
    net = db.session.get(Network, network_id)
    if net is None:
        raise ApiError(404, "not_found", "No such network.")
    return network_out(net)


# --- the license key pool ------------------------------------------------------------------

def _appliance(appliance_id: int) -> Appliance:
    appliance = db.session.get(Appliance, appliance_id)
    if appliance is None:
        raise ApiError(404, "not_found", "No such appliance.")
    return appliance


def pool_out(appliance: Appliance) -> dict:
    return {"appliance_id": appliance.id, "license_required": bool(appliance.license_required),
            "free": license_keys.free_count(appliance),
            "keys": [{"id": k.id, "key": k.key, "vm": k.vm.name if k.vm else None, "added_at": k.added_at}
                     for k in license_keys.pool(appliance)]}


@operation("GET", "/license-keys", summary="An appliance's license key pool: which VM holds each key (managers)",
           tag="library", query=KeyQuery, response=KeyPool)
def list_license_keys(query):
    _manager_only()
    return pool_out(_appliance(query["appliance"]))


@operation("POST", "/license-keys", summary="Add license keys to an appliance's pool (managers); "
                                              "keys it already has are ignored", tag="library", body=AddKeys,
           response=KeyPool)
def add_license_keys(body):
    _manager_only()
    appliance = _appliance(body["appliance_id"])
    try:
        license_keys.add_keys(appliance, "\n".join(body["keys"]))
    except license_keys.LicenseKeyError as exc:
        db.session.rollback()
        raise ApiError(422, "invalid", str(exc), {"keys": [str(exc)]}) from exc
    db.session.commit()
    return pool_out(appliance)

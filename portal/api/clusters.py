"""API v1 resources of virtual clusters: the same rules (portal/clusters.py) and jobs as the pages."""

from __future__ import annotations

from functools import partial

from flask_login import current_user
from marshmallow import Schema, fields, validate

from .. import actionlog, clusters, networks, permissions, quotas
from ..extensions import db
from ..models import VirtualCluster
from .core import ApiError, refused
from .core import operation as _operation
from .schemas import Accepted, Id
from .views import _forbid_unless, iso, launched

operation = partial(_operation, prepared=True)  # the views build plain JSON values (cluster_out, launched)

# --- schemas -------------------------------------------------------------------------------


class Sizing(Schema):
    memory_mb = fields.Int(required=True, validate=validate.Range(16, 1 << 22))
    vcpus = fields.Int(load_default=1, validate=validate.Range(1, 64))
    disk_gb = fields.Int(load_default=None, allow_none=True, validate=validate.Range(1, 1 << 20),
                         metadata={"description": "the boot disk; omitted: the appliance's size"})


class NewCluster(Schema):
    fqdn = fields.Str(required=True, validate=validate.Length(1, 253),
                      metadata={"description": "the frontend's FQDN; its first label names the VMs"})
    public_ip = fields.Str(required=True, validate=validate.Length(1, 45),
                           metadata={"description": "the frontend's public address; the MAC prefix comes from it"})
    computes = fields.Int(required=True, validate=validate.Range(0, clusters.MAX_COMPUTES))
    appliance_id = Id(required=True)
    frontend = fields.Nested(Sizing, required=True)
    compute = fields.Nested(Sizing, required=True)
    server_ids = fields.List(Id(), load_default=list, metadata={"description": "omitted: every eligible server"})
    vlan = fields.Int(load_default=None, allow_none=True, metadata={"description": "omitted: the next free one"})
    public_network_id = Id(load_default=None, allow_none=True,
                           metadata={"description": "the frontend's public NIC; omitted: outbound only"})
    uplink = fields.Str(load_default="", validate=validate.Length(max=15))
    clone = fields.Bool(load_default=True)


class ClusterAction(Schema):
    action = fields.Str(required=True, validate=validate.OneOf(
        [*clusters.ACTIONS, "add-computes", "remove-compute"]))
    count = fields.Int(load_default=1, validate=validate.Range(1, clusters.MAX_COMPUTES),
                       metadata={"description": "add-computes: how many"})
    compute = fields.Str(load_default=None, allow_none=True, metadata={"description": "remove-compute: its name"})


class Member(Schema):
    id = fields.Int(required=True)
    name = fields.Str(required=True)
    role = fields.Str(required=True, metadata={"description": "frontend or compute"})
    index = fields.Int(required=True)
    state = fields.Str(required=True)
    server = fields.Str(allow_none=True, required=True)
    memory_mb = fields.Int(required=True)
    vcpus = fields.Int(required=True)
    disk_gb = fields.Int(required=True)
    macs = fields.List(fields.Str(), required=True)


class ClusterOut(Schema):
    id = fields.Int(required=True)
    name = fields.Str(required=True)
    public_ip = fields.Str(required=True)
    vlan = fields.Int(required=True)
    network = fields.Str(allow_none=True, required=True, metadata={"description": "the private network's name"})
    owner = fields.Str(required=True)
    state = fields.Str(required=True, metadata={"description": "creating, partial, running, off, mixed or empty"})
    created_at = fields.DateTime(required=True)
    vms = fields.List(fields.Nested(Member), required=True)


class ClusterList(Schema):
    items = fields.List(fields.Nested(ClusterOut), required=True)


def cluster_out(cluster: VirtualCluster) -> dict:
    roles = {m.vm_id: m for m in cluster.members}
    return {"id": cluster.id, "name": cluster.name, "public_ip": cluster.public_ip, "vlan": cluster.vlan,
            "network": cluster.network.name if cluster.network else None, "owner": cluster.owner.username,
            "state": clusters.status(cluster), "created_at": iso(cluster.created_at),
            "vms": [{"id": vm.id, "name": vm.name, "role": roles[vm.id].role, "index": roles[vm.id].index,
                     "state": vm.state, "server": vm.server.hostname if vm.server else None,
                     "memory_mb": vm.memory_mb, "vcpus": vm.vcpus, "disk_gb": vm.disk_gb,
                     "macs": [n.mac for n in vm.nics]} for vm in clusters.vms_of(cluster)]}


REFUSALS = (clusters.ClusterError, quotas.QuotaExceeded, networks.NetworkError)


@operation("GET", "/clusters", summary="List virtual clusters with their VMs (yours; a manager's: all)",
           tag="clusters", response=ClusterList)
def list_clusters():
    return {"items": [cluster_out(c) for c in clusters.all_visible(current_user)]}


@operation("GET", "/clusters/<int:cluster_id>", summary="Show a virtual cluster", tag="clusters", response=ClusterOut)
def get_cluster(cluster_id: int):
    return cluster_out(clusters.get_or_404(cluster_id))


@operation("POST", "/clusters", summary="Create a virtual cluster: a frontend and N computes on a VLAN of their own "
           "(Rocks add cluster FQDN IP N)", tag="clusters", body=NewCluster, response=Accepted, status=202)
def create_cluster(body):
    from ..jobs.clusters import create_cluster as create_job

    _forbid_unless(permissions.can_create_vm(current_user))
    req = clusters.ClusterRequest(
        fqdn=body["fqdn"], public_ip=body["public_ip"], computes=body["computes"], appliance_id=body["appliance_id"],
        frontend=clusters.Sizing(**body["frontend"]), compute=clusters.Sizing(**body["compute"]),
        server_ids=tuple(body["server_ids"]), vlan=body["vlan"], public_network_id=body["public_network_id"],
        uplink=body["uplink"], clone=body["clone"])
    try:
        cluster = clusters.record_new(current_user._get_current_object(), req)
    except REFUSALS as exc:
        db.session.rollback()
        raise refused(exc, 422, "invalid") from exc
    return launched(clusters.submit_task(cluster, "cluster-create", create_job,
                                         f"Create virtual cluster {cluster.name}", timeout=3600))


@operation("DELETE", "/clusters/<int:cluster_id>", summary="Delete a virtual cluster: its VMs, disks, network and "
           "VLAN on every server", tag="clusters", response=Accepted, status=202)
def delete_cluster(cluster_id: int):
    from ..jobs.clusters import delete_cluster as delete_job

    cluster = clusters.get_or_404(cluster_id)
    _forbid_unless(clusters.can_change(current_user, cluster))
    try:
        clusters.check_delete(cluster)
    except clusters.ClusterError as exc:
        raise refused(exc) from exc
    actionlog.record("cluster-delete-requested", target_type="cluster", target_label=cluster.name)
    return launched(clusters.submit_task(cluster, "cluster-delete", delete_job, f"Delete virtual cluster "
                                                                                f"{cluster.name}"))


@operation("POST", "/clusters/<int:cluster_id>/actions", summary="start, shutdown or poweroff the whole cluster "
           "(frontend first on start, last on stop); add-computes; remove-compute", tag="clusters",
           body=ClusterAction, response=Accepted, status=202)
def cluster_action(cluster_id: int, body):
    from ..jobs import clusters as jobs

    cluster = clusters.get_or_404(cluster_id)
    action = body["action"]
    if action in clusters.ACTIONS:
        try:
            clusters.power_order(cluster, action)
        except clusters.ClusterError as exc:
            raise refused(exc) from exc
        return launched(clusters.submit_task(cluster, f"cluster-{action}", jobs.power_cluster,
                                             f"{clusters.ACTIONS[action]} cluster {cluster.name}", action))
    _forbid_unless(clusters.can_change(current_user, cluster))
    if action == "add-computes":
        try:
            added = clusters.add_computes(cluster, body["count"])
        except REFUSALS as exc:
            db.session.rollback()
            raise refused(exc) from exc
        return launched(clusters.submit_task(cluster, "cluster-add-computes", jobs.add_computes,
                                             f"Add {', '.join(v.name for v in added)} to {cluster.name}",
                                             [v.id for v in added]))
    vm = next((v for v in clusters.computes(cluster) if v.name == body["compute"]), None)
    if vm is None:
        raise ApiError(422, "invalid", f"{cluster.name} has no compute called {body['compute']}.",
                       {"compute": ["No such compute in this cluster."]})
    try:
        clusters.check_remove_compute(cluster, vm)
    except clusters.ClusterError as exc:
        raise refused(exc) from exc
    actionlog.record("vm-delete-requested", target=vm, detail=f"compute of {cluster.name}")
    return launched(clusters.submit_task(cluster, "cluster-remove-compute", jobs.remove_compute,
                                         f"Remove {vm.name} from {cluster.name}", vm.id))

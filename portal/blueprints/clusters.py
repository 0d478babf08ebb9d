"""Virtual clusters: the list, "New virtual cluster", each cluster's page (members with state and
server, start/stop the whole cluster, add or remove computes, delete)."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import actionlog, clusters, networks, permissions, quotas
from ..extensions import db
from ..models import VM, Appliance, ApplianceState, ClusterMember, Server, ServerStatus, VirtualCluster
from ..views_common import launch, page_or_partial

bp = Blueprint("clusters", __name__, url_prefix="/clusters")


@bp.app_template_global("cluster_member")
def cluster_member(vm: VM) -> ClusterMember | None:
    """The VM's place in a virtual cluster, for its page (None: not in one)."""
    return db.session.get(ClusterMember, vm.id)


@bp.route("/")
@login_required
def index():
    return render_template("clusters/index.html", clusters=clusters.all_visible(current_user),
                           status=clusters.status, can_create=permissions.can_create_vm(current_user))


def _int(name: str, default: int | None = None) -> int | None:
    raw = (request.form.get(name) or "").strip()
    if not raw:
        return default
    if not raw.lstrip("-").isdigit():
        raise clusters.ClusterError(f"{name.replace('_', ' ').capitalize()} takes a whole number, not {raw!r}.")
    return int(raw)


def request_from_form() -> clusters.ClusterRequest:
    f = request.form
    public = (f.get("public_network") or "user").strip()
    if public != "user" and not public.isdigit():
        raise clusters.ClusterError("Choose the frontend's public network from the list.")
    appliance = _int("appliance")
    if appliance is None:
        raise clusters.ClusterError("Choose the appliance the cluster's VMs are made from.")
    return clusters.ClusterRequest(
        fqdn=f.get("fqdn", ""), public_ip=f.get("public_ip", ""), computes=_int("computes", 0),
        appliance_id=appliance,
        frontend=clusters.Sizing(_int("frontend_memory_mb", 0), _int("frontend_vcpus", 1), _int("frontend_disk_gb")),
        compute=clusters.Sizing(_int("compute_memory_mb", 0), _int("compute_vcpus", 1), _int("compute_disk_gb")),
        server_ids=tuple(int(s) for s in f.getlist("servers") if s.isdigit()), vlan=_int("vlan"),
        public_network_id=None if public == "user" else int(public), uplink=f.get("uplink", ""),
        clone=bool(f.get("clone")) if "clone_field" in f else True)


@bp.route("/new", methods=["GET", "POST"])
@login_required
def new():
    from ..jobs.clusters import create_cluster

    if not permissions.can_create_vm(current_user):
        abort(403)
    if request.method == "POST":
        try:
            cluster = clusters.record_new(current_user._get_current_object(), request_from_form())
        except (clusters.ClusterError, quotas.QuotaExceeded, networks.NetworkError) as exc:
            db.session.rollback()
            flash(str(exc), "error")
        else:
            name, count = cluster.name, len(cluster.members)
            task = launch(clusters.submit_task(cluster, "cluster-create", create_cluster,
                                               f"Create virtual cluster {name}", timeout=3600))
            if task is None:
                return redirect(url_for("clusters.index"))
            flash(f"Creating {name}: {count} VM(s), one task.", "info")
            return redirect(url_for("tasks.detail", task_id=task.id))
    appliances = db.session.execute(db.select(Appliance).where(Appliance.state == ApplianceState.READY.value)
                                    .order_by(Appliance.name)).scalars().all()
    servers = db.session.execute(db.select(Server).where(Server.status == ServerStatus.UP.value)
                                 .order_by(Server.hostname)).scalars().all()
    private = set(db.session.execute(db.select(VirtualCluster.network_id)).scalars())  # clusters' own networks
    try:
        vlan = clusters.next_free_vlan()
    except clusters.ClusterError:
        vlan = None
    return render_template("clusters/new.html", appliances=appliances, servers=servers, next_vlan=vlan,
                           nets=[n for n in networks.all_networks() if n.id not in private],
                           quota=quotas.lines(current_user),
                           max_computes=clusters.MAX_COMPUTES), 400 if request.method == "POST" else 200


@bp.route("/<int:cluster_id>")
@login_required
def detail(cluster_id: int):
    cluster = clusters.get_or_404(cluster_id)
    return page_or_partial("clusters/detail.html", "clusters/_members.html", cluster=cluster,
                           members=clusters.vms_of(cluster), frontend=clusters.frontend(cluster),
                           status=clusters.status(cluster),
                           can_change=clusters.can_change(current_user, cluster), actions=clusters.ACTIONS)


@bp.post("/<int:cluster_id>/power/<action>")
@login_required
def power(cluster_id: int, action: str):
    from ..jobs.clusters import power_cluster

    cluster = clusters.get_or_404(cluster_id)
    try:
        clusters.power_order(cluster, action)
    except clusters.ClusterError as exc:
        flash(str(exc), "error")
    else:
        launch(clusters.submit_task(cluster, f"cluster-{action}", power_cluster,
                                   f"{clusters.ACTIONS[action]} cluster {cluster.name}", action))
    return redirect(url_for("clusters.detail", cluster_id=cluster_id))


def _changer(cluster_id: int) -> VirtualCluster:
    cluster = clusters.get_or_404(cluster_id)
    if not clusters.can_change(current_user, cluster):
        abort(403)
    return cluster


@bp.post("/<int:cluster_id>/computes")
@login_required
def add_computes(cluster_id: int):
    from ..jobs.clusters import add_computes as add_job

    cluster = _changer(cluster_id)
    try:
        added = clusters.add_computes(cluster, _int("count", 0))
    except (clusters.ClusterError, networks.NetworkError) as exc:
        db.session.rollback()
        flash(str(exc), "error")
    else:
        launch(clusters.submit_task(cluster, "cluster-add-computes", add_job,
                                   f"Add {', '.join(v.name for v in added)} to {cluster.name}", [v.id for v in added]))
    return redirect(url_for("clusters.detail", cluster_id=cluster_id))


@bp.post("/<int:cluster_id>/computes/<int:vm_id>/remove")
@login_required
def remove_compute(cluster_id: int, vm_id: int):
    from ..jobs.clusters import remove_compute as remove_job

    cluster = _changer(cluster_id)
    vm = db.session.get(VM, vm_id)
    if vm is None or vm not in clusters.computes(cluster):
        abort(404)
    try:
        clusters.check_remove_compute(cluster, vm)
    except clusters.ClusterError as exc:
        flash(str(exc), "error")
    else:
        actionlog.record("vm-delete-requested", target=vm, detail=f"compute of {cluster.name}")
        launch(clusters.submit_task(cluster, "cluster-remove-compute", remove_job,
                                   f"Remove {vm.name} from {cluster.name}", vm.id))
    return redirect(url_for("clusters.detail", cluster_id=cluster_id))


@bp.post("/<int:cluster_id>/delete")
@login_required
def delete(cluster_id: int):
    from ..jobs.clusters import delete_cluster

    cluster = _changer(cluster_id)
    try:
        clusters.check_delete(cluster)
    except clusters.ClusterError as exc:
        flash(str(exc), "error")
        return redirect(url_for("clusters.detail", cluster_id=cluster_id))
    actionlog.record("cluster-delete-requested", target_type="cluster", target_label=cluster.name)
    task = launch(clusters.submit_task(cluster, "cluster-delete", delete_cluster, f"Delete virtual cluster "
                                                                                   f"{cluster.name}"))
    if task is None:
        return redirect(url_for("clusters.detail", cluster_id=cluster_id))
    return redirect(url_for("tasks.detail", task_id=task.id))

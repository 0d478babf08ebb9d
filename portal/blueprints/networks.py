"""Networks (managers): bridged and isolated networks, their reservations and the VMs on each."""

from __future__ import annotations

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import actionlog, macs, networks, permissions
from ..extensions import db
from ..models import Network
from ..views_common import apply_change, launch, submit_vm_task

bp = Blueprint("networks", __name__, url_prefix="/networks")


@bp.app_template_global("nic_networks")
def nic_networks() -> list[Network]:
    """The networks a new VM's NICs may use (create pages)."""
    return networks.all_networks()


@bp.app_template_global("default_network")
def default_network() -> str:
    """The create pages' preselected choice for the first NIC: a network id, or "user" (outbound only)."""
    name = current_app.config.get("DEFAULT_NETWORK") or ""
    net = db.session.execute(db.select(Network).where(Network.name == name)).scalar_one_or_none() if name else None
    return str(net.id) if net else "user"


@bp.route("/")
@login_required
@permissions.manager_required
def index():
    nets = networks.all_networks()
    return render_template("networks/index.html", nets=nets, vms_on={n.id: networks.vms_on(n) for n in nets},
                           kinds=networks.KINDS)


@bp.post("/")
@login_required
@permissions.manager_required
def create():
    f = request.form
    try:
        vlan = int(f["vlan"]) if f.get("vlan", "").strip() else None
    except ValueError:
        vlan = -1  # refused with the rule's message

    def change() -> str:
        net = networks.create(name=f.get("name", ""), kind=f.get("kind", ""), uplink=f.get("uplink", ""), vlan=vlan,
                              cidr=f.get("cidr", ""), dhcp_start=f.get("dhcp_start", ""),
                              dhcp_end=f.get("dhcp_end", ""), description=f.get("description", ""))
        actionlog.record("network-created", detail=f"{net.name}: {net.kind}, bridge {net.bridge}"
                         + (f", VLAN {net.vlan}" if net.vlan is not None else ""))
        return f"Network {net.name} created; servers get its bridge when a VM on it is created or started there."

    apply_change(change, (networks.NetworkError,))
    return redirect(url_for("networks.index"))


@bp.post("/<int:network_id>/reservations")
@login_required
@permissions.manager_required
def reserve(network_id: int):
    net = db.get_or_404(Network, network_id)

    def change() -> str:
        res = networks.add_reservation(net, request.form.get("mac", ""), request.form.get("ip", ""))
        actionlog.record("network-reservation", detail=f"{net.name}: {res.mac} -> {res.ip}")
        return f"{res.mac} gets {res.ip} on {net.name}."

    apply_change(change, (networks.NetworkError, macs.MacError))
    return redirect(url_for("networks.index"))


@bp.post("/<int:network_id>/delete")
@login_required
@permissions.manager_required
def delete(network_id: int):
    net = db.get_or_404(Network, network_id)
    name = net.name

    def change() -> str:
        networks.delete(net)
        actionlog.record("network-deleted", detail=name)
        return f"Network {name} deleted."

    apply_change(change, (networks.NetworkError,))
    return redirect(url_for("networks.index"))


@bp.post("/vm/<int:vm_id>")
@login_required
def vm_nics(vm_id: int):
    """Put a VM that is off on other networks (those who may change its settings); a task redefines it."""
    from ..jobs.vms import apply_settings

    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_change_settings(current_user, vm):
        abort(403)
    old = networks.nic_plan(vm)
    try:
        networks.change_nics(vm, networks.from_form(request.form))
    except networks.NetworkError as exc:
        db.session.rollback()
        flash(str(exc), "error")
        return redirect(url_for("vms.detail", vm_id=vm.id))
    actionlog.record("vm-nics-changed", target=vm, detail=", ".join(
        f"NIC {n.position}: {n.network.name if n.network else 'outbound only'}" for n in vm.nics))
    name = vm.name
    sub = submit_vm_task(vm, "vm-settings", apply_settings, f"Apply network interfaces of {name}")
    task = launch(sub, busy=f"{name} is busy with task {sub.task.id} ({sub.task.title}); try again when it ends.",
                  not_started=lambda: networks.restore_nics(vm, old))
    return redirect(url_for("tasks.detail", task_id=task.id) if task else url_for("vms.detail", vm_id=vm.id))

"""The web console: the graphical console (noVNC) and the serial terminal (xterm.js) of a running VM.

The page asks for a one-shot token (POST, after the permission check) each
time it (re)connects; the browser's WebSocket goes to ``corral console-proxy``
(see console_proxy), on the portal's own origin and path prefix unless
CONSOLE_WS_URL says otherwise.
"""

from __future__ import annotations

from flask import Blueprint, abort, current_app, jsonify, render_template, request
from flask_login import current_user, login_required

from .. import console_tokens, permissions
from ..models import VMState

bp = Blueprint("console", __name__, url_prefix="/vms")

TITLES = {"vnc": "Console", "serial": "Serial terminal"}


def _operable_vm(vm_id: int):
    vm = permissions.get_vm_or_404(vm_id)
    if not permissions.can_operate_vm(current_user, vm):
        abort(404)
    return vm


@bp.route("/<int:vm_id>/console/<kind>")
@login_required
def page(vm_id: int, kind: str):
    if kind not in console_tokens.KINDS:
        abort(404)
    vm = _operable_vm(vm_id)
    ws_base = current_app.config["CONSOLE_WS_URL"] or ""
    ws_port = int(current_app.config.get("CONSOLE_WS_PORT") or 0) or ""
    return render_template("console/page.html", vm=vm, kind=kind, title=TITLES[kind], ws_base=ws_base,
                           ws_port=ws_port, ws_path=f"{request.script_root}/console/ws/{kind}")


@bp.route("/<int:vm_id>/console/<kind>/token", methods=["POST"])
@login_required
def token(vm_id: int, kind: str):
    """A fresh single-use token for this user on this VM; 409 with a message when the VM does not run."""
    if kind not in console_tokens.KINDS:
        abort(404)
    vm = _operable_vm(vm_id)
    if vm.state_enum is not VMState.RUNNING or vm.server is None:
        return jsonify(error=f"{vm.name} is {vm.state_enum.label.lower()}: the console opens while it runs."), 409
    return jsonify(token=console_tokens.mint(current_user, vm, kind))

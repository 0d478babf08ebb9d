"""VMs area: the list and each VM's dashboard."""

from __future__ import annotations

from flask import Blueprint, request
from flask_login import current_user, login_required
from sqlalchemy.orm import selectinload

from .. import permissions
from ..extensions import db
from ..models import VM, Task, User, VMState
from ..views_common import page_or_partial, paginate

bp = Blueprint("vms", __name__, url_prefix="/vms")


def vm_list_query(user, *, state: str | None = None, q: str | None = None):
    stmt = permissions.visible_vms(db.select(VM), user).options(
        selectinload(VM.owner).load_only(User.id, User.username),
        selectinload(VM.server),
        selectinload(VM.vdisks),
    ).order_by(VM.name)
    if state:
        stmt = stmt.where(VM.state == state)
    if q:
        stmt = stmt.where(VM.name.contains(q.strip()[:8], autoescape=True))
    return stmt


@bp.route("/")
@login_required
def index():
    state = request.args.get("state") or None
    if state and state not in {s.value for s in VMState}:
        state = None
    q = request.args.get("q") or None
    page = paginate(vm_list_query(current_user, state=state, q=q))
    return page_or_partial("vms/index.html", "vms/_list.html", page=page, state=state, q=q,
                           states=list(VMState), can_create=permissions.can_create_vm(current_user))


@bp.route("/<int:vm_id>")
@login_required
def detail(vm_id: int):
    vm = permissions.get_vm_or_404(vm_id)
    history = db.session.execute(
        db.select(Task).where(Task.target_type == "vm", Task.target_id == vm.id)
        .order_by(Task.created_at.desc()).limit(20)
    ).scalars().all()
    return page_or_partial("vms/detail.html", "vms/_detail.html", vm=vm, history=history)

"""VM Servers area (managers)."""

from __future__ import annotations

from flask import Blueprint
from flask_login import login_required
from sqlalchemy import func

from ..extensions import db
from ..models import VM, Server, ServerDisk
from ..permissions import manager_required
from ..views_common import page_or_partial, paginate

bp = Blueprint("servers", __name__, url_prefix="/servers")


def _server_rows(servers: list[Server]) -> list[dict]:
    """Per-server VM counts and disk totals in two grouped queries (no N+1)."""
    ids = [s.id for s in servers]
    vm_counts = dict(db.session.execute(
        db.select(VM.server_id, func.count()).where(VM.server_id.in_(ids)).group_by(VM.server_id)
    ).all()) if ids else {}
    disks = {sid: (size, free) for sid, size, free in db.session.execute(
        db.select(ServerDisk.server_id, func.sum(ServerDisk.size_gb), func.sum(ServerDisk.free_gb))
        .where(ServerDisk.server_id.in_(ids)).group_by(ServerDisk.server_id)
    ).all()} if ids else {}
    rows = []
    for s in servers:
        size, free = disks.get(s.id, (0, None))
        rows.append({"server": s, "vm_count": vm_counts.get(s.id, 0), "disk_gb": size or 0, "disk_free_gb": free})
    return rows


@bp.route("/")
@login_required
@manager_required
def index():
    page = paginate(db.select(Server).order_by(Server.hostname))
    return page_or_partial("servers/index.html", "servers/_list.html", page=page, rows=_server_rows(page.items))


@bp.route("/<int:server_id>")
@login_required
@manager_required
def detail(server_id: int):
    server = db.get_or_404(Server, server_id)
    vms = db.session.execute(
        db.select(VM).where((VM.server_id == server.id) | (VM.backup_server_id == server.id)).order_by(VM.name)
    ).scalars().all()
    return page_or_partial("servers/detail.html", "servers/_detail.html", server=server, vms=vms,
                           row=_server_rows([server])[0])

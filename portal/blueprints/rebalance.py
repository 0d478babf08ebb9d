"""Rebalancing: the planner's proposal with before/after load per server; managers approve it whole or per move."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required

from .. import actionlog, rebalance, tasks
from ..extensions import db
from ..models import VM
from ..permissions import manager_required

bp = Blueprint("rebalance", __name__, url_prefix="/rebalance")


@bp.route("/")
@login_required
@manager_required
def index():
    proposal, servers = rebalance.propose()
    t = rebalance.thresholds()
    changed = {m.source_id for m in proposal.moves} | {m.target_id for m in proposal.moves}
    rows = [(servers[sid], proposal.before[sid], proposal.after[sid], sid in changed, sid in proposal.still_over)
            for sid in sorted(proposal.before, key=lambda s: servers[s].hostname)]
    return render_template("rebalance/index.html", proposal=proposal, servers=servers, rows=rows, t=t,
                           over=set(proposal.over_before(t)), cfg=current_app.config)


@bp.post("/apply")
@login_required
@manager_required
def apply():
    """Each selected move ("vm_id:server_id") becomes a live-migration task, checked again first."""
    selected = []
    for raw in request.form.getlist("move"):
        vm_id, _, server_id = raw.partition(":")
        if vm_id.isdigit() and server_id.isdigit():
            selected.append((int(vm_id), int(server_id)))
    if not selected:
        flash("Choose at least one move.", "error")
        return redirect(url_for("rebalance.index"))
    subs, refused = rebalance.submit_moves(selected, current_user.id)
    for sub in subs:
        actionlog.record("rebalance-approved", target=db.session.get(VM, sub.task.target_id), detail=sub.task.title)
    db.session.commit()
    started = 0
    for sub in subs:
        try:
            tasks.enqueue(sub)
            started += 1
        except tasks.QueueUnavailable as exc:
            refused.append(str(exc))
        db.session.commit()
    for note in refused:
        flash(note, "error")
    if started:
        flash(f"Started {started} live migration(s); see Tasks.", "ok")
    return redirect(url_for("tasks.index") if started else url_for("rebalance.index"))

"""The Summary page: servers, VMs, tasks and the user's quota, refreshed by htmx."""

from __future__ import annotations

from flask import Blueprint, render_template
from flask_login import current_user, login_required

from .. import summary as summary_mod
from ..views_common import page_or_partial

bp = Blueprint("summary", __name__)


@bp.route("/")
@login_required
def index():
    return page_or_partial("summary/index.html", "summary/_panel.html", s=summary_mod.build(current_user))


@bp.route("/_summary")
@login_required
def panel():
    return render_template("summary/_panel.html", s=summary_mod.build(current_user))

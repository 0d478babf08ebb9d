"""The Account page's API tokens: create (the secret is shown once, in that response only) and revoke."""

from __future__ import annotations

from flask import Blueprint, Flask, flash, g, make_response, redirect, request, url_for
from flask_login import current_user, login_required

from .. import api_tokens
from ..extensions import db

bp = Blueprint("tokens", __name__, url_prefix="/account/tokens")


@bp.post("/")
@login_required
def create():
    from ..blueprints.auth import account

    raw_days = (request.form.get("expires_in_days") or "").strip()
    try:
        days = int(raw_days) if raw_days else None
        token, secret = api_tokens.create(current_user._get_current_object(), name=request.form.get("name", ""),
                                          scope=request.form.get("scope", "read"), expires_in_days=days)
    except (ValueError, api_tokens.TokenError) as exc:
        db.session.rollback()
        flash(str(exc) if isinstance(exc, api_tokens.TokenError) else "Expiry is a number of days.", "error")
        return redirect(url_for("auth.account"))
    db.session.commit()
    g.new_api_token = (token, secret)  # rendered once by the account page; never stored
    resp = make_response(account(), 201)
    resp.headers["Cache-Control"] = "no-store"  # the secret is in this page only
    return resp


@bp.post("/<int:token_id>/revoke")
@login_required
def revoke(token_id: int):
    try:
        token = api_tokens.revoke(current_user._get_current_object(), token_id)
    except api_tokens.TokenError as exc:
        flash(str(exc), "error")
        return redirect(url_for("auth.account")), 303
    db.session.commit()
    flash(f"Token {token.name} was revoked.", "success")
    return redirect(url_for("auth.account")), 303


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.jinja_env.globals["api_tokens_of"] = api_tokens.of

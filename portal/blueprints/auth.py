"""Login, logout, the user's own account, and the action log."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy.orm import selectinload
from wtforms import DateField, SelectChoice, EmailField, PasswordField, SelectField, StringField
from wtforms.validators import DataRequired, Email, EqualTo, Length, Optional

from .. import actionlog, metrics, permissions, tasks
from ..auth_core import LoginThrottle, hash_password, password_problem, verify_password
from ..extensions import db
from ..models import ActionLog, User, utcnow
from ..views_common import launch, page_or_partial, paginate

bp = Blueprint("auth", __name__)


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=256)])


class PasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired()])
    new = PasswordField("New password", validators=[DataRequired()])
    confirm = PasswordField("Repeat new password", validators=[DataRequired(), EqualTo("new", "The two new passwords differ.")])


class EmailForm(FlaskForm):
    email = EmailField("Email", validators=[DataRequired(), Email(check_deliverability=False), Length(max=254)])


class ActionLogFilter(FlaskForm):
    class Meta:
        csrf = False

    user = SelectField("User", coerce=str, validators=[Optional()])
    start = DateField("From", validators=[Optional()])
    end = DateField("To", validators=[Optional()])


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("summary.index")


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("summary.index"))
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        throttle = LoginThrottle()
        name, address = form.username.data.strip(), request.remote_addr or "?"
        wait = throttle.wait_seconds(name, address)
        if wait:
            flash(f"Too many failed attempts. Try again in {wait} s.", "error")
            return render_template("auth/login.html", form=form), 429
        user = db.session.execute(db.select(User).where(User.username == name)).scalar_one_or_none()
        if verify_password(user, form.password.data) and not user.disabled:
            throttle.succeeded(name)
            login_user(user)
            user.last_login_at = utcnow()
            actionlog.record("login", target=user, user_id=user.id)
            db.session.commit()
            return redirect(_safe_next(request.args.get("next")))
        throttle.failed(name, address)
        metrics.incr("login_failures")
        if user is not None:
            actionlog.record("login-failed", target=user, user_id=user.id)
            db.session.commit()
        flash("Wrong username or password, or the account is disabled.", "error")
        status = 401
    elif request.method == "POST":
        status = 400
    return render_template("auth/login.html", form=form), status


@bp.post("/logout")
@login_required
def logout():
    actionlog.record("logout", target=current_user)
    db.session.commit()
    logout_user()
    flash("You have been logged out.", "info")
    return redirect(url_for("auth.login"))


@bp.route("/account")
@login_required
def account():
    return render_template("auth/account.html", pw_form=PasswordForm(), email_form=EmailForm(email=current_user.email))


@bp.post("/account/password")
@login_required
def change_password():
    form = PasswordForm()
    if form.validate_on_submit():
        problem = password_problem(form.new.data)
        if not verify_password(current_user, form.current.data):
            form.current.errors.append("That is not your current password.")
        elif problem:
            form.new.errors.append(problem)
        else:
            user = current_user._get_current_object()
            user.password_hash = hash_password(form.new.data)
            user.session_version += 1  # log out the user's other sessions
            actionlog.record("password-changed", target=user)
            db.session.commit()
            login_user(user)
            flash("Your password was changed; other sessions were logged out.", "success")
            return redirect(url_for("auth.account"))
    return render_template("auth/account.html", pw_form=form, email_form=EmailForm(email=current_user.email)), 400


@bp.post("/account/email")
@login_required
def change_email():
    form = EmailForm()
    if form.validate_on_submit():
        user = current_user._get_current_object()
        old = user.email
        user.email = form.email.data.strip()
        actionlog.record("email-changed", target=user, detail=f"{old or '(none)'} -> {user.email}")
        db.session.commit()
        flash("Your email address was changed.", "success")
        return redirect(url_for("auth.account"))
    return render_template("auth/account.html", pw_form=PasswordForm(), email_form=form), 400


def _actionlog_query(form: ActionLogFilter):
    stmt = db.select(ActionLog).options(selectinload(ActionLog.user)).order_by(ActionLog.at.desc(), ActionLog.id.desc())
    if not permissions.is_manager(current_user):
        stmt = stmt.where(ActionLog.user_id == current_user.id)
    elif form.user.data:
        try:
            stmt = stmt.where(ActionLog.user_id == int(form.user.data))
        except ValueError:
            abort(400)
    if form.start.data:
        stmt = stmt.where(ActionLog.at >= datetime.combine(form.start.data, time.min, timezone.utc))
    if form.end.data:
        stmt = stmt.where(ActionLog.at < datetime.combine(form.end.data + timedelta(days=1), time.min, timezone.utc))
    return stmt


def _filter_form() -> ActionLogFilter:
    form = ActionLogFilter(request.args)
    if permissions.is_manager(current_user):
        users = db.session.execute(db.select(User.id, User.username).order_by(User.username)).all()
        form.user.choices = [SelectChoice("", "Everyone")] + [SelectChoice(str(i), n) for i, n in users]
    else:
        form.user.choices = [SelectChoice("", current_user.username)]
    return form


@bp.route("/actionlog", endpoint="actionlog")
@login_required
def show_actionlog():
    form = _filter_form()
    if request.args and not form.validate():
        flash("The filter is not valid: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in form.errors.items()), "error")
        return render_template("auth/actionlog.html", form=form, page=None), 400
    page = paginate(_actionlog_query(form))
    return page_or_partial("auth/actionlog.html", "auth/_actionlog_rows.html", form=form, page=page)


@bp.post("/actionlog/export")
@login_required
def actionlog_export():
    from ..jobs.accounts import export_actionlog

    everyone = permissions.is_manager(current_user) and request.form.get("scope") == "all"
    user_id = None if everyone else current_user.id
    sub = tasks.submit(
        "export-actionlog",
        export_actionlog,
        title="Export everyone's action log" if everyone else f"Export {current_user.username}'s action log",
        requester_id=current_user.id,
        key=f"export-actionlog:{current_user.id}:{'all' if everyone else 'own'}",
        args=(user_id,),
        retries=2,
    )
    task = launch(sub, busy="That export is already running; here it is.")
    if task is None:
        return redirect(url_for("auth.actionlog"))
    return redirect(url_for("tasks.detail", task_id=task.id))

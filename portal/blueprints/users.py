"""Users area (managers): create, edit, disable users and set quotas."""

from __future__ import annotations

from flask import Blueprint, current_app, flash, redirect, render_template, url_for
from flask_login import login_required
from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, IntegerField, SelectChoice, SelectField, StringField
from wtforms.validators import DataRequired, Email, Length, NumberRange, Optional, Regexp

from .. import users as users_mod
from ..extensions import db
from ..models import Role, User
from ..permissions import manager_required
from ..views_common import page_or_partial, paginate

bp = Blueprint("users", __name__, url_prefix="/users")

ROLE_CHOICES = [SelectChoice(r.value, r.label) for r in Role]


class UserForm(FlaskForm):
    role = SelectField("Role", choices=ROLE_CHOICES)
    email = EmailField("Email", validators=[Optional(), Email(check_deliverability=False), Length(max=254)])
    max_vms = IntegerField("Max VMs", validators=[Optional(), NumberRange(0, 10000)])
    max_memory_mb = IntegerField("Max memory (MB)", validators=[Optional(), NumberRange(0, 16 * 1024 * 1024)])
    max_disk_gb = IntegerField("Max disk (GB)", validators=[Optional(), NumberRange(0, 1024 * 1024)])


class NewUserForm(UserForm):
    username = StringField("Username", validators=[
        DataRequired(), Length(min=2, max=64),
        Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", message="Letters, digits, dot, dash and underscore only."),
    ])


class EditUserForm(UserForm):
    disabled = BooleanField("Disabled (cannot log in)")


def _quotas(form: UserForm) -> dict:
    return {"max_vms": form.max_vms.data or 0, "max_memory_mb": form.max_memory_mb.data or 0,
            "max_disk_gb": form.max_disk_gb.data or 0}


@bp.route("/")
@login_required
@manager_required
def index():
    page = paginate(db.select(User).order_by(User.username))
    usage = users_mod.usage_by_user([u.id for u in page.items])
    return page_or_partial("users/index.html", "users/_list.html", page=page, usage=usage)


@bp.route("/new", methods=["GET", "POST"])
@login_required
@manager_required
def new():
    cfg = current_app.config
    form = NewUserForm()
    if not form.is_submitted():
        form.role.data = Role.POWER.value
        form.max_vms.data = cfg["DEFAULT_MAX_VMS"]
        form.max_memory_mb.data = cfg["DEFAULT_MAX_MEMORY_MB"]
        form.max_disk_gb.data = cfg["DEFAULT_MAX_DISK_GB"]
    if form.validate_on_submit():
        password = users_mod.generate_password()
        try:
            user = users_mod.create_user(username=form.username.data, role=form.role.data,
                                         email=form.email.data, password=password, **_quotas(form))
        except users_mod.UserError as exc:
            db.session.rollback()
            form.username.errors.append(str(exc))
        else:
            db.session.commit()
            return render_template("users/created.html", user=user, password=password)
    status = 400 if form.is_submitted() else 200
    return render_template("users/form.html", form=form, user=None), status


@bp.route("/<int:user_id>", methods=["GET", "POST"])
@login_required
@manager_required
def edit(user_id: int):
    user = db.get_or_404(User, user_id)
    form = EditUserForm(obj=user)
    if form.validate_on_submit():
        try:
            users_mod.update_user(user, role=form.role.data, email=form.email.data, disabled=form.disabled.data,
                                  **_quotas(form))
        except users_mod.UserError as exc:
            db.session.rollback()
            flash(str(exc), "error")
        else:
            db.session.commit()
            flash(f"Saved {user.username}.", "success")
            return redirect(url_for("users.index"))
    status = 400 if form.is_submitted() else 200
    usage = users_mod.usage_by_user([user.id])[user.id]
    return render_template("users/form.html", form=form, user=user, usage=usage), status


@bp.post("/<int:user_id>/reset-password")
@login_required
@manager_required
def reset_password(user_id: int):
    user = db.get_or_404(User, user_id)
    password = users_mod.reset_password(user)
    db.session.commit()
    return render_template("users/created.html", user=user, password=password, reset=True)

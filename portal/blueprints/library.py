"""Library: virtual appliances and ISO images. Everyone may browse and use; managers manage."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired, MultipleFileField
from sqlalchemy.orm import selectinload
from wtforms import IntegerField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, NumberRange, Optional, ValidationError

from .. import actionlog, library as library_mod, tasks
from ..extensions import db
from ..models import Appliance, IsoImage
from ..permissions import manager_required
from ..views_common import launch, page_or_partial, paginate

bp = Blueprint("library", __name__, url_prefix="/library")



def _name_rule(form, field) -> None:
    """The library's one name rule (:func:`portal.library.check_name`), for appliance and ISO names."""
    try:
        field.data = library_mod.check_name(field.data)
    except library_mod.LibraryError as exc:
        raise ValidationError(str(exc)) from None


NAME = [DataRequired(), _name_rule]


class UploadApplianceForm(FlaskForm):
    name = StringField("Name", validators=NAME)
    description = TextAreaField("Description", validators=[Optional(), Length(max=2000)])
    min_memory_mb = IntegerField("Minimum memory (MB)", default=256, validators=[NumberRange(16, 1 << 22)])
    max_memory_mb = IntegerField("Maximum memory (MB)", default=4096, validators=[NumberRange(16, 1 << 22)])
    vcpus = IntegerField("vCPUs", default=1, validators=[NumberRange(1, 64)])
    os_hint = StringField("Operating system", validators=[Optional(), Length(max=64)])
    disks = MultipleFileField("Disk images (1 to 4: qcow2, raw, vmdk or vdi; may be .gz, .xz or .zst)")


class UploadIsoForm(FlaskForm):
    name = StringField("Name", validators=NAME)
    iso = FileField("ISO image", validators=[FileRequired()])


@bp.route("/")
@login_required
def index():
    page = paginate(db.select(Appliance).options(selectinload(Appliance.disks)).order_by(Appliance.name))
    isos = db.session.execute(db.select(IsoImage).order_by(IsoImage.name)).scalars().all()
    return page_or_partial("library/index.html", "library/_appliances.html", page=page, isos=isos)


@bp.route("/appliances/upload", methods=["GET", "POST"])
@login_required
@manager_required
def upload_appliance():

    form = UploadApplianceForm()
    if form.validate_on_submit():
        files = [f for f in (form.disks.data or []) if f and f.filename]
        try:
            name = library_mod.check_upload(form.name.data, len(files), form.min_memory_mb.data,
                                            form.max_memory_mb.data)
        except library_mod.LibraryError as exc:
            flash(str(exc), "error")
        else:
            meta = {"name": name, "description": form.description.data, "min_memory_mb": form.min_memory_mb.data,
                    "max_memory_mb": form.max_memory_mb.data, "vcpus": form.vcpus.data, "os_hint": form.os_hint.data}
            sub, folder = library_mod.submit_upload(files, meta, current_user.id)
            task = launch(sub, busy=f"{name} is being imported already; here it is.",
                          not_started=lambda: shutil.rmtree(folder, ignore_errors=True))
            if task is not None:
                return redirect(url_for("tasks.detail", task_id=task.id))
    status = 400 if form.is_submitted() else 200
    return render_template("library/upload.html", form=form), status


@bp.post("/appliances/<int:appliance_id>/delete")
@login_required
@manager_required
def delete_appliance(appliance_id: int):
    row = db.get_or_404(Appliance, appliance_id)
    actionlog.record("appliance-deleted", target=row)
    db.session.delete(row)  # VMs keep running from their own copies (appliance_id becomes empty)
    db.session.commit()
    library_mod.remove_appliance_files(appliance_id)
    flash(f"Deleted the appliance {row.name}; VMs created from it are untouched.", "success")
    return redirect(url_for("library.index"))


@bp.route("/isos/upload", methods=["GET", "POST"])
@login_required
@manager_required
def upload_iso():
    form = UploadIsoForm()
    if form.validate_on_submit():
        name = form.name.data
        if db.session.execute(db.select(IsoImage.id).where(IsoImage.name == name)).first():
            flash(f"An ISO image called {name} exists already.", "error")
        else:
            folder = library_mod.library_dir() / "isos"
            folder.mkdir(exist_ok=True)
            part = folder / f"{uuid.uuid4().hex}.part"
            digest, size = hashlib.sha256(), 0
            with part.open("wb") as out:
                while chunk := form.iso.data.stream.read(8 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if not _is_iso9660(part):
                part.unlink(missing_ok=True)
                flash(f"{form.iso.data.filename} is not an ISO 9660 image.", "error")
            else:
                final = part.with_suffix(".iso")
                part.replace(final)
                iso = IsoImage(name=name, path=str(final), size_bytes=size, sha256=digest.hexdigest(),
                               created_by_id=current_user.id)
                db.session.add(iso)
                db.session.flush()
                actionlog.record("iso-added", target=iso, detail=f"{size} bytes")
                db.session.commit()
                flash(f"Added the ISO image {name}.", "success")
                return redirect(url_for("library.index"))
    status = 400 if form.is_submitted() else 200
    return render_template("library/upload_iso.html", form=form), status


def _is_iso9660(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(0x8001)
        return fh.read(5) == b"CD001"


class ImportOvaForm(FlaskForm):
    name = StringField("Name (empty: the name in the OVF)", validators=[Optional(), _name_rule])
    description = TextAreaField("Description", validators=[Optional(), Length(max=2000)])
    ova = FileField("OVA package", validators=[FileRequired()])


@bp.route("/appliances/import-ova", methods=["GET", "POST"])
@login_required
@manager_required
def import_ova():
    form = ImportOvaForm()
    if form.validate_on_submit():
        try:
            name = library_mod.check_ova_name(form.name.data or "")
        except library_mod.LibraryError as exc:
            flash(str(exc), "error")
        else:
            sub, folder = library_mod.submit_ova(form.ova.data, {"name": name, "description": form.description.data},
                                                 current_user.id)
            task = launch(sub, not_started=lambda: shutil.rmtree(folder, ignore_errors=True))
            if task is not None:
                return redirect(url_for("tasks.detail", task_id=task.id))
    status = 400 if form.is_submitted() else 200
    return render_template("library/import_ova.html", form=form), status


@bp.route("/catalog", methods=["GET", "POST"])
@login_required
@manager_required
def catalog_page():
    from .. import catalog
    from ..jobs.library import refresh_catalog

    state = catalog.load()
    if request.method == "POST":
        try:
            state["url"] = catalog.check_url(request.form.get("url", ""))
        except catalog.CatalogError as exc:
            flash(str(exc), "error")
            return render_template("library/catalog.html", state=state, existing=set()), 400
        catalog.save(state)
        sub = tasks.submit("catalog-refresh", refresh_catalog, title=f"Fetch the catalog {state['url']}",
                           requester_id=current_user.id, key="catalog-refresh")
        task = launch(sub)
        if task is not None:
            return redirect(url_for("tasks.detail", task_id=task.id))
    existing = set(db.session.execute(db.select(Appliance.name)).scalars())
    return render_template("library/catalog.html", state=state, existing=existing)


@bp.post("/catalog/download")
@login_required
@manager_required
def catalog_download():
    from .. import catalog
    from ..jobs.library import download_catalog_entry

    name = request.form.get("name", "")
    if not any(e["name"] == name for e in catalog.load()["entries"]):
        flash("The catalog does not offer that appliance; fetch the catalog again.", "error")
        return redirect(url_for("library.catalog_page"))
    if library_mod.appliance_exists(name):
        flash(f"The library has an appliance called {name} already.", "error")
        return redirect(url_for("library.catalog_page"))
    sub = tasks.submit("catalog-download", download_catalog_entry, title=f"Download {name} from the catalog",
                       requester_id=current_user.id, key=f"catalog-download:{name}", args=(name, current_user.id))
    task = launch(sub)
    if task is None:
        return redirect(url_for("library.catalog_page"))
    return redirect(url_for("tasks.detail", task_id=task.id))

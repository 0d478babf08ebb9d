"""Library: virtual appliances and ISO images. Everyone may browse and use."""

from __future__ import annotations

from flask import Blueprint
from flask_login import login_required
from sqlalchemy.orm import selectinload

from ..extensions import db
from ..models import Appliance, IsoImage
from ..views_common import page_or_partial, paginate

bp = Blueprint("library", __name__, url_prefix="/library")


@bp.route("/")
@login_required
def index():
    page = paginate(db.select(Appliance).options(selectinload(Appliance.disks)).order_by(Appliance.name))
    isos = db.session.execute(db.select(IsoImage).order_by(IsoImage.name)).scalars().all()
    return page_or_partial("library/index.html", "library/_appliances.html", page=page, isos=isos)

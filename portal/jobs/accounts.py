"""Jobs about users' own data."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

from ..extensions import db
from ..models import ActionLog, User
from ..shared import shared_dir
from . import Progress, task_job

BATCH = 500


def export_path(task_id: int) -> Path:
    return shared_dir("exports") / f"actionlog-{task_id}.csv"  # the web server sends what a worker wrote


@task_job
def export_actionlog(progress: Progress, user_id: int | None) -> str:
    """Write an action log (one user's, or everyone's for ``None``) as CSV.

    Steps: count the entries, write them in batches (percent and bytes as it
    goes), then checksum and move the file into place.
    """
    progress.step("Counting entries", 5)
    stmt = db.select(ActionLog).order_by(ActionLog.at, ActionLog.id)
    count_stmt = db.select(db.func.count(ActionLog.id))
    if user_id is not None:
        stmt = stmt.where(ActionLog.user_id == user_id)
        count_stmt = count_stmt.where(ActionLog.user_id == user_id)
    total = db.session.execute(count_stmt).scalar_one()
    progress.log(f"{total} entries to export.")

    progress.step("Writing entries", 10)
    final = export_path(progress.task_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_suffix(".part")
    names = dict(db.session.execute(db.select(User.id, User.username)).all())
    done = 0
    try:
        with part.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["time (UTC)", "user", "action", "target", "detail", "address", "task"])
            last_id = 0
            while True:
                rows = db.session.execute(
                    stmt.where(ActionLog.id > last_id).order_by(None).order_by(ActionLog.id).limit(BATCH)
                ).scalars().all()
                if not rows:
                    break
                for row in rows:
                    writer.writerow([
                        row.at.strftime("%Y-%m-%d %H:%M:%S"), names.get(row.user_id, ""), row.action,
                        row.target_label or "", row.detail or "", row.address or "", row.task_id or "",
                    ])
                done += len(rows)
                last_id = rows[-1].id
                progress.items(done, max(total, done), pct_from=10, pct_to=90, noun="entries")
        progress.step("Checksumming", 92)
        digest = hashlib.sha256(part.read_bytes()).hexdigest()
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    progress.log(f"Wrote {done} entries, sha256 {digest}.")
    return final.name

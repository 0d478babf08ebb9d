"""Files every worker must reach: uploads, the library, the catalog's state, exports.

They live under ``SHARED_PATH`` (default ``<instance>/shared``). Workers may
run on other machines than the web server, so that path must be the same on
every machine that runs a worker (an NFS mount, for example).
"""

from __future__ import annotations

from pathlib import Path

from flask import current_app


def shared_dir(*parts: str) -> Path:
    """The shared folder (or a folder below it), created when missing."""
    root = current_app.config.get("SHARED_PATH") or Path(current_app.instance_path) / "shared"
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

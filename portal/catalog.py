"""A published appliance catalog: a JSON index at a URL a manager configures.

Index format::

    {"appliances": [{"name": "...", "description": "...", "min_memory_mb": 256, "max_memory_mb": 2048,
                     "vcpus": 1, "disk_gb": 8,
                     "disks": [{"url": "disk0.qcow2.xz", "sha256": "...", "size_bytes": 123}]}]}

Disk URLs may be relative to the index; every one must be http(s). Entry
names follow the library's name rule. The configured URL and the last fetched
index are kept in ``<SHARED_PATH>/catalog.json`` (no network in requests; the
worker that fetches may run on another machine).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urljoin, urlparse

from flask import current_app

from .library import LibraryError, check_name
from .shared import shared_dir


class CatalogError(Exception):
    """The catalog or one of its entries is unusable, with the reason."""


def state_path() -> Path:
    return shared_dir() / "catalog.json"


def load() -> dict:
    try:
        return json.loads(state_path().read_text())
    except (FileNotFoundError, ValueError):
        return {"url": current_app.config.get("CATALOG_URL") or "", "entries": [], "fetched_at": None,
                "error": None}


def save(state: dict) -> None:
    tmp = state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(state_path())


def is_web_url(url: str) -> bool:
    """http(s) with a host: never file://, ftp:// or anything else a download library might open."""
    parsed = urlparse(url)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def check_url(url: str) -> str:
    url = url.strip()
    if not is_web_url(url):
        raise CatalogError("The catalog URL must be an http:// or https:// address.")
    return url


def parse_index(data: bytes, base_url: str) -> list[dict]:
    try:
        doc = json.loads(data)
        raw = doc["appliances"]
        assert isinstance(raw, list)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise CatalogError(f"The catalog index is not the expected JSON ({exc}).") from None
    entries = []
    for i, e in enumerate(raw):
        try:
            disks = [{"url": urljoin(base_url, d["url"]), "sha256": str(d["sha256"]).lower(),
                      "size_bytes": int(d["size_bytes"])} for d in e["disks"]]
            entry = {"name": str(e["name"]).strip(), "description": str(e.get("description") or ""),
                     "min_memory_mb": int(e["min_memory_mb"]), "max_memory_mb": int(e["max_memory_mb"]),
                     "vcpus": int(e.get("vcpus", 1)), "disk_gb": int(e.get("disk_gb") or 0), "disks": disks,
                     "size_bytes": sum(d["size_bytes"] for d in disks)}
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"Catalog entry {i + 1} is incomplete ({exc}).") from None
        try:
            check_name(entry["name"])
        except LibraryError as exc:
            raise CatalogError(f"Catalog entry {i + 1} has an unusable name: {exc}") from None
        if not 1 <= len(disks) <= 4 or any(not re.fullmatch(r"[0-9a-f]{64}", d["sha256"]) for d in disks):
            raise CatalogError(f"Catalog entry {entry['name']} needs one to four disks, each with a sha256.")
        for n, d in enumerate(disks, 1):
            if not is_web_url(d["url"]):
                raise CatalogError(f"Catalog entry {entry['name']}: disk {n} is not an http:// or https:// "
                                   f"address ({d['url'][:80]}).")
        entries.append(entry)
    return entries

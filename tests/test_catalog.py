"""The appliance catalog: a JSON index served on loopback, resumable downloads, checksums."""

from __future__ import annotations

import hashlib
import json
import lzma
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from portal.extensions import db
from portal.models import Appliance, Task
from portal.shared import shared_dir
from portal.vmm import appliance as builder
from tests.bed import Bed
from tests.conftest import run_worker_burst


class CatalogServer:
    """Serves files from a dict, honours Range, and can cut the next N transfers of a file short."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cuts: dict[str, int] = {}  # path -> how many more transfers to drop half-way
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((path, rng))
                data = outer.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if outer.cuts.get(path, 0) > 0:
                    outer.cuts[path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-transfer
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def entry(name: str, *disks: dict) -> dict:
    return {"name": name, "description": "From the catalog", "min_memory_mb": 128, "max_memory_mb": 1024,
            "vcpus": 1, "disk_gb": 1, "disks": list(disks)}


@pytest.fixture
def catalog():
    image = Path(builder.build_appliance(Bed().appliance_cache)).read_bytes()
    disk = lzma.compress(image, preset=0)
    with CatalogServer() as server:
        server.files["disks/tiny.qcow2.xz"] = disk
        server.disk = {"url": "disks/tiny.qcow2.xz", "sha256": hashlib.sha256(disk).hexdigest(),
                       "size_bytes": len(disk)}
        entries = [entry("tiny-cat", server.disk),
                   {"name": "bad-sum", "description": "Wrong checksum", "min_memory_mb": 128, "max_memory_mb": 512,
                    "vcpus": 1, "disk_gb": 1,
                    "disks": [{"url": "disks/tiny.qcow2.xz", "sha256": "0" * 64, "size_bytes": len(disk)}]}]
        server.files["index.json"] = json.dumps({"appliances": entries}).encode()
        yield server


def _task(app) -> Task:
    with app.app_context():
        t = db.session.execute(db.select(Task).order_by(Task.id.desc())).scalars().first()
        db.session.expunge(t)
        return t


def test_catalog_lists_and_downloads_with_resume(app, manager, catalog):
    assert manager.post("/library/catalog", data={"url": catalog.url + "/index.json"}).status_code == 302
    run_worker_burst()
    assert _task(app).state == "succeeded", _task(app).log
    page = manager.get("/library/catalog").get_data(as_text=True)
    assert "tiny-cat" in page and "From the catalog" in page and "128–1024 MB" in page
    catalog.cuts["disks/tiny.qcow2.xz"] = 1
    assert manager.post("/library/catalog/download", data={"name": "tiny-cat"}).status_code == 302
    run_worker_burst()
    task = _task(app)
    assert task.state == "succeeded", task.log
    assert "interrupted" in task.log and "resuming" in task.log
    ranges = [r for p, r in catalog.requests if p == "disks/tiny.qcow2.xz"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"  # resumed, not restarted
    with app.app_context():
        row = db.session.execute(db.select(Appliance).where(Appliance.name == "tiny-cat")).scalar_one()
        assert row.source == "catalog" and row.state == "ready" and row.disks[0].format == "qcow2"
    assert "in the library" in manager.get("/library/catalog").get_data(as_text=True)


def test_wrong_checksum_is_refused_and_leaves_nothing(app, manager, catalog):
    manager.post("/library/catalog", data={"url": catalog.url + "/index.json"})
    run_worker_burst()
    manager.post("/library/catalog/download", data={"name": "bad-sum"})
    run_worker_burst()
    task = _task(app)
    assert task.state == "failed" and "does not match the catalog's sha256" in task.error
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Appliance.id))).scalar_one() == 0
    with app.app_context():
        root = shared_dir()
    assert not [p for p in root.rglob("*") if p.is_file() and p.name != "catalog.json"]


@pytest.mark.parametrize("url, message", [("ftp://example.org/x.json", "http:// or https://"),
                                          ("not a url", "http:// or https://")])
def test_bad_catalog_urls(app, manager, url, message):
    r = manager.post("/library/catalog", data={"url": url})
    assert r.status_code == 400 and message in r.get_data(as_text=True)


def test_unreadable_index_is_reported(app, manager, catalog):
    catalog.files["broken.json"] = b"{not json"
    manager.post("/library/catalog", data={"url": catalog.url + "/broken.json"})
    run_worker_burst()
    assert _task(app).state == "failed"
    assert "not the expected JSON" in manager.get("/library/catalog").get_data(as_text=True)


def test_a_download_that_succeeds_on_its_last_attempt_succeeds(app, manager, catalog):
    from portal.jobs.library import DOWNLOAD_ATTEMPTS

    manager.post("/library/catalog", data={"url": catalog.url + "/index.json"})
    run_worker_burst()
    catalog.cuts["disks/tiny.qcow2.xz"] = DOWNLOAD_ATTEMPTS - 1
    manager.post("/library/catalog/download", data={"name": "tiny-cat"})
    run_worker_burst()
    task = _task(app)
    assert task.state == "succeeded", task.log
    assert task.log.count("interrupted") == DOWNLOAD_ATTEMPTS - 1
    assert len([p for p, _ in catalog.requests if p == "disks/tiny.qcow2.xz"]) == DOWNLOAD_ATTEMPTS
    with app.app_context():
        assert db.session.execute(db.select(Appliance.state).where(Appliance.name == "tiny-cat")).scalar_one() == "ready"


@pytest.mark.parametrize("second_url, name, message", [
    ("file:///etc/passwd", "two-disks", "disk 2 is not an http:// or https:// address"),
    ("ftp://127.0.0.1/disk1", "two-disks", "disk 2 is not an http:// or https:// address"),
    ("disks/tiny.qcow2.xz", "<img src=x onerror=alert(1)>", "unusable name"),
    ("disks/tiny.qcow2.xz", "');alert(1);('", "unusable name"),
])
def test_an_index_with_an_unusable_entry_is_refused_when_read(app, manager, catalog, second_url, name, message):
    catalog.files["bad.json"] = json.dumps({"appliances": [
        entry(name, catalog.disk, {**catalog.disk, "url": second_url})]}).encode()
    manager.post("/library/catalog", data={"url": catalog.url + "/bad.json"})
    run_worker_burst()
    task = _task(app)
    assert task.state == "failed" and message in task.error, task.error
    assert message in manager.get("/library/catalog").get_data(as_text=True)
    assert [p for p, _ in catalog.requests] == ["bad.json"]  # nothing downloaded

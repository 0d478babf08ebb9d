"""Schemathesis against a live portal (threaded WSGI server on loopback) with a manager's token: no 500s,
every status code, content type, header and body as the OpenAPI document says. Bounded: few examples each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from portal import api_tokens
from portal.extensions import db
from portal.models import Appliance, IsoImage, Role
from tests.conftest import log_in_client, make_server, make_task, make_user, make_vm

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance")


def test_schemathesis_finds_no_server_errors_and_no_drift(app, live_server, tmp_path):
    app.config.update(API_RATE_LIMIT=0, API_MAX_WAIT_SECONDS=1)
    with app.app_context():
        boss = make_user("boss", Role.MANAGER)
        user = make_user("ursula", Role.POWER)
        server = make_server("srvst")
        vm = make_vm(user, "st1", server=server)
        make_task(user, target=vm, state="running")
        db.session.add_all([Appliance(name="st-app", state="ready"), IsoImage(name="st-iso", path="/x.iso")])
        db.session.commit()
        secret = api_tokens.create(boss, name="schemathesis", scope="write", expires_in_days=1)[1]
        db.session.commit()
    exe = Path(sys.executable).with_name("schemathesis")
    proc = subprocess.run(
        [str(exe), "run", f"{live_server}/api/v1/openapi.json", "--url", f"{live_server}/api/v1",
         "-H", f"Authorization: Bearer {secret}", "--checks", CHECKS, "--max-examples", "8", "--seed", "12",
         "--phases", "examples,coverage,fuzzing,stateful", "--workers", "1", "--generation-database", "none",
         "--request-timeout", "20", "--no-color", "--report", "junit",
         "--report-junit-path", str(tmp_path / "junit.xml")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    print(proc.stdout[-1500:])  # the run's summary, with -s
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_uploads_document_their_multipart_bodies(app, client):
    """The two upload operations name their form fields and file parts (a client can be generated)."""
    with app.app_context():
        make_user("reader")
    log_in_client(client, "reader")
    doc = client.get("/api/v1/openapi.json").get_json()
    upload = doc["paths"]["/library/appliances"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["disks"]["type"] == "array" and {"name", "disks"} <= set(upload["required"])
    assert upload["properties"]["vcpus"]["type"] == "integer"
    ova = doc["paths"]["/library/appliances/ova"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert ova["required"] == ["ova"] and ova["properties"]["ova"]["contentMediaType"] == "application/octet-stream"

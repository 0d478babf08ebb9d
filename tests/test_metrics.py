"""/metrics: access by token or allow-list, and every family parsed with prometheus_client's own parser,
including under a real gunicorn with two worker processes (counts agree whichever worker answers)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from portal import metrics
from portal.extensions import db, queues
from portal.models import LiveSync, Role, ServerStatus, Task, utcnow
from tests.conftest import free_port, make_server, make_user, make_vm, stop_process


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def seed(app) -> None:
    with app.app_context():
        user = make_user("mia", Role.POWER)
        up, down = make_server("m-up"), make_server("m-down", status=ServerStatus.DOWN.value)
        a = make_vm(user, "m1", server=up, state="running")
        make_vm(user, "m2", server=up)
        make_vm(user, "m3", server=down)
        db.session.add(LiveSync(vm_id=a.id, state="in_sync", home_server_id=up.id))
        now = utcnow()
        for seconds, state in ((4, "succeeded"), (6, "succeeded"), (1, "failed")):
            db.session.add(Task(kind="vm-start", title="t", state=state, log="", requester_id=user.id,
                                started_at=now - timedelta(seconds=seconds), finished_at=now))
        db.session.commit()
        queues.queue().enqueue("builtins.print", "never run")  # no worker: it waits in the queue
        metrics.observe_poll(2.5)
        metrics.set_gauge("monitor_connections", 2)


def test_metrics_parse_and_count(app, client):
    seed(app)
    client.post("/login", data={"username": "mia", "password": "wrong"})  # CSRF refuses: no failure counted
    app.config["WTF_CSRF_ENABLED"] = False  # this test is about counting, CSRF has its own tests
    client.post("/login", data={"username": "mia", "password": "wrong"})
    time.sleep(0.01)
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    got = samples(resp.get_data(as_text=True))
    assert got[("corral_servers", (("state", "up"),))] == 1 and got[("corral_servers", (("state", "down"),))] == 1
    assert got[("corral_vms", (("server", "m-up"), ("state", "running")))] == 1
    assert got[("corral_vms", (("server", "m-down"), ("state", "off")))] == 1
    assert got[("corral_livesync", (("state", "in_sync"),))] == 1
    assert got[("corral_tasks", (("kind", "vm-start"), ("state", "succeeded")))] == 2
    key = (("kind", "vm-start"), ("outcome", "succeeded"))
    assert got[("corral_task_duration_seconds_count", key)] == 2
    assert abs(got[("corral_task_duration_seconds_sum", key)] - 10) < 0.5
    queue = app.config["QUEUE_PREFIX"] + "-default"
    assert got[("corral_queue_depth", (("queue", queue),))] == 1
    assert got[("corral_queue_oldest_job_age_seconds", (("queue", queue),))] >= 0
    assert got[("corral_poll_cycle_seconds", ())] == 2.5 and got[("corral_poll_cycles_total", ())] == 1
    assert got[("corral_monitor_connections", ())] == 2
    assert got[("corral_login_failures_total", ())] == 1


def test_metrics_access_by_token_or_allow_list(app, client):
    app.config.update(METRICS_ALLOW="", METRICS_TOKEN="s3cret-scrape")
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"}).status_code == 200
    app.config.update(METRICS_ALLOW="10.0.0.0/8, 127.0.0.0/8", METRICS_TOKEN=None)
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", environ_overrides={"REMOTE_ADDR": "192.0.2.7"}).status_code == 403


def test_metrics_under_gunicorn_with_two_workers(app, tmp_path):
    seed(app)
    port = free_port()
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    proc = subprocess.Popen([gunicorn, "-w", "2", "-b", f"127.0.0.1:{port}", "wsgi:app"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                requests.get(f"{base}/login", timeout=30)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        for n in range(6):  # fresh sessions: each request may land on either worker
            s = requests.Session()
            token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', s.get(f"{base}/login", timeout=5).text)[1]
            s.post(f"{base}/login", data={"username": f"nobody{n}", "password": "x", "csrf_token": token}, timeout=10)
        counts = {samples(requests.get(f"{base}/metrics", timeout=10).text)[("corral_login_failures_total", ())]
                  for _ in range(6)}
        assert counts == {6.0}
    finally:
        stop_process(proc)

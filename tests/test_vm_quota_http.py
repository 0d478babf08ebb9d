"""Parallel create requests from one power user never exceed the quota (real HTTP, threads)."""

from __future__ import annotations

import re
import threading
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

from portal.extensions import db
from portal.models import VM, Appliance, ApplianceDisk, Role
from tests.conftest import PASSWORD, make_server, make_user


def _session(base: str):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    page = opener.open(base + "/login").read().decode()
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    opener.open(base + "/login", urllib.parse.urlencode(
        {"username": "pow", "password": PASSWORD, "csrf_token": token}).encode())
    return opener


def test_parallel_create_requests_stop_at_the_quota(app, live_server):
    with app.app_context():
        make_user("pow", Role.POWER, max_vms=2, max_memory_mb=4096, max_disk_gb=100)
        make_server()
        row = Appliance(name="tiny", min_memory_mb=128, max_memory_mb=512, state="ready")
        db.session.add(row)
        db.session.flush()
        db.session.add(ApplianceDisk(appliance_id=row.id, position=0, path="/nonexistent.qcow2",
                                     virtual_size_bytes=1 << 30, file_size_bytes=1 << 20, sha256="0" * 64))
        db.session.commit()
        appliance_id = row.id
    n = 6
    openers = [_session(live_server) for _ in range(n)]
    barrier = threading.Barrier(n)
    outcomes: list[str] = []

    def create(i: int):
        opener = openers[i]
        page = opener.open(live_server + "/vms/new").read().decode()
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
        data = urllib.parse.urlencode({"name": f"q{i}", "appliance": appliance_id, "memory_mb": 256, "vcpus": 1,
                                       "placement": "auto", "csrf_token": token}).encode()
        barrier.wait()
        try:
            resp = opener.open(live_server + "/vms/new", data)
            outcomes.append("created" if "/tasks/" in resp.geturl() else "refused?")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            outcomes.append("quota" if "Quota exceeded for pow" in body else f"other {exc.code}")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] * 2 + ["quota"] * (n - 2), outcomes
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(VM.id))).scalar_one() == 2

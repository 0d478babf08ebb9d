"""The JSON API next to the pages, with 20,000 VMs in the database.

    flock /tmp/corral-bed.lock .venv/bin/python bench/api.py [--requests 60] [--rounds 5] [--no-bed]

1. ``GET /api/v1/vms?limit=50`` (manager's bearer token) and the HTML VM list ``GET /vms/`` (the same
   manager's session), alternating in one run on one instance seeded like bench/pages.py's large one
   (20,000 VMs, 1,000 servers, 200 users). Server time through Flask's test client, median and p95;
   goal: the API is not slower than the page.
2. A power action round trip, request to task finished: ``POST /api/v1/vms/<id>/power`` then
   ``GET /api/v1/tasks/<id>?wait=30`` until it ends, with a real worker, for the test guest on a
   test-bed server registered into the same 20k database (start, then power off). Raw baseline: the
   same ``virsh start``/``virsh destroy`` over the bed server's qemu+tcp connection.

The seeded servers are marked down (never polled or contacted); only the bed server is up.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pages import LARGE, percentile, seed  # noqa: E402
from bench.provision import _instance, _redis  # noqa: E402
from portal import api_tokens  # noqa: E402
from portal.auth_core import hash_password  # noqa: E402
from portal.extensions import db  # noqa: E402
from portal.models import Server, ServerDisk, ServerStatus, User  # noqa: E402

NAME = "bm-api"


def _line(label: str, values: list[float]) -> str:
    return (f"  {label:<44} median {statistics.median(values) * 1000:8.1f} ms   "
            f"p95 {percentile(values, 95) * 1000:8.1f} ms   (n={len(values)})")


def lists(app, requests: int, warmup: int) -> tuple[list[float], list[float], str]:
    with app.app_context():
        manager = db.session.get(User, 1)
        secret = api_tokens.create(manager, name="bench", scope="write", expires_in_days=1)[1]
        db.session.commit()
        session_token = manager.get_id()
    api_client, page_client = app.test_client(), app.test_client()
    with page_client.session_transaction() as sess:
        sess["_user_id"], sess["_fresh"] = session_token, True
    headers = {"Authorization": f"Bearer {secret}"}
    api, page = [], []
    for i in range(warmup + requests):
        for client, url, out, kw in ((api_client, "/api/v1/vms?limit=50", api, {"headers": headers}),
                                     (page_client, "/vms/", page, {})):
            t0 = time.perf_counter()
            resp = client.get(url, **kw)
            elapsed = time.perf_counter() - t0
            assert resp.status_code == 200, (url, resp.status_code)
            if i >= warmup:
                out.append(elapsed)
    return api, page, secret


def power_round_trips(app, secret: str, rounds: int) -> dict[str, list[float]]:
    from tests.bed import Bed
    from tests.conftest import register_bed_server

    bed = Bed()
    bs = bed.up(n=max(1, len(bed.servers() or [])))[0]
    worker = None
    out: dict[str, list[float]] = {"start": [], "poweroff": [], "raw start": [], "raw destroy": []}
    headers = {"Authorization": f"Bearer {secret}"}
    client = app.test_client()
    try:
        sid = register_bed_server(app, bs)
        with app.app_context():
            app.config["APPLIANCE_CACHE"] = str(bed.appliance_cache)
            from portal import library

            appliance_id = library.ensure_test_appliance().id
            disk_id = db.session.execute(db.select(ServerDisk.id).where(ServerDisk.server_id == sid)).scalar_one()
            db.session.commit()
        log = open(Path(os.environ["CORRAL_INSTANCE_PATH"]) / "worker.log", "w")
        worker = subprocess.Popen([sys.executable, "-m", "portal", "worker"], stdout=log, stderr=subprocess.STDOUT)

        def call(method: str, url: str, body: dict | None = None) -> dict:
            resp = client.open(url, method=method, json=body, headers=headers)
            assert resp.status_code in (200, 202), (url, resp.status_code, resp.get_data(as_text=True))
            return resp.get_json()

        def until_done(accepted: dict) -> dict:
            task = accepted["task"]
            while task["state"] in ("queued", "running"):
                task = call("GET", f"{accepted['task_url']}?wait=30")
            assert task["state"] == "succeeded", task
            return task

        vm = until_done(call("POST", "/api/v1/vms", {"name": NAME, "appliance_id": appliance_id, "memory_mb": 256,
                                                      "server_disk_id": disk_id}))
        vm_id = vm["target_id"]
        virsh = ["virsh", "-c", bs.uri_tcp]
        for _ in range(rounds):
            for action in ("start", "poweroff"):
                t0 = time.perf_counter()
                until_done(call("POST", f"/api/v1/vms/{vm_id}/power", {"action": action}))
                out[action].append(time.perf_counter() - t0)
        for _ in range(rounds):
            for label, argv in (("raw start", [*virsh, "start", NAME]), ("raw destroy", [*virsh, "destroy", NAME])):
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True)
                out[label].append(time.perf_counter() - t0)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        subprocess.run(["virsh", "-c", bs.uri_tcp, "destroy", NAME], capture_output=True)
        subprocess.run(["virsh", "-c", bs.uri_tcp, "undefine", "--managed-save", NAME], capture_output=True)
        subprocess.run(["rm", "-rf", str(bs.host_path(f"{bs.disk_dir}/corral-vms")),
                        str(bs.host_path(f"{bs.disk_dir}/corral-bases"))])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-bed", action="store_true", help="only the list requests (no test bed, no worker)")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="corral-bench-api-"))
    redis_proc, redis_url = _redis(root)
    try:
        os.environ["CORRAL_API_RATE_LIMIT"] = "0"
        app = _instance(root, redis_url)
        with app.app_context():
            t0 = time.perf_counter()
            counts = seed(LARGE, hash_password("bench-password"), random.Random(20_000 + LARGE.vms)).counts
            db.session.execute(db.update(Server).values(status=ServerStatus.MARKED_DOWN.value))  # never contacted
            db.session.commit()
            seeded = time.perf_counter() - t0
        print(f"Corral API benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
              f"{counts['VMs']} VMs, {counts['servers']} servers, {counts['users']} users (seeded in {seeded:.0f} s)")
        api, page, secret = lists(app, args.requests, args.warmup)
        print("VM list, first page of 50 (manager, who sees all 20,000):")
        print(_line("GET /api/v1/vms?limit=50 (bearer token)", api))
        print(_line("GET /vms/ (HTML page, session)", page))
        print(f"  ratio API / page (median): {statistics.median(api) / statistics.median(page):.2f} (goal <= 1)")
        if not args.no_bed:
            trips = power_round_trips(app, secret, args.rounds)
            print("Power action round trip, request to task finished (test guest on a bed server, real worker):")
            for label in ("start", "poweroff"):
                print(_line(f"API {label} (POST, then GET ?wait=30)", trips[label]))
            print(_line("raw virsh start", trips["raw start"]))
            print(_line("raw virsh destroy", trips["raw destroy"]))
            print(f"  ratio API start / raw start (median): "
                  f"{statistics.median(trips['start']) / statistics.median(trips['raw start']):.2f}")
    finally:
        redis_proc.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

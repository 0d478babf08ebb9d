"""Virtual clusters on the bed: a frontend and two computes over two servers (linked clones, 128-256 MiB),
driven with corral-cli against a live portal and a real worker: created in one task, started frontend first,
listed with ``list cluster status=y``, the frontend reaching a compute on the other server over their VLAN,
removed leaving nothing on any server. A creation that fails on one server removes what it made on both."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from portal import api_tokens
from portal.extensions import db
from portal.models import VM, Network, Task, User, VirtualCluster
from tests.conftest import run_worker_burst
from tests.vm_util import serial_command, wait_serial

CLI = str(Path(sys.executable).with_name("corral-cli"))
pytestmark = pytest.mark.bed


def _cli(url: str, token: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({"XDG_CONFIG_HOME": str(home), "CORRAL_URL": url, "CORRAL_TOKEN": token})
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=180)


def _curl(bed, index: int, url: str) -> str | None:
    r = bed.exec(index, ["curl", "-s", "--connect-timeout", "3", "--max-time", "5", url], check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def _domains(bs) -> list[str]:
    return subprocess.run(["virsh", "-c", bs.uri_tcp, "list", "--all", "--name"], capture_output=True, text=True,
                          check=True).stdout.split()


def _assert_nothing_left(app, bed, bed_servers, prefix: str, vlan: int) -> None:
    for bs in bed_servers:
        assert not [d for d in _domains(bs) if d.startswith(prefix)], bs.name
        vm_dirs = bs.host_path(f"{bs.disk_dir}/corral-vms")
        assert not (vm_dirs.exists() and [p for p in vm_dirs.iterdir() if p.name.startswith(prefix)]), bs.name
        bases = bs.host_path(f"{bs.disk_dir}/corral-bases")
        assert not (bases.exists() and list(bases.iterdir())), f"cached bases left on {bs.name}"
        links = bed.exec(bs.index, ["ip", "-o", "link", "show"]).stdout
        assert not re.search(rf"\b(cbr|cx|cv){vlan}\b", links), (bs.name, links)
    with app.app_context():
        assert db.session.execute(db.select(VM).where(VM.name.startswith(prefix))).first() is None
        assert db.session.execute(db.select(VirtualCluster)).first() is None
        assert db.session.execute(db.select(Network).where(Network.vlan == vlan)).first() is None


def test_cluster_lives_its_life_through_the_cli(app, bed, bed_servers, bed_portal, live_server, worker, tmp_path):
    s1, s2 = bed_servers[:2]
    sid1, sid2 = bed_portal["servers"]
    with app.app_context():
        pow_ = db.session.execute(db.select(User).where(User.username == "pow")).scalar_one()
        token = api_tokens.create(pow_, name="bed", scope="write", expires_in_days=1)[1]
        db.session.commit()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return _cli(live_server, token, tmp_path, *args)

    made = cli("add", "cluster", "t-cl.bed.test", "137.110.119.118", "2", f"appliance={bed_portal['appliance']}",
               "mem=128", "fe-mem=256", f"servers={sid1},{sid2}")
    assert made.returncode == 0 and "succeeded" in made.stdout, (made.stdout, made.stderr)
    with app.app_context():
        cluster = db.session.execute(db.select(VirtualCluster)).scalar_one()
        vlan, cluster_id = cluster.vlan, cluster.id
        task = db.session.execute(db.select(Task).where(Task.kind == "cluster-create")).scalar_one()
        assert "disks and domains" in task.log and "as vxlan" in task.log, task.log
    # round robin: the frontend and compute 1 on the first server, compute 0 on the second; Rocks MACs
    assert sorted(d for d in _domains(s1) if d.startswith("t-cl")) == ["t-cl", "t-cl-1"]
    assert [d for d in _domains(s2) if d.startswith("t-cl")] == ["t-cl-0"]
    assert "76:77:6e:80:00:00" in bed.virsh(s1.index, "dumpxml", "t-cl").stdout
    assert "76:77:6e:80:00:02" in bed.virsh(s2.index, "dumpxml", "t-cl-0").stdout
    overlay = bed.exec(s2.index, ["qemu-img", "info", f"{s2.disk_dir}/corral-vms/t-cl-0/disk0.qcow2"]).stdout
    assert "backing file:" in overlay  # a linked clone

    started = cli("start", "cluster", "t-cl")
    assert started.returncode == 0, (started.stdout, started.stderr)
    with app.app_context():
        log = db.session.execute(db.select(Task).where(Task.kind == "cluster-start")).scalar_one().log
    assert log.index("Start: t-cl (1 of 3)") < log.index("Start: t-cl-0 (2 of 3)") < log.index("t-cl-1 (3 of 3)")
    listed = cli("list", "cluster", "status=y").stdout.splitlines()
    assert listed[0].split() == ["FRONTEND", "CLIENT", "NODES", "TYPE", "HOST", "MAC", "STATUS"]
    assert re.match(rf"t-cl\.bed\.test:\s+-----\s+VM\s+{s1.name}\s+76:77:6e:80:00:00\s+running$", listed[1])
    assert re.match(rf"-+:\s+t-cl-0\s+VM\s+{s2.name}\s+76:77:6e:80:00:02\s+running$", listed[2])
    assert re.match(rf"-+:\s+t-cl-1\s+VM\s+{s1.name}\s+76:77:6e:80:00:03\s+running$", listed[3])

    # the guests take their private addresses from the reservations (corral.ip); a probe address on the
    # first server's cluster bridge reaches the frontend there and compute 0 on the other server over the VLAN
    wait_serial(s1, "t-cl", lambda t: "CORRAL-READY" in t)
    wait_serial(s2, "t-cl-0", lambda t: "CORRAL-READY" in t)
    bed.exec(s1.index, ["ip", "addr", "add", "10.1.0.250/16", "dev", f"cbr{vlan}"])
    assert _curl(bed, s1.index, "http://10.1.1.1/") == "t-cl"
    assert _curl(bed, s1.index, "http://10.1.255.254/") == "t-cl-0"
    # and guest to guest: the frontend (bed1) fetches compute 0's page (bed2) over the VLAN from its serial shell
    out = serial_command(bed, s1, "t-cl", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.1.255.254 80 | "
                                          "sed 's/^/BODY-/'; echo DONE-$((40+2))", r"DONE-42", timeout=60)
    assert "BODY-t-cl-0" in out, out

    # a compute more (on the server with fewer of the cluster's VMs, the next MAC), then removed again
    def act(body: dict) -> dict:
        headers = {"Authorization": f"Bearer {token}"}
        resp = requests.post(f"{live_server}/api/v1/clusters/{cluster_id}/actions", json=body, headers=headers,
                             timeout=30)
        assert resp.status_code == 202, resp.text
        return requests.get(f"{live_server}{resp.json()['task_url']}?wait=60", headers=headers, timeout=90).json()

    task = act({"action": "add-computes", "count": 1})
    assert task["state"] == "succeeded", task
    assert "t-cl-2" in _domains(s2) and "76:77:6e:80:00:04" in bed.virsh(s2.index, "dumpxml", "t-cl-2").stdout
    task = act({"action": "remove-compute", "compute": "t-cl-2"})
    assert task["state"] == "succeeded", task
    assert "t-cl-2" not in _domains(s2) and not s2.host_path(f"{s2.disk_dir}/corral-vms/t-cl-2").exists()

    removed = cli("remove", "cluster", "t-cl.bed.test")
    assert removed.returncode == 0, (removed.stdout, removed.stderr)
    _assert_nothing_left(app, bed, bed_servers, "t-cl", vlan)
    assert cli("list", "cluster").stdout.splitlines()[1:] == []


def test_a_failure_on_one_server_removes_everything_on_all(app, client, bed, bed_servers, bed_portal):
    """Compute 0's folder on the second server is blocked by a file: that server's share fails while the
    first server's succeeds; the task removes the VMs, disks, bases, network and VLAN it made on both."""
    s1, s2 = bed_servers[:2]
    blocker = s2.host_path(f"{s2.disk_dir}/corral-vms/t-cf-0")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way\n")
    r = client.post("/clusters/new", data={
        "fqdn": "t-cf.bed.test", "public_ip": "137.110.119.119", "computes": "2",
        "appliance": str(bed_portal["appliance"]), "frontend_memory_mb": "128", "compute_memory_mb": "128",
        "servers": [str(s) for s in bed_portal["servers"]], "clone": "y", "clone_field": "1"})
    assert r.status_code == 302, r.get_data(as_text=True)
    with app.app_context():
        vlan = db.session.execute(db.select(VirtualCluster.vlan)).scalar_one()
    run_worker_burst()
    with app.app_context():
        task = db.session.execute(db.select(Task).where(Task.kind == "cluster-create")).scalar_one()
        assert task.state == "failed", task.log
        assert "removing everything this task made" in task.log
    assert not blocker.exists()
    _assert_nothing_left(app, bed, bed_servers, "t-cf", vlan)

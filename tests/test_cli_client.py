"""corral-cli, run as a real process against a live portal (threaded WSGI on loopback): its tables and JSON
agree with the API, its verbs reach the same rules, and its exit codes tell scripts what happened."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from portal import api_tokens
from portal.extensions import db
from portal.models import NIC, Role
from tests.conftest import free_port, make_server, make_user, make_vm

CLI = str(Path(sys.executable).with_name("corral-cli"))


@pytest.fixture
def portal(app, live_server, tmp_path):
    with app.app_context():
        boss = make_user("boss", Role.MANAGER)
        pat = make_user("pat", Role.POWER, max_vms=5, max_memory_mb=8192, max_disk_gb=100)
        s1, s2 = make_server("node-a"), make_server("node-b")
        a = make_vm(pat, "web1", server=s1, state="running")
        make_vm(pat, "db1", server=s2)
        make_vm(boss, "mgr1", server=s1)
        db.session.add(NIC(vm_id=a.id, position=1, mac="52:54:00:aa:bb:cc"))
        db.session.commit()
        tokens = {"boss": api_tokens.create(boss, name="cli", scope="write", expires_in_days=None)[1],
                  "pat": api_tokens.create(pat, name="cli", scope="write", expires_in_days=None)[1]}
        db.session.commit()
        servers = {"node-a": s1.id, "node-b": s2.id}
    return {"url": live_server, "tokens": tokens, "home": tmp_path, "servers": servers}


def cli(portal, *args: str, who: str = "boss", env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    base.update({"XDG_CONFIG_HOME": str(portal["home"]), "CORRAL_URL": portal["url"],
                 "CORRAL_TOKEN": portal["tokens"][who], **(env or {})})
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=base, timeout=60)


def api(portal, path: str, who: str = "boss") -> dict:
    return requests.get(f"{portal['url']}/api/v1{path}", timeout=10,
                        headers={"Authorization": f"Bearer {portal['tokens'][who]}"}).json()


def test_listings_match_the_api(portal):
    got = cli(portal, "--json", "list", "host", "vm")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == sorted(api(portal, "/vms")["items"], key=lambda v: v["name"])
    table = cli(portal, "list", "host", "vm", "status=y").stdout.splitlines()
    assert table[0].split() == ["VM-HOST", "VMID", "MEM", "CPUS", "DISK", "MAC", "HOST", "STATUS"]
    rows = [line.split() for line in table[1:]]
    assert [r[0] for r in rows] == ["db1:", "mgr1:", "web1:", "web1:"]  # web1's second NIC on its own line
    assert rows[2][-1] == "running" and rows[3][1:] == ["-----"] * 4 + ["52:54:00:aa:bb:cc", "-----", "-----"]
    # Columns are aligned: every row's MAC starts where the header's does.
    col = table[0].index("MAC")
    assert all(line[col:col + 2] in ("52", "--") for line in table[1:])
    only_a = cli(portal, "list", "host", "vm", "node-a").stdout
    assert "web1:" in only_a and "db1:" not in only_a and "STATUS" not in only_a
    hosts = cli(portal, "list", "host").stdout.splitlines()
    servers = api(portal, "/servers")["items"]
    assert [line.split()[0] for line in hosts[1:]] == [f"{s['hostname']}:" for s in servers]
    assert [int(line.split()[5]) for line in hosts[1:]] == [s["vm_count"] for s in servers] == [2, 1]
    mine = json.loads(cli(portal, "--json", "list", "host", "vm", who="pat").stdout)
    assert [v["name"] for v in mine] == ["db1", "web1"]  # a power user sees their own only


def test_verbs_reach_the_portals_rules_and_exit_codes_tell_what_happened(portal):
    started = cli(portal, "--json", "--no-wait", "start", "host", "vm", "db1", who="pat")
    assert started.returncode == 0, started.stderr
    task = json.loads(started.stdout)
    assert task["kind"] == "vm-start" and api(portal, f"/tasks/{task['id']}", who="pat")["state"] == "queued"
    busy = cli(portal, "--no-wait", "start", "host", "vm", "db1", who="pat")
    assert busy.returncode == 1 and "busy" in busy.stderr
    refused = cli(portal, "resume", "host", "vm", "web1", who="pat")  # running, not paused
    assert refused.returncode == 1 and "[refused]" in refused.stderr
    stop = cli(portal, "--json", "--no-wait", "stop", "host", "vm", "web1", who="pat")
    assert json.loads(stop.stdout)["kind"] == "vm-poweroff"  # Rocks' stop pulls the plug
    assert cli(portal, "--no-wait", "set", "host", "vm", "mgr1", "mem=2048", "cpus=2", "disksize=12").returncode == 0
    vm = [v for v in api(portal, "/vms")["items"] if v["name"] == "mgr1"][0]
    assert (vm["memory_mb"], vm["vcpus"], vm["disks"][0]["size_gb"]) == (2048, 2, 12)
    assert cli(portal, "set", "host", "vm", "mgr1", "mem=lots").returncode == 2
    moved = cli(portal, "--json", "--no-wait", "move", "host", "vm", "db1", str(portal["servers"]["node-a"]), who="pat")
    # A power user names the target by id (listing servers is not theirs); the move rules answer (this
    # fixture's VMs have no VM disk recorded; the bed test moves a real one).
    assert moved.returncode == 1 and "db1 has no server or VM disk recorded" in moved.stderr
    assert cli(portal, "list", "host", who="pat").returncode == 1  # servers are the managers'
    assert cli(portal, "start", "host", "vm", "nosuch").returncode == 1
    assert cli(portal, "fly", "host").returncode == 2
    assert cli(portal, "list", "host", env={"CORRAL_TOKEN": "corral_wrong"}).returncode == 4
    assert cli(portal, "list", "host", env={"CORRAL_URL": f"http://127.0.0.1:{free_port()}"}).returncode == 5


def test_config_file(portal):
    (portal["home"] / "corral").mkdir()
    (portal["home"] / "corral" / "config").write_text(
        f"[corral]\nurl = {portal['url']}\ntoken = {portal['tokens']['pat']}\n")
    got = cli(portal, "--json", "list", "host", "vm", env={"CORRAL_URL": "", "CORRAL_TOKEN": ""})
    assert got.returncode == 0, got.stderr
    assert [v["name"] for v in json.loads(got.stdout)] == ["db1", "web1"]
    (portal["home"] / "corral" / "config").unlink()
    assert cli(portal, "list", "host", env={"CORRAL_URL": "", "CORRAL_TOKEN": ""}).returncode == 4


@pytest.mark.bed
def test_a_vm_lives_its_life_through_the_cli(app, bed_portal, bed_servers, live_server, worker, tmp_path):
    """Created through the API, then operated only with corral-cli (which waits for each task) on the bed."""
    from tests.vm_util import domstate, vm_row

    with app.app_context():
        boss = make_user("boss", Role.MANAGER)
        secret = api_tokens.create(boss, name="bed", scope="write", expires_in_days=1)[1]
        db.session.commit()
    portal = {"url": live_server, "tokens": {"boss": secret}, "home": tmp_path}
    first, second = bed_servers[:2]
    resp = requests.post(f"{live_server}/api/v1/vms", timeout=30, headers={"Authorization": f"Bearer {secret}"},
                         json={"name": "t-cli", "appliance_id": bed_portal["appliance"], "memory_mb": 256,
                               "server_disk_id": bed_portal["disks"][bed_portal["servers"][0]]})
    assert resp.status_code == 202, resp.text
    assert requests.get(f"{live_server}{resp.json()['task_url']}?wait=30", timeout=60,
                        headers={"Authorization": f"Bearer {secret}"}).json()["state"] in ("running", "succeeded")

    def step(*words: str, state: str) -> None:
        got = cli(portal, *words, "host", "vm", "t-cli")
        assert got.returncode == 0, (words, got.stdout, got.stderr)
        assert vm_row(app, "t-cli").state == state, words

    for _ in range(120):  # the create task: corral-cli would wait for it the same way
        if vm_row(app, "t-cli").state == "off":
            break
        time.sleep(0.5)
    step("start", state="running")
    step("pause", state="paused")
    assert domstate(first, "t-cli") == "paused"
    step("resume", state="running")
    step("save", state="saved")
    step("restore", state="running")
    step("stop", state="off")
    assert cli(portal, "set", "host", "vm", "t-cli", "mem=320").returncode == 0
    assert vm_row(app, "t-cli").memory_mb == 320
    listed = cli(portal, "list", "host", "vm", first.name, "status=y").stdout
    assert re.search(r"^t-cli:\s+\d+\s+320\s+1\s+\d+\s+\S+\s+" + re.escape(first.name) + r"\s+off$", listed, re.M)
    moved = cli(portal, "move", "host", "vm", "t-cli", second.name)
    assert moved.returncode == 0, moved.stderr
    assert vm_row(app, "t-cli").server_id == bed_portal["servers"][1]
    assert domstate(second, "t-cli") == "shut off"
    assert cli(portal, "remove", "host", "vm", "t-cli").returncode == 0
    assert vm_row(app, "t-cli") is None


def test_networks_and_license_keys(app, portal):
    from portal import networks
    from portal.models import Appliance

    with app.app_context():
        db.session.add(Appliance(name="licensed", min_memory_mb=128, max_memory_mb=512, state="ready"))
        networks.create(name="lab", kind="isolated", vlan=301, cidr="10.30.1.0/24")
        db.session.commit()
    nets = cli(portal, "list", "network").stdout.splitlines()
    assert nets[0].split() == ["NETWORK", "KIND", "VLAN", "SUBNET", "UPLINK", "VMS"]
    assert nets[1].split() == ["lab:", "isolated", "301", "10.30.1.0/24", "-----", "0"]
    added = cli(portal, "add", "vmkey", "licensed", "AAA-1", "BBB-2")
    assert added.returncode == 0 and "2 free key(s)" in added.stdout, added.stderr
    keys = cli(portal, "list", "vmkey", "licensed").stdout.splitlines()
    assert [line.split() for line in keys] == [["KEY", "VM"], ["AAA-1", "-----"], ["BBB-2", "-----"]]
    assert json.loads(cli(portal, "--json", "list", "vmkey", "licensed").stdout)["free"] == 2
    assert cli(portal, "list", "vmkey", "licensed", who="pat").returncode == 1  # the pool is the managers'
    assert cli(portal, "list", "vmkey", "nosuch").returncode == 1

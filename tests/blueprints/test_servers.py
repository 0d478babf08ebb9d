"""The VM Servers area against real servers of the test bed (own sshd and libvirtd each)."""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path

import pytest

from portal import monitoring
from portal.extensions import db
from portal.models import ActionLog, CheckResult, Role, Server, ServerSample, Task
from tests.conftest import PASSWORD, make_user, make_vm, register_bed_server, run_worker_burst

pytestmark = pytest.mark.bed


@pytest.fixture
def manager(app, client):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    app.config["SERVER_DOWN_GRACE_SECONDS"] = 0
    with app.app_context():
        make_user("boss", Role.MANAGER)
    assert client.post("/login", data={"username": "boss", "password": PASSWORD}).status_code == 302
    return client


def _task(app, task_id) -> Task:
    with app.app_context():
        task = db.session.get(Task, task_id)
        db.session.expunge(task)
        return task


def _start_add(client, bs, password, address=None):
    r = client.post("/servers/add", data={"hostname": bs.name, "address": address or bs.address,
                                          "port": bs.ssh_port, "password": password})
    assert r.status_code == 302, r.get_data(as_text=True)
    return int(r.headers["Location"].rstrip("/").split("/")[-1])


def _virsh(bs, *args) -> str:
    return subprocess.run(["virsh", "-c", bs.uri_tcp, *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_add_server_over_ssh_detects_facts_and_registers_disks(app, manager, bed_servers, domain_type):
    bs = bed_servers[0]
    task_id = _start_add(manager, bs, bs.root_password)
    page = manager.get(f"/servers/add/{task_id}").get_data(as_text=True)
    assert "Waiting for a worker" in page or "queued" in page
    run_worker_burst()
    probe = _task(app, task_id)
    assert probe.state == "succeeded", probe.log
    assert bs.root_password not in probe.log and bs.root_password not in (probe.result or "")
    page = manager.get(f"/servers/add/{task_id}").get_data(as_text=True)
    assert bs.host_key_fingerprint in page
    found = json.loads(probe.result)
    # Facts agree with what the server's own libvirt says.
    nodeinfo = dict(line.split(":", 1) for line in _virsh(bs, "nodeinfo").strip().splitlines())
    f = found["facts"]
    # Memory as the kernel reports it (the bed shares this machine's kernel); a libvirt figure that
    # disagrees is explained next to the memory field of the review page.
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert f["memory_mb"] == int(meminfo["MemTotal"].split()[0]) // 1024
    libvirt_mb = int(nodeinfo["Memory size"].split()[0]) // 1024
    if abs(libvirt_mb - f["memory_mb"]) > f["memory_mb"] // 20:
        assert f"libvirt reports {libvirt_mb:,} MB" in f["memory_note"] and f["memory_note"] in html.unescape(page)
    assert f["cores_per_cpu"] == int(nodeinfo["Core(s) per socket"])
    assert f["hyperthreading"] == (int(nodeinfo["Thread(s) per core"]) > 1)
    assert f["mhz"] == int(nodeinfo["CPU frequency"].split()[0])
    assert f["nic_names"] == ["eth0"]  # br0 is the guests' bridge, not a NIC
    assert found["domain_type"] == domain_type  # the boot test agrees with the bed's own detection

    data = {"cpus": f["cpus"], "cores_per_cpu": f["cores_per_cpu"], "memory_mb": f["memory_mb"],
            "nics": 3, "mhz": f["mhz"], "domain_type": found["domain_type"],
            "disks-0-mountpoint": bs.disk_dir, "disks-0-size_gb": ""}
    r = manager.post(f"/servers/add/{task_id}", data=data)
    assert r.status_code == 302
    run_worker_burst()
    reg = _task(app, int(r.headers["Location"].rstrip("/").split("/")[-1]))
    assert reg.state == "succeeded", reg.log
    with app.app_context():
        server = db.session.execute(db.select(Server).where(Server.hostname == bs.name)).scalar_one()
        assert server.host_key_fingerprint == bs.host_key_fingerprint
        assert server.nics == 3  # the manager's override
        assert server.domain_type == domain_type
        assert [d.mountpoint for d in server.disks] == [bs.disk_dir]
        assert server.disks[0].size_gb > 0 and server.disks[0].free_gb is not None
        assert db.session.execute(db.select(ActionLog).where(ActionLog.action == "server-added")).scalar_one()
        # The password is nowhere in the database.
        for table in ("tasks", "action_log", "servers"):
            dump = " ".join(str(row) for row in db.session.execute(db.text(f"SELECT * FROM {table}")).all())
            assert bs.root_password not in dump
    # Corral's key went into the server's own root account, not this machine's.
    assert "corral" in bs.host_path("/root/.ssh/authorized_keys").read_text()
    listing = manager.get("/servers/").get_data(as_text=True)
    assert bs.name in listing and "up" in listing
    detail = manager.get(f"/servers/{server.id}").get_data(as_text=True)
    assert "QEMU (TCG)" in detail or "KVM" in detail


def test_wrong_password_fails_clearly_and_creates_nothing(app, manager, bed_servers):
    bs = bed_servers[1]
    task_id = _start_add(manager, bs, "not-the-password")
    run_worker_burst()
    task = _task(app, task_id)
    assert task.state == "failed"
    assert "refused the login as root" in task.error and "not-the-password" not in task.log
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Server.id))).scalar_one() == 0


def test_unreachable_address_fails_clearly(app, manager, bed_servers):
    bs = bed_servers[1]
    task_id = _start_add(manager, bs, "whatever", address="10.77.0.250")
    run_worker_burst()
    task = _task(app, task_id)
    assert task.state == "failed" and "unreachable" in task.error.lower()


def test_add_form_rejects_bad_input(app, manager, bed_servers):
    register_bed_server(app, bed_servers[0])
    for data, message in [
        ({"hostname": "bad host;rm", "port": 22, "password": "x"}, "not a valid host name"),
        ({"hostname": bed_servers[0].name, "port": 22, "password": "x"}, "registered already"),
        ({"hostname": "newhost", "address": "not an address!", "port": 22, "password": "x"}, "neither an IP"),
        ({"hostname": "newhost", "port": 99999, "password": "x"}, "between 1 and 65535"),
        ({"hostname": "newhost", "port": 22}, "This field is required"),
    ]:
        r = manager.post("/servers/add", data=data)
        assert r.status_code == 400 and message in r.get_data(as_text=True), (data, message)
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Task.id))).scalar_one() == 0


def test_missing_mountpoint_is_refused_and_nothing_is_registered(app, manager, bed_servers):
    bs = bed_servers[1]
    task_id = _start_add(manager, bs, bs.root_password)
    run_worker_burst()
    found = json.loads(_task(app, task_id).result)
    f = found["facts"]
    r = manager.post(f"/servers/add/{task_id}", data={
        "cpus": f["cpus"], "cores_per_cpu": f["cores_per_cpu"], "memory_mb": f["memory_mb"], "nics": f["nics"],
        "mhz": f["mhz"], "domain_type": "qemu", "disks-0-mountpoint": bs.disk_dir,
        "disks-1-mountpoint": "/var/lib/corral/nowhere"})
    run_worker_burst()
    reg = _task(app, int(r.headers["Location"].rstrip("/").split("/")[-1]))
    assert reg.state == "failed" and "/var/lib/corral/nowhere does not exist on bed2" in reg.error
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(Server.id))).scalar_one() == 0


def test_changed_host_key_is_refused_naming_both_fingerprints(app, bed_servers):
    app.config["SERVER_DOWN_GRACE_SECONDS"] = 0
    sid = register_bed_server(app, bed_servers[0])
    with app.app_context():
        server = db.session.get(Server, sid)
        server.host_key = bed_servers[1].host_key_public  # what a reinstalled/impostor server looks like
        db.session.commit()
        monitoring.poll_all()
        server = db.session.get(Server, sid)
        assert server.status == "down"
        assert bed_servers[0].host_key_fingerprint in server.last_error
        assert bed_servers[1].host_key_fingerprint in server.last_error
        assert "Refusing to connect" in server.last_error


def test_poll_refreshes_facts_samples_health_and_domains(app, bed_servers):
    sid = register_bed_server(app, bed_servers[0])
    with app.app_context():
        outcomes = monitoring.poll_all()
        assert [o.state for o in outcomes] == ["ok"], outcomes[0].summary
        server = db.session.get(Server, sid)
        assert server.status == "up" and server.free_memory_mb and server.load1 is not None
        assert server.disks[0].free_gb is not None
        result = db.session.execute(db.select(CheckResult).where(CheckResult.server_id == sid)).scalar_one()
        assert result.state == "ok" and "mem_free=" in result.perfdata and "MB free" in result.summary
        assert db.session.execute(db.select(db.func.count(ServerSample.id))).scalar_one() == 1


def test_server_that_dies_goes_down_and_comes_back(app, bed, bed_servers):
    app.config["SERVER_DOWN_GRACE_SECONDS"] = 0
    sid = register_bed_server(app, bed_servers[1])
    bed.stop_libvirtd(2)
    try:
        with app.app_context():
            outcomes = monitoring.poll_all()
            assert outcomes[0].state == "critical" and "libvirtd" in outcomes[0].summary
            server = db.session.get(Server, sid)
            assert server.status == "down" and "libvirt" in server.last_error
    finally:
        bed.start_libvirtd(2)
    with app.app_context():
        monitoring.poll_all()
        server = db.session.get(Server, sid)
        assert server.status == "up" and server.last_error is None


def test_grace_period_keeps_a_briefly_silent_server_up(app, bed, bed_servers):
    app.config["SERVER_DOWN_GRACE_SECONDS"] = 3600
    sid = register_bed_server(app, bed_servers[1])
    with app.app_context():
        monitoring.poll_all()  # seen now
        db.session.commit()  # the poll job's commit
    bed.stop_sshd(2)
    try:
        with app.app_context():
            monitoring.poll_all()
            server = db.session.get(Server, sid)
            assert server.status == "up" and "unreachable" in server.last_error.lower()
    finally:
        bed.start_sshd(2)


def test_mark_down_stops_polling_and_mark_up_resumes(app, manager, bed_servers):
    sid = register_bed_server(app, bed_servers[0])
    assert manager.post(f"/servers/{sid}/mark-down").status_code == 302
    with app.app_context():
        assert monitoring.poll_all() == []
        assert db.session.get(Server, sid).status == "marked_down"
    r = manager.post(f"/servers/{sid}/mark-down", follow_redirects=True)
    assert "marked down already" in r.get_data(as_text=True)
    manager.post(f"/servers/{sid}/mark-up")
    with app.app_context():
        assert len(monitoring.poll_all()) == 1
        assert db.session.get(Server, sid).status == "up"
        actions = db.session.execute(db.select(ActionLog.action)).scalars().all()
        assert "server-marked-down" in actions and "server-marked-up" in actions


def test_delete_is_refused_while_vms_live_there(app, manager, bed_servers):
    sid = register_bed_server(app, bed_servers[0])
    with app.app_context():
        owner = make_user("pat")
        make_vm(owner, "busy1", server=db.session.get(Server, sid))
    r = manager.post(f"/servers/{sid}/delete", follow_redirects=True)
    assert "still holds VMs (busy1)" in r.get_data(as_text=True)
    with app.app_context():
        assert db.session.get(Server, sid) is not None


def test_delete_server_definition(app, manager, bed_servers):
    sid = register_bed_server(app, bed_servers[0])
    r = manager.post(f"/servers/{sid}/delete", follow_redirects=True)
    assert "was deleted" in r.get_data(as_text=True)
    with app.app_context():
        assert db.session.get(Server, sid) is None


def test_add_disk_validates_on_the_server(app, manager, bed, bed_servers):
    bs = bed_servers[0]
    sid = register_bed_server(app, bs, disks=())
    bed.exec(1, ["mkdir", "-p", "/var/lib/corral/disk2"])
    r = manager.post(f"/servers/{sid}/disks", data={"mountpoint": "/var/lib/corral/disk2"})
    assert r.status_code == 302
    r2 = manager.post(f"/servers/{sid}/disks", data={"mountpoint": "/var/lib/corral/missing"})
    run_worker_burst()
    with app.app_context():
        server = db.session.get(Server, sid)
        assert [d.mountpoint for d in server.disks] == ["/var/lib/corral/disk2"]
        failed = db.session.get(Task, int(r2.headers["Location"].rstrip("/").split("/")[-1]))
        assert failed.state == "failed" and "does not exist on bed1" in failed.error
    r = manager.post(f"/servers/{sid}/disks", data={"mountpoint": "relative/path"}, follow_redirects=True)
    assert "not an absolute path" in r.get_data(as_text=True)


def test_domain_started_behind_corrals_back_appears(app, manager, bed, bed_servers, appliance_image, domain_type):
    from tests.bed.guest import appliance_domain_xml

    bs = bed_servers[0]
    sid = register_bed_server(app, bs)
    disk = f"{bs.images_dir}/rogue.qcow2"
    subprocess.run(["cp", str(appliance_image), str(bs.host_path(disk))], check=True)
    xml = appliance_domain_xml("rogue", disk, domain_type=domain_type)
    try:
        subprocess.run(["virsh", "-c", bs.uri_tcp, "create", "/dev/stdin"], input=xml, text=True, check=True,
                       capture_output=True, timeout=60)
        with app.app_context():
            monitoring.poll_all()
            db.session.commit()
        body = manager.get(f"/servers/{sid}/_domains").get_data(as_text=True)
        assert "rogue" in body and "running" in body and "not created by Corral" in body
    finally:
        subprocess.run(["virsh", "-c", bs.uri_tcp, "destroy", "rogue"], capture_output=True, timeout=60)
        bs.host_path(disk).unlink(missing_ok=True)


def test_graphs_render_svg_from_samples(app, manager, bed_servers):
    sid = register_bed_server(app, bed_servers[0])
    with app.app_context():
        monitoring.poll_all()
        monitoring.poll_all()
        db.session.commit()
    for rng in ("1h", "24h", "7d"):
        body = manager.get(f"/servers/{sid}/graphs?range={rng}").get_data(as_text=True)
        assert body.count("<svg") == 2 and "polyline" in body
    assert "<svg" in manager.get(f"/servers/{sid}/graphs?range=bogus").get_data(as_text=True)


def test_health_partial_shows_the_check_result(app, manager, bed_servers):
    sid = register_bed_server(app, bed_servers[0])
    assert "No check has run yet" in manager.get(f"/servers/{sid}/_health").get_data(as_text=True)
    with app.app_context():
        monitoring.poll_all()
        db.session.commit()
    body = manager.get(f"/servers/{sid}/_health").get_data(as_text=True)
    assert "vmm_host" in body and "OK" in body and re.search(r"mem_free=[\d.]+%", body)

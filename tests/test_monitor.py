"""The monitor process follows libvirt lifecycle events into the database and the UI."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from portal.extensions import db
from portal.models import VM, Role, Server
from tests.bed.guest import appliance_domain_xml
from tests.conftest import PASSWORD, make_user, make_vm, register_bed_server, stop_process

pytestmark = pytest.mark.bed


def wait_for(fn, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def monitor_proc(app, tmp_path):
    with open(tmp_path / "monitor.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "portal", "monitor", "--refresh", "1"],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        yield proc
        stop_process(proc)


def test_monitor_follows_domain_events(app, client, monitor_proc, bed_servers, appliance_image, domain_type):
    bs = bed_servers[1]
    sid = register_bed_server(app, bs)
    with app.app_context():
        owner = make_user("pat", Role.REGULAR)
        vm_id = make_vm(owner, "mon1", server=db.session.get(Server, sid), state="off").id
    disk = f"{bs.images_dir}/mon1.qcow2"
    subprocess.run(["cp", str(appliance_image), str(bs.host_path(disk))], check=True)
    xml = appliance_domain_xml("mon1", disk, domain_type=domain_type)
    virsh = ["virsh", "-c", bs.uri_tcp]

    def vm_state():
        with app.app_context():
            return db.session.get(VM, vm_id).state

    def server_domains():
        with app.app_context():
            return db.session.get(Server, sid).domains

    try:
        # Wait until the monitor has subscribed (it lists the server's domains on connect).
        wait_for(lambda: server_domains() is not None and
                 db_last_error(app, sid) is None, "the monitor to connect")
        time.sleep(0.5)
        subprocess.run([*virsh, "create", "/dev/stdin"], input=xml, text=True, check=True, capture_output=True)
        wait_for(lambda: vm_state() == "running", "the VM to show running")
        app.config["WTF_CSRF_ENABLED"] = False
        client.post("/login", data={"username": "pat", "password": PASSWORD})
        assert "running" in client.get(f"/vms/{vm_id}", headers={"HX-Request": "true"}).get_data(as_text=True)
        subprocess.run([*virsh, "suspend", "mon1"], check=True, capture_output=True)
        wait_for(lambda: vm_state() == "paused", "the VM to show paused")
        subprocess.run([*virsh, "resume", "mon1"], check=True, capture_output=True)
        wait_for(lambda: vm_state() == "running", "the VM to run again")
        subprocess.run([*virsh, "destroy", "mon1"], check=True, capture_output=True)
        wait_for(lambda: vm_state() == "off", "the VM to show off")
        assert not [d for d in server_domains() if d["name"] == "mon1"]  # transient domain is gone
    finally:
        subprocess.run([*virsh, "destroy", "mon1"], capture_output=True)
        bs.host_path(disk).unlink(missing_ok=True)
    assert monitor_proc.poll() is None


def db_last_error(app, sid):
    with app.app_context():
        return db.session.get(Server, sid).last_error


def test_monitor_reconnects_when_a_server_returns(app, bed, monitor_proc, bed_servers, appliance_image, domain_type):
    bs = bed_servers[1]
    sid = register_bed_server(app, bs)
    with app.app_context():
        make_vm(make_user("pat"), "mon2", server=db.session.get(Server, sid), state="off")
    wait_for(lambda: db_domains_known(app, sid), "the first subscription")
    bed.stop_libvirtd(2)
    try:
        wait_for(lambda: db_last_error(app, sid), "the monitor to notice the closed connection")
    finally:
        bed.start_libvirtd(2)
    disk = f"{bs.images_dir}/mon2.qcow2"
    subprocess.run(["cp", str(appliance_image), str(bs.host_path(disk))], check=True)
    virsh = ["virsh", "-c", bs.uri_tcp]
    try:
        time.sleep(2.5)  # let the monitor's 1 s refresh resubscribe
        subprocess.run([*virsh, "create", "/dev/stdin"], input=appliance_domain_xml("mon2", disk, domain_type=domain_type),
                       text=True, check=True, capture_output=True)

        def state():
            with app.app_context():
                return db.session.execute(db.select(VM.state).where(VM.name == "mon2")).scalar_one()

        wait_for(lambda: state() == "running", "events after the reconnect")
    finally:
        subprocess.run([*virsh, "destroy", "mon2"], capture_output=True)
        bs.host_path(disk).unlink(missing_ok=True)


def db_domains_known(app, sid):
    with app.app_context():
        return db.session.get(Server, sid).domains_json is not None

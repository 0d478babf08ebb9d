"""VMs end to end on the bed: create (full copy and clones), power, console, delete."""

from __future__ import annotations

import subprocess
import time

import pytest

from portal.extensions import db
from portal.models import VM, Appliance, Role, Task
from tests.conftest import PASSWORD, make_user, run_worker_burst
from tests.vm_util import act, create, domstate, last_task, vm_row, wait_serial

pytestmark = pytest.mark.bed


@pytest.fixture
def setup(bed_portal):
    return bed_portal


def test_full_copy_and_clones_boot_operate_and_delete_cleanly(app, client, setup, bed_servers, console_follower):
    bs1, bs2 = bed_servers[:2]
    assert create(client, setup, "t-full").status_code == 302
    assert create(client, setup, "t-cl1", server=1, clone=True).status_code == 302
    run_worker_burst()
    assert create(client, setup, "t-cl2", server=1, clone=True).status_code == 302
    run_worker_burst()
    for name in ("t-full", "t-cl1", "t-cl2"):
        task = next(t for t in [last_task(app, name)])
        assert task.state == "succeeded", (name, task.error, task.log)
        assert vm_row(app, name).state == "off"
    assert "is cached on the server" in last_task(app, "t-cl2").log  # the second clone reused the base
    with app.app_context():
        full = db.session.execute(db.select(VM).where(VM.name == "t-full")).scalar_one()
        clone = db.session.execute(db.select(VM).where(VM.name == "t-cl1")).scalar_one()
        assert full.vdisks[0].backing_path is None and clone.vdisks[0].backing_path.endswith(".qcow2")
        full_path, clone_path, base = full.vdisks[0].path, clone.vdisks[0].path, clone.vdisks[0].backing_path
        mac = full.nics[0].mac
    assert bs1.host_path(full_path).exists() and bs2.host_path(clone_path).exists() and bs2.host_path(base).exists()
    assert domstate(bs1, "t-full") == "shut off" and domstate(bs2, "t-cl1") == "shut off"
    assert mac.startswith("02:c0:")

    # Power on, read the heartbeat from the serial log, then every button.
    act(app, client, "t-full", "start", "running")
    wait_serial(bs1, "t-full", lambda t: t.count("CORRAL-HB") >= 3 and "CORRAL-READY" in t)
    act(app, client, "t-cl1", "start", "running")
    wait_serial(bs2, "t-cl1", lambda t: "CORRAL-READY t-cl1" in t)
    vm_id = vm_row(app, "t-full").id
    for _ in range(300):  # the console follower (corral monitor's) reads the log; the page shows its buffer
        if "CORRAL-HB" in client.get(f"/vms/{vm_id}/_console").get_data(as_text=True):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the console page never showed the heartbeat")

    act(app, client, "t-full", "pause", "paused")
    assert domstate(bs1, "t-full") == "paused"
    act(app, client, "t-full", "resume", "running")
    act(app, client, "t-full", "save", "saved")
    assert domstate(bs1, "t-full") == "shut off"
    act(app, client, "t-full", "restore", "running")
    assert domstate(bs1, "t-full") == "running"
    act(app, client, "t-full", "reboot", "running")
    act(app, client, "t-full", "shutdown", "off")
    assert "CORRAL-SHUTDOWN" in wait_serial(bs1, "t-full", lambda t: "CORRAL-SHUTDOWN" in t)
    act(app, client, "t-cl1", "poweroff", "off")

    # Buttons that make no sense now are refused with a reason.
    r = client.post(f"/vms/{vm_id}/power/pause", follow_redirects=True)
    assert "not possible while t-full is off" in r.get_data(as_text=True)

    # Delete everything: nothing is left on either server.
    for name in ("t-full", "t-cl1", "t-cl2"):
        assert client.post(f"/vms/{vm_row(app, name).id}/delete").status_code == 302
    run_worker_burst()
    for name in ("t-full", "t-cl1", "t-cl2"):
        assert vm_row(app, name) is None
    for bs in (bs1, bs2):
        listed = subprocess.run(["virsh", "-c", bs.uri_tcp, "list", "--all", "--name"], capture_output=True,
                                text=True).stdout.split()
        assert not [n for n in listed if n.startswith("t-")]
        for cache in ("corral-vms", "corral-bases", "corral-isos"):
            folder = bs.host_path(f"{bs.disk_dir}/{cache}")
            assert not folder.exists() or not any(folder.iterdir()), (bs.name, cache, list(folder.iterdir()))
    with app.app_context():
        assert db.session.get(Appliance, setup["appliance"]) is not None  # the library is untouched


@pytest.mark.parametrize("data, message", [
    ({"name": "waytoolongname"}, "Field cannot be longer than 8"),
    ({"name": "a;rm -rf"}, "1 to 8 letters, digits or hyphens"),
    ({"name": "-lead"}, "1 to 8 letters, digits or hyphens"),
    ({"memory": 4096}, "needs between 128 and 1024 MB"),
    ({"memory": 64}, "needs between 128 and 1024 MB"),
    ({"mac": "01:00:5e:00:00:01"}, "multicast"),
    ({"mac": "nonsense"}, "not a MAC address"),
])
def test_bad_create_requests_change_nothing(app, client, setup, data, message):
    kwargs = {"memory": data.get("memory", 256), "mac": data.get("mac", "")}
    r = create(client, setup, data.get("name", "t-bad"), **kwargs)
    body = r.get_data(as_text=True)
    assert r.status_code == 400 and message in body, body[-3000:]
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(VM.id))).scalar_one() == 0
        assert db.session.execute(db.select(db.func.count(Task.id))).scalar_one() == 0


def test_duplicate_name_and_mac_are_refused(app, client, setup):
    assert create(client, setup, "t-one", mac="02:00:00:00:aa:01").status_code == 302
    r = create(client, setup, "T-ONE")
    assert r.status_code == 400 and "exists already" in r.get_data(as_text=True)
    r = create(client, setup, "t-two", mac="02:00:00:00:AA:01")
    assert r.status_code == 400 and "already used" in r.get_data(as_text=True)
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(VM.id))).scalar_one() == 1


def test_regular_users_cannot_create(app, setup):
    with app.app_context():
        make_user("reg")
    other = app.test_client()
    other.post("/login", data={"username": "reg", "password": PASSWORD})
    assert other.get("/vms/new").status_code == 403
    assert other.post("/vms/new", data={"name": "x"}).status_code == 403


def test_settings_change_while_off_and_grow_disks(app, client, setup, bed_servers):
    bs = bed_servers[0]
    assert create(client, setup, "t-set").status_code == 302
    run_worker_burst()
    vm = vm_row(app, "t-set")
    assert vm.state == "off"
    r = client.post(f"/vms/{vm.id}/settings", data={"memory_mb": 384, "vcpus": 2, "disk-0": 2})
    assert r.status_code == 302
    run_worker_burst()
    assert last_task(app, "t-set").state == "succeeded", last_task(app, "t-set").log
    info = subprocess.run(["virsh", "-c", bs.uri_tcp, "dominfo", "t-set"], capture_output=True, text=True).stdout
    assert "393216 KiB" in info and "CPU(s):         2" in info
    with app.app_context():
        path = db.session.get(VM, vm.id).vdisks[0].path
    img = subprocess.run(["qemu-img", "info", "-U", str(bs.host_path(path))], capture_output=True, text=True).stdout
    assert "virtual size: 2 GiB" in img
    for data, message in [({"memory_mb": 4096, "vcpus": 1, "disk-0": 2}, "needs between 128 and 1024 MB"),
                          ({"memory_mb": 256, "vcpus": 1, "disk-0": 1}, "Disks can only grow"),
                          ({"memory_mb": 256, "vcpus": 1, "disk-0": 500}, "Quota exceeded")]:
        r = client.post(f"/vms/{vm.id}/settings", data=data, follow_redirects=True)
        assert message in r.get_data(as_text=True), message
    act(app, client, "t-set", "start", "running")
    r = client.post(f"/vms/{vm.id}/settings", data={"memory_mb": 256, "vcpus": 1, "disk-0": 2}, follow_redirects=True)
    assert "while t-set is off" in r.get_data(as_text=True)
    act(app, client, "t-set", "poweroff", "off")
    with app.app_context():
        assert db.session.get(VM, vm.id).memory_mb == 384


def test_change_owner_respects_the_new_owners_quota(app, client, setup):
    assert create(client, setup, "t-own").status_code == 302
    vm_id = vm_row(app, "t-own").id
    with app.app_context():
        full = make_user("full", Role.POWER, max_vms=0, max_memory_mb=0, max_disk_gb=0).id
        roomy = make_user("roomy", Role.POWER, max_vms=2, max_memory_mb=1024, max_disk_gb=10).id
        make_user("boss", Role.MANAGER)
    boss = app.test_client()
    boss.post("/login", data={"username": "boss", "password": PASSWORD})
    assert client.post(f"/vms/{vm_id}/owner", data={"owner": roomy}).status_code == 403  # power users cannot
    r = boss.post(f"/vms/{vm_id}/owner", data={"owner": full}, follow_redirects=True)
    assert "Quota exceeded for full" in r.get_data(as_text=True)
    r = boss.post(f"/vms/{vm_id}/owner", data={"owner": roomy}, follow_redirects=True)
    assert "now belongs to roomy" in r.get_data(as_text=True)
    with app.app_context():
        assert db.session.get(VM, vm_id).owner.username == "roomy"


def _copy_under_way(folder, name: str) -> bool:
    """A part file of *name* (each copy writes its own, ``name.part-<random>``) has bytes in it."""
    for part in folder.glob(f"{name}.part-*") if folder.exists() else ():
        try:
            if part.stat().st_size > 0:
                return True
        except FileNotFoundError:  # moved into place meanwhile
            pass
    return False


def test_worker_killed_mid_copy_leaves_a_partial_vm_that_deletes_cleanly(app, client, setup, bed_servers, tmp_path):
    import os
    import signal

    from portal.models import ApplianceDisk
    from portal.vmm import images
    from tests.conftest import start_worker, stop_process

    bs = bed_servers[0]
    big = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(big), "400M"],
                   check=True)
    with app.app_context():
        row = Appliance(name="big", min_memory_mb=128, max_memory_mb=512, state="ready")
        db.session.add(row)
        db.session.flush()
        db.session.add(ApplianceDisk(appliance_id=row.id, position=0, path=str(big), format="qcow2",
                                     virtual_size_bytes=400 << 20, file_size_bytes=big.stat().st_size,
                                     sha256=images.local_sha256(big)))
        db.session.commit()
        big_id = row.id
    r = client.post("/vms/new", data={"name": "t-part", "appliance": big_id, "memory_mb": 256, "vcpus": 1,
                                      "placement": str(setup["disks"][setup["servers"][0]])})
    assert r.status_code == 302
    task_id = int(r.headers["Location"].rstrip("/").split("/")[-1])
    with open(tmp_path / "worker.log", "w") as log:
        worker = start_worker(log=log)
        try:
            folder = bs.host_path(f"{bs.disk_dir}/corral-vms/t-part")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _copy_under_way(folder, "disk0.qcow2"):
                time.sleep(0.01)  # kill once the copy is under way
            horses = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
            assert horses, "no work horse found"
            for pid in horses:
                os.kill(int(pid), signal.SIGKILL)  # the process copying the disk dies
            # The worker notices its horse died and fails the job; the task page reconciles.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                client.get(f"/tasks/{task_id}/_status")
                if vm_row(app, "t-part").state == "partial":
                    break
                time.sleep(0.5)
        finally:
            stop_process(worker)
    vm = vm_row(app, "t-part")
    assert vm.state == "partial"
    with app.app_context():
        assert db.session.get(Task, task_id).state == "failed"
    page = client.get(f"/vms/{vm.id}").get_data(as_text=True)
    assert "Delete partially created VM" in page
    vm_dir = bs.host_path(f"{bs.disk_dir}/corral-vms/t-part")
    assert vm_dir.exists() and any(vm_dir.iterdir())  # the interrupted copy left a file behind
    assert client.post(f"/vms/{vm.id}/delete").status_code == 302
    run_worker_burst()
    assert vm_row(app, "t-part") is None and not vm_dir.exists()


def test_blank_vm_boots_from_an_iso(app, client, setup, bed_servers, appliance_iso):
    from portal.models import IsoImage
    from portal.vmm import images

    bs = bed_servers[0]
    with app.app_context():
        iso = IsoImage(name="boot", path=str(appliance_iso), size_bytes=appliance_iso.stat().st_size,
                       sha256=images.local_sha256(appliance_iso))
        db.session.add(iso)
        db.session.commit()
        iso_id = iso.id
    bad = client.post("/vms/new-blank", data={"name": "t-blank", "iso": iso_id, "memory_mb": 256, "vcpus": 1,
                                              "placement": str(setup["disks"][setup["servers"][0]]),
                                              "disks-0-size_gb": 60, "disks-0-bus": "virtio"})
    assert bad.status_code == 400 and "Quota exceeded" in bad.get_data(as_text=True)
    r = client.post("/vms/new-blank", data={"name": "t-blank", "iso": iso_id, "memory_mb": 256, "vcpus": 1,
                                            "placement": str(setup["disks"][setup["servers"][0]]),
                                            "disks-0-size_gb": 2, "disks-0-bus": "virtio",
                                            "disks-1-size_gb": 1, "disks-1-bus": "scsi", "usb_tablet": "y"})
    assert r.status_code == 302
    run_worker_burst()
    task = last_task(app, "t-blank")
    assert task.state == "succeeded", task.log
    xml = subprocess.run(["virsh", "-c", bs.uri_tcp, "dumpxml", "t-blank"], capture_output=True, text=True).stdout
    assert "device='cdrom'" in xml and "bus='scsi'" in xml and "type='tablet'" in xml
    act(app, client, "t-blank", "start", "running")
    wait_serial(bs, "t-blank", lambda t: "CORRAL-READY t-blank" in t)  # booted from the ISO
    act(app, client, "t-blank", "poweroff", "off")
    assert client.post(f"/vms/{vm_row(app, 't-blank').id}/delete").status_code == 302
    run_worker_burst()
    assert vm_row(app, "t-blank") is None
    assert not bs.host_path(f"{bs.disk_dir}/corral-vms/t-blank").exists()
    isos = bs.host_path(f"{bs.disk_dir}/corral-isos")
    assert not isos.exists() or not any(isos.iterdir())  # the ISO copy went with its last VM


def test_copy_back_makes_a_new_appliance_and_a_vm_from_it_boots(app, client, setup, bed_servers):
    bs = bed_servers[1]
    assert create(client, setup, "t-src", server=1, clone=True).status_code == 302
    run_worker_burst()
    with app.app_context():
        make_user("boss", Role.MANAGER)
    boss = app.test_client()
    boss.post("/login", data={"username": "boss", "password": PASSWORD})
    src = vm_row(app, "t-src")
    assert client.post(f"/vms/{src.id}/copy-back", data={"name": "copied"}).status_code == 403
    r = boss.post(f"/vms/{src.id}/copy-back", data={"name": "copied"})
    assert r.status_code == 302
    run_worker_burst()
    task = last_task(app, "t-src")
    assert task.state == "succeeded", task.log
    with app.app_context():
        row = db.session.execute(db.select(Appliance).where(Appliance.name == "copied")).scalar_one()
        info = subprocess.run(["qemu-img", "info", row.disks[0].path], capture_output=True, text=True).stdout
        assert row.state == "ready" and "backing file" not in info  # flattened
        new_app = row.id
    assert vm_row(app, "t-src").state == "off"  # the source VM is untouched
    r = client.post("/vms/new", data={"name": "t-from", "appliance": new_app, "memory_mb": 256, "vcpus": 1,
                                      "placement": str(setup["disks"][setup["servers"][1]])})
    assert r.status_code == 302
    run_worker_burst()
    act(app, client, "t-from", "start", "running")
    wait_serial(bs, "t-from", lambda t: "CORRAL-READY t-from" in t)
    act(app, client, "t-from", "poweroff", "off")
    r = boss.post(f"/vms/{src.id}/copy-back", data={"name": "copied"}, follow_redirects=True)
    assert "exists already" in r.get_data(as_text=True)

"""Creating VMs over HTTP: every size the forms accept fits on the chosen server.

The create forms (from an appliance, blank from an ISO) share one record
function and one bound: a VM's memory is at most its server's memory, its disks
at most the VM disk's free space. A refused request adds no VM row.
"""

from __future__ import annotations

import pytest

from portal.extensions import db
from portal.models import VM, Appliance, ApplianceDisk, IsoImage, Role
from tests.conftest import log_in_client, make_server, make_user

GIB = 1 << 30


@pytest.fixture
def setup(app, client):
    """A small server (4 GiB memory, 30 GB free), an appliance with a 40 GB disk, one with 8 GB, an ISO."""
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        server = make_server("small")
        server.memory_mb, server.free_memory_mb = 4096, 4000
        disk = server.disks[0]
        disk.size_gb, disk.free_gb = 100, 30
        make_user("boss", Role.MANAGER)
        appliances = {}
        for name, size_gb in (("big", 40), ("fits", 8)):
            row = Appliance(name=name, min_memory_mb=128, max_memory_mb=1 << 20, state="ready")
            db.session.add(row)
            db.session.flush()
            db.session.add(ApplianceDisk(appliance_id=row.id, position=0, path=f"/nonexistent/{name}.qcow2",
                                         virtual_size_bytes=size_gb * GIB, file_size_bytes=1 << 20,
                                         sha256="0" * 64))
            appliances[name] = row.id
        iso = IsoImage(name="installer", path="/nonexistent/installer.iso", size_bytes=1 << 20)
        db.session.add(iso)
        db.session.commit()
        ids = {"disk": disk.id, "iso": iso.id, **appliances}
    log_in_client(client, "boss")
    return ids


def _vm_count(app) -> int:
    with app.app_context():
        return db.session.execute(db.select(db.func.count(VM.id))).scalar_one()


def _create(client, setup, appliance: str, memory_mb: int, placement: str):
    data = {"name": "t1", "appliance": setup[appliance], "memory_mb": memory_mb, "vcpus": 1,
            "placement": placement}
    return client.post("/vms/new", data=data)


@pytest.mark.parametrize("appliance, memory_mb, message", [
    ("fits", 8192, "8192 MB of memory do not fit on small: it has 4096 MB in all."),
    ("big", 512, "40 GB of new disk do not fit on small:/var/lib/corral/disk1: it has 30 GB free."),
])
def test_create_on_a_chosen_disk_is_bounded_by_the_server(app, client, setup, appliance, memory_mb, message):
    """Choosing the server by hand skipped every check before; now the same bound applies."""
    r = _create(client, setup, appliance, memory_mb, str(setup["disk"]))
    assert r.status_code == 400
    assert message in r.get_data(as_text=True)
    assert _vm_count(app) == 0


def test_automatic_placement_counts_the_appliances_disks(app, client, setup):
    """Placement looked for 1 GB of free disk whatever the appliance; a 40 GB appliance finds no room."""
    r = _create(client, setup, "big", 512, "auto")
    assert r.status_code == 400
    assert "40 GB free on a VM disk" in r.get_data(as_text=True)
    assert _vm_count(app) == 0


def test_create_that_fits_is_recorded(app, client, setup):
    r = _create(client, setup, "fits", 1024, str(setup["disk"]))
    assert r.status_code == 302
    with app.app_context():
        vm = db.session.execute(db.select(VM)).scalar_one()
        assert (vm.memory_mb, [d.size_gb for d in vm.vdisks], vm.appliance_id) == (1024, [8], setup["fits"])
        assert vm.nics[0].mac


def _create_blank(client, setup, memory_mb: int, sizes: list[int]):
    data = {"name": "b1", "iso": setup["iso"], "memory_mb": memory_mb, "vcpus": 1, "placement": str(setup["disk"])}
    for i, size in enumerate(sizes):
        data[f"disks-{i}-size_gb"] = size
        data[f"disks-{i}-bus"] = "virtio"
    return client.post("/vms/new-blank", data=data)


@pytest.mark.parametrize("memory_mb, sizes, message", [
    (1 << 22, [10], "4194304 MB of memory do not fit on small: it has 4096 MB in all."),
    (1024, [20, 11], "31 GB of new disk do not fit on small:/var/lib/corral/disk1: it has 30 GB free."),
])
def test_blank_vm_is_bounded_by_the_server(app, client, setup, memory_mb, sizes, message):
    """A blank VM has no appliance range: before, its memory went up to 4 TiB on any server."""
    r = _create_blank(client, setup, memory_mb, sizes)
    assert r.status_code == 400
    assert message in r.get_data(as_text=True)
    assert _vm_count(app) == 0


def test_blank_vm_that_fits_is_recorded(app, client, setup):
    assert _create_blank(client, setup, 4096, [20, 10]).status_code == 302
    with app.app_context():
        vm = db.session.execute(db.select(VM)).scalar_one()
        assert (vm.memory_mb, [d.size_gb for d in vm.vdisks], vm.iso_id) == (4096, [20, 10], setup["iso"])

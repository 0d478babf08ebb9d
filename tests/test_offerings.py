"""The service catalog: managers publish offerings; ordering is the create form bounded by the offering,
within the orderer's quota; regular users see the catalog and whom to ask."""

from __future__ import annotations

import pytest

from portal.extensions import db
from portal.models import VM, Appliance, ApplianceDisk, BackupSchedule, Offering, Role
from tests.conftest import PASSWORD, make_server, make_user

GIB = 1 << 30


@pytest.fixture
def shop(app, client):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        make_server("shopsrv")
        make_user("boss", Role.MANAGER, email="boss@example.org")
        make_user("pat", Role.POWER, max_vms=3, max_memory_mb=3000, max_disk_gb=50)
        make_user("quinn", Role.POWER)
        make_user("reggie")
        app_row = Appliance(name="debian", min_memory_mb=128, max_memory_mb=8192, vcpus=1, state="ready")
        db.session.add(app_row)
        db.session.flush()
        db.session.add(ApplianceDisk(appliance_id=app_row.id, position=0, path="/nonexistent/debian.qcow2",
                                     virtual_size_bytes=8 * GIB, file_size_bytes=1 << 20, sha256="0" * 64))
        db.session.commit()
        return app_row.id


def _login(client, name):
    client.post("/logout")
    assert client.post("/login", data={"username": name, "password": PASSWORD}).status_code == 302


def _publish(client, appliance_id, **over):
    data = {"name": "Small web", "appliance_id": appliance_id, "memory_mb": 1024, "vcpus": 2, "backup": "daily",
            "monthly_price": "12.50", "roles": ["power"], "users": "", "published": "1", **over}
    return client.post("/catalog/new", data=data)


def _order(client, offering_id, appliance_id, memory_mb, vcpus=1, name="ord1"):
    return client.post("/vms/new", data={"name": name, "appliance": appliance_id, "memory_mb": memory_mb,
                                         "vcpus": vcpus, "placement": "auto", "offering": offering_id})


def test_publish_order_within_offering_and_quota(app, client, shop):
    _login(client, "boss")
    r = _publish(client, shop, memory_mb=99999)
    assert r.status_code == 400 and "between 128 and 8192 MB" in r.get_data(as_text=True)
    assert _publish(client, shop).status_code == 302
    big = _publish(client, shop, name="Big db", memory_mb=4096, vcpus=4, backup="none")
    assert big.status_code == 302
    only_quinn = _publish(client, shop, name="Quinn only", roles=[], users="quinn")
    assert only_quinn.status_code == 302
    with app.app_context():
        ids = {o.name: o.id for o in db.session.execute(db.select(Offering)).scalars()}
    assert _publish(client, shop, name="Reg", users="reggie").status_code == 400  # regular users cannot create

    _login(client, "pat")
    page = client.get("/catalog/").get_data(as_text=True)
    assert "Small web" in page and "12.5" in page and "8 GB disk" in page
    form = client.get(f"/vms/new?offering={ids['Small web']}").get_data(as_text=True)
    assert 'data-testid="ordering"' in form and 'value="1024"' in form
    # More than the offering: refused, nothing recorded.
    r = _order(client, ids["Small web"], shop, 2048)
    assert r.status_code == 400 and "at most 1024 MB" in r.get_data(as_text=True)
    # Not pat's to order.
    r = _order(client, ids["Quinn only"], shop, 512)
    assert r.status_code == 400 and "not yours to order" in r.get_data(as_text=True)
    # Pat's quota (3000 MB) does not hold the big one.
    r = _order(client, ids["Big db"], shop, 4096, vcpus=4)
    assert r.status_code == 400 and "quota" in r.get_data(as_text=True).lower()
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(VM.id))).scalar_one() == 0
    # Within everything: the VM is recorded with the offering's backup schedule.
    r = _order(client, ids["Small web"], shop, 1024, vcpus=2)
    assert r.status_code == 302, r.get_data(as_text=True)
    with app.app_context():
        vm = db.session.execute(db.select(VM)).scalar_one()
        assert (vm.name, vm.memory_mb, vm.vcpus, vm.owner.username) == ("ord1", 1024, 2, "pat")
        assert db.session.get(BackupSchedule, vm.id).period == "daily"

    _login(client, "reggie")
    page = client.get("/catalog/").get_data(as_text=True)
    assert "Small web" in page and 'data-testid="order"' not in page and "boss@example.org" in page
    assert client.get(f"/vms/new?offering={ids['Small web']}").status_code == 403


def test_a_livesync_offering_needs_its_backup_mode_and_a_backup_server(app, client, shop):
    with app.app_context():
        backup = make_server("shopbak").id
    _login(client, "boss")
    assert _publish(client, shop, name="HA web", backup="livesync", monthly_price="30").status_code == 302
    with app.app_context():
        oid = db.session.execute(db.select(Offering.id)).scalar_one()
    _login(client, "pat")
    form = client.get(f"/vms/new?offering={oid}").get_data(as_text=True)
    assert 'value="livesync" selected' in form
    r = _order(client, oid, shop, 1024)  # the form's backup mode left at none
    assert r.status_code == 400 and "comes with the backup mode livesync, not none" in r.get_data(as_text=True)
    data = {"name": "ha1", "appliance": shop, "memory_mb": 1024, "vcpus": 1, "placement": "auto", "offering": oid,
            "backup_mode": "livesync", "backup_server": backup}
    r = client.post("/vms/new", data=data)
    assert r.status_code == 302, r.get_data(as_text=True)
    with app.app_context():
        vm = db.session.execute(db.select(VM)).scalar_one()
        assert (vm.backup_mode, vm.backup_server_id) == ("livesync", backup)

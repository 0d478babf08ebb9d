"""License key pool: managers paste keys, a create takes a free one (or is refused and leaves nothing), the key
shows to managers and the owner only, and deleting the VM frees it."""

from __future__ import annotations

from portal import license_keys
from portal.extensions import db
from portal.jobs.vms import domain_spec
from portal.models import VM, Appliance, ApplianceDisk, LicenseKey, Role, User
from tests.conftest import log_in_client, make_server, make_user


def _world(app) -> int:
    with app.app_context():
        make_user("boss", Role.MANAGER)
        make_user("pow", Role.POWER, max_vms=5, max_memory_mb=4096, max_disk_gb=100)
        make_user("pow2", Role.POWER)
        make_server()
        row = Appliance(name="licensed", min_memory_mb=128, max_memory_mb=512, state="ready")
        db.session.add(row)
        db.session.flush()
        db.session.add(ApplianceDisk(appliance_id=row.id, position=0, path="/nonexistent.qcow2",
                                     virtual_size_bytes=1 << 30, file_size_bytes=1 << 20, sha256="0" * 64))
        db.session.commit()
        return row.id


def _create(client, appliance_id: int, name: str):
    return client.post("/vms/new", data={"name": name, "appliance": appliance_id, "memory_mb": 256, "vcpus": 1,
                                         "placement": "auto"}, follow_redirects=True)


def _vm_count(app) -> int:
    with app.app_context():
        return db.session.execute(db.select(db.func.count(VM.id))).scalar_one()


def test_pool_assigns_refuses_shows_and_frees(app, client):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    appliance_id = _world(app)
    log_in_client(client, "boss")
    r = client.post(f"/license-keys/{appliance_id}", data={"keys": "AAAA-1111\n\nBBBB-2222\nAAAA-1111\n"},
                    follow_redirects=True)
    assert "2 new key(s) for licensed" in r.get_data(as_text=True)
    r = client.post(f"/license-keys/{appliance_id}", data={"keys": "AAAA-1111\n"}, follow_redirects=True)
    assert "0 new key(s)" in r.get_data(as_text=True)
    assert "Paste at least one key" in client.post(f"/license-keys/{appliance_id}", data={"keys": " \n"},
                                                   follow_redirects=True).get_data(as_text=True)
    client.post("/logout")

    log_in_client(client, "pow")
    for name in ("lic1", "lic2"):
        assert _create(client, appliance_id, name).status_code == 200
    with app.app_context():
        held = dict(db.session.execute(db.select(VM.name, LicenseKey.key).join(LicenseKey, LicenseKey.vm_id == VM.id))
                    .all())
        assert held == {"lic1": "AAAA-1111", "lic2": "BBBB-2222"}
        vm1 = db.session.execute(db.select(VM).where(VM.name == "lic1")).scalar_one()
        vm1_id = vm1.id
        assert "corral.license=AAAA-1111" in domain_spec(vm1).extra_oem  # the guest reads it
    before = _vm_count(app)
    r = _create(client, appliance_id, "lic3")
    assert "no free key left" in r.get_data(as_text=True)
    assert _vm_count(app) == before  # refused: nothing recorded

    assert "AAAA-1111" in client.get(f"/vms/{vm1_id}").get_data(as_text=True)  # the owner sees it
    client.post("/logout")
    log_in_client(client, "boss")
    assert "AAAA-1111" in client.get(f"/vms/{vm1_id}").get_data(as_text=True)  # a manager too
    pool = client.get("/license-keys/").get_data(as_text=True)
    assert "lic1" in pool and "lic2" in pool
    with app.app_context():
        assert license_keys.key_for(db.session.get(VM, vm1_id),
                                    db.session.execute(db.select(User).where(User.username == "pow2")).scalar_one()) \
            is None  # anyone else: not shown
        key = db.session.execute(db.select(LicenseKey).where(LicenseKey.key == "AAAA-1111")).scalar_one()
        try:
            license_keys.delete_free(key)
        except license_keys.LicenseKeyError as exc:
            assert "held by a VM" in str(exc)
        else:
            raise AssertionError("a held key was removed")
        db.session.rollback()
        db.session.delete(db.session.get(VM, vm1_id))  # the delete job's last step (it also calls release)
        db.session.commit()
        assert license_keys.free_count(db.session.get(Appliance, appliance_id)) == 1
    r = _create(client, appliance_id, "lic3")
    assert "no free key left" not in r.get_data(as_text=True)
    with app.app_context():
        assert db.session.execute(db.select(LicenseKey.key).join(VM, VM.id == LicenseKey.vm_id)
                                  .where(VM.name == "lic3")).scalar_one() == "AAAA-1111"


"""Metering and chargeback: state history, hourly usage, price sheets and reports (exact to the cent).

Time is a controllable clock (``metering.use_clock``); nothing sleeps.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from portal import metering, pricing
from portal.extensions import db
from portal.models import VM, Backup, Role, UsageRecord, VMStateInterval
from tests.conftest import PASSWORD, make_server, make_user, make_vm


class Clock:
    def __init__(self, t: datetime):
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def at(self, *args) -> None:
        self.t = datetime(*args, tzinfo=timezone.utc)


@pytest.fixture
def clock(ctx):
    c = Clock(datetime(2026, 3, 1, tzinfo=timezone.utc))
    with metering.use_clock(c):
        yield c


def _sheet(name, day, manager, **prices):
    sheet = pricing.add_sheet(name, day, None, prices, manager)
    db.session.commit()
    return sheet


def _set(vm, **fields):
    for k, v in fields.items():
        setattr(vm, k, v)
    db.session.commit()


def _totals(owner_id=None, start=None, end=None):
    rows = metering.usage(start or datetime(2026, 1, 1, tzinfo=timezone.utc),
                          end or datetime(2027, 1, 1, tzinfo=timezone.utc), owner_id)
    return {f: sum(getattr(r, f) for r in rows) for f in metering.USAGE_FIELDS}


def test_a_known_span_gives_exact_records_and_a_price_change_splits_the_charge(clock):
    boss = make_user("boss", Role.MANAGER)
    alice = make_user("alice", Role.POWER)
    _sheet("March", "2026-03-01", boss, vcpu_hour="0.01", memory_gb_hour="0.005", disk_gb_hour="0.0001")
    _sheet("Mid March", "2026-03-16", boss, vcpu_hour="0.02", memory_gb_hour="0.005", disk_gb_hour="0.0001")
    clock.at(2026, 3, 10, 10, 0)
    vm = make_vm(alice, "web1", server=make_server(), memory_mb=2048, disk_gb=10)
    _set(vm, vcpus=2)
    clock.at(2026, 3, 10, 10, 30)
    _set(vm, state="running")
    clock.at(2026, 3, 20, 12, 15)
    _set(vm, state="off")
    # Setting a value to what it already is starts nothing new.
    clock.at(2026, 3, 21)
    _set(vm, state="off")
    assert [(iv.state, iv.ended_at is None) for iv in metering.history(vm.id)] == [
        ("off", False), ("running", False), ("off", True)]

    clock.at(2026, 4, 1, 0, 20)
    written = metering.aggregate()
    db.session.commit()
    assert written == 518  # one record per hour the VM was defined: 10 Mar 10:00 .. 1 Apr 00:00
    assert metering.aggregate() == 0  # each hour once
    t = _totals()
    assert t["running_seconds"] == 870300  # 241.75 h
    assert t["defined_seconds"] == 518 * 3600
    assert t["vcpu_seconds"] == 2 * 870300
    assert t["memory_mb_seconds"] == 2048 * 870300
    assert t["disk_gb_seconds"] == 10 * 518 * 3600
    first = db.session.execute(db.select(UsageRecord).order_by(UsageRecord.hour)).scalars().first()
    assert (first.hour, first.running_seconds, first.defined_seconds) == (
        datetime(2026, 3, 10, 10, tzinfo=timezone.utc), 1800, 3600)

    start, end, _ = pricing.period("2026-03", None, None, clock.t.date())
    rep = pricing.report(start, end, alice)
    assert [(ln.sheet.name, ln.cents) for ln in rep.lines] == [("March", 414), ("Mid March", 580)]
    # March: 2 vCPU x 133.5 h x 0.01 + 2 GiB x 133.5 h x 0.005 + 10 GiB x 134 h x 0.0001 = 4.139
    # Mid March: 2 x 108.25 x 0.02 + 2 x 108.25 x 0.005 + 10 x 384 x 0.0001 = 5.7965
    assert rep.total_cents == 994
    assert abs(sum(c for _, c in rep.daily_cents) - 994) <= 16  # the chart rounds each day on its own
    assert len(rep.daily_cents) == 31


def test_history_survives_owner_change_and_deletion(clock):
    alice, bob = make_user("alice", Role.POWER), make_user("bob", Role.POWER)
    clock.at(2026, 3, 2, 8, 0)
    vm = make_vm(alice, "db1", server=make_server(), memory_mb=1024, disk_gb=20, state="running")
    vm_id = vm.id
    clock.at(2026, 3, 2, 9, 30)
    _set(vm, owner_id=bob.id)
    db.session.add(Backup(vm_id=vm_id, server_id=vm.server_id, disk_id=vm.server.disks[0].id, path="/b",
                          state="ready", size_bytes=2 * 2**30))
    db.session.commit()
    clock.at(2026, 3, 2, 10, 0)
    db.session.delete(db.session.get(VM, vm_id))
    db.session.commit()
    clock.at(2026, 3, 2, 12, 0)
    metering.aggregate()
    db.session.commit()

    a, b = _totals(alice.id), _totals(bob.id)
    assert a["running_seconds"] == 5400 and a["memory_mb_seconds"] == 1024 * 5400 and a["backup_byte_seconds"] == 0
    assert b["running_seconds"] == 1800 and b["backup_byte_seconds"] == 2 * 2**30 * 1800
    assert metering.history(vm_id)[-1].ended_at == datetime(2026, 3, 2, 10, tzinfo=timezone.utc)
    names = {r.owner_name for r in db.session.execute(db.select(UsageRecord)).scalars()}
    assert names == {"alice", "bob"}
    assert db.session.execute(db.select(db.func.count()).select_from(VMStateInterval)
                              .where(VMStateInterval.ended_at.is_(None))).scalar() == 0


def test_price_sheets_refuse_bad_input(clock):
    boss = make_user("boss", Role.MANAGER)
    for prices, day, msg in [({"vcpu_hour": "-1"}, "2026-03-01", "zero or more"),
                             ({"vcpu_hour": "abc"}, "2026-03-01", "not a number"),
                             ({"vcpu_hour": "0.0000001"}, "2026-03-01", "six decimals"),
                             ({}, "March", "YYYY-MM-DD")]:
        with pytest.raises(pricing.PricingError, match=msg):
            pricing.add_sheet("x", day, None, prices, boss)
    _sheet("base", "2026-03-01", boss)
    with pytest.raises(pricing.PricingError, match="already starts"):
        pricing.add_sheet("again", "2026-03-01", None, {}, boss)
    db.session.rollback()
    assert len(pricing.sheets()) == 1


def test_reports_pages_csv_and_invoice(app, client, clock):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    boss, alice, bob = make_user("boss", Role.MANAGER), make_user("alice", Role.POWER), make_user("bob")
    server = make_server()
    clock.at(2026, 3, 3, 0, 0)
    make_vm(alice, "alicevm", server=server, memory_mb=1024, disk_gb=10, state="running")
    make_vm(bob, "bobvm", server=server, memory_mb=1024, disk_gb=10, state="running")
    clock.at(2026, 3, 3, 10, 0)
    metering.aggregate()
    db.session.commit()

    client.post("/login", data={"username": "boss", "password": PASSWORD})
    r = client.post("/usage/prices", data={"name": "base", "effective_from": "2026-03-01", "vcpu_hour": "0.1",
                                           "memory_gb_hour": "0.05"})
    assert r.status_code == 302
    r = client.post("/usage/prices", data={"name": "bad", "effective_from": "2026-03-02", "vcpu_hour": "-3"})
    assert r.status_code == 400 and "zero or more" in r.get_data(as_text=True)
    assert len(pricing.sheets()) == 1
    everyone = client.get("/usage/?month=2026-03").get_data(as_text=True)
    assert "alicevm" in everyone and "bobvm" in everyone and "<svg" in everyone
    assert 'data-testid="usage-total">3.00<' in everyone  # 2 VMs x 10 h x (0.1 + 0.05)
    client.post("/logout")

    client.post("/login", data={"username": "bob", "password": PASSWORD})
    own = client.get(f"/usage/?month=2026-03&user={alice.id}").get_data(as_text=True)
    assert "bobvm" in own and "alicevm" not in own and 'data-testid="usage-total">1.50<' in own
    csv_text = client.get("/usage/report.csv?month=2026-03").get_data(as_text=True)
    assert csv_text.splitlines()[1].startswith("bob,bobvm,") and csv_text.splitlines()[-1].endswith(",1.50")
    invoice = client.get("/usage/invoice?from=2026-03-01&to=2026-03-31").get_data(as_text=True)
    assert 'data-testid="invoice-total">1.50 EUR' in invoice and "alicevm" not in invoice
    assert "YYYY-MM" in client.get("/usage/?month=nonsense", follow_redirects=True).get_data(as_text=True)


def test_the_json_api_reports_the_same_amounts(app, client, clock):
    from portal import api_tokens

    alice, boss = make_user("alice", Role.POWER), make_user("boss", Role.MANAGER)
    clock.at(2026, 3, 3, 0, 0)
    make_vm(alice, "alicevm", server=make_server(), memory_mb=2048, disk_gb=10, state="running")
    _sheet("base", "2026-03-01", boss, vcpu_hour="0.013", memory_gb_hour="0.0021")
    clock.at(2026, 3, 4, 0, 0)
    metering.aggregate()
    token = api_tokens.create(alice, name="t", scope="read", expires_in_days=None)[1]
    db.session.commit()
    got = client.get("/api/v1/usage?month=2026-03", headers={"Authorization": f"Bearer {token}"}).get_json()
    # 24 h x (1 vCPU x 0.013 + 2 GiB x 0.0021) = 0.4128
    assert (got["total"], got["total_cents"], got["owner"]["username"]) == ("0.41", 41, "alice")
    assert got["lines"][0]["usage"]["vcpu_hours"] == "24.000" and len(got["daily"]) == 31
    bad = client.get("/api/v1/usage?from=2026-03-05&to=2026-03-01", headers={"Authorization": f"Bearer {token}"})
    assert bad.status_code == 422 and "ends before it starts" in bad.get_json()["error"]["message"]
    other = client.get(f"/api/v1/usage?user={boss.id}", headers={"Authorization": f"Bearer {token}"})
    assert other.status_code == 404


def test_livesync_protected_hours_count_only_while_in_sync(clock):
    from portal.models import LiveSync

    alice = make_user("alice", Role.POWER)
    clock.at(2026, 3, 5, 0, 0)
    vm = make_vm(alice, "ls1", server=make_server(), state="running")
    clock.at(2026, 3, 5, 0, 20)
    db.session.add(LiveSync(vm_id=vm.id, state="syncing"))
    db.session.commit()
    clock.at(2026, 3, 5, 0, 30)
    _set(db.session.get(LiveSync, vm.id), state="in_sync")
    clock.at(2026, 3, 5, 1, 45)
    _set(db.session.get(LiveSync, vm.id), state="broken")
    clock.at(2026, 3, 5, 3, 0)
    metering.aggregate()
    assert _totals()["livesync_seconds"] == 75 * 60


def test_vms_older_than_metering_are_picked_up_in_chunks(clock, monkeypatch):
    alice = make_user("alice", Role.POWER)
    server = make_server()
    clock.at(2026, 3, 6, 0, 0)
    ids = [make_vm(alice, f"old{i}", server=server, state="running").id for i in range(5)]
    db.session.execute(db.delete(VMStateInterval))  # as if they were made before metering existed
    db.session.commit()
    monkeypatch.setattr(metering, "CHUNK", 2)
    clock.at(2026, 3, 6, 2, 0)
    metering.aggregate()  # opens their history now: nothing to meter before
    assert db.session.execute(db.select(db.func.count()).select_from(VMStateInterval)).scalar() == 5
    clock.at(2026, 3, 6, 3, 0)
    metering.aggregate()
    assert _totals()["running_seconds"] == 5 * 3600 and {iv.vm_id for iv in metering.history(ids[0])} == {ids[0]}

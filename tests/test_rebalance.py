"""The rebalancing planner: fewest moves under the thresholds, the live-migration rules, LiveSync pairs;
a synthetic cluster of 1,000 servers / 20,000 VMs; the managers' page approving moves as migration tasks."""

from __future__ import annotations

import subprocess
from datetime import timedelta

import pytest

from bench.rebalance import synthetic_cluster
from portal import rebalance
from portal.extensions import db
from portal.models import VM, ActionLog, Role, ServerSample, Task, utcnow
from portal.rebalance import SrvLoad, Thresholds, VMLoad, greedy_baseline, plan
from portal.vmm.appliance import parse_serial_log
from tests.conftest import PASSWORD, log_in_client, make_server, make_user, make_vm, run_worker_burst
from tests.vm_util import domstate, wait_serial

T = Thresholds(cpu=0.8, mem=0.85)


def _srv(i, used, *, cores=8, load=0.0, total=10000, free_gb=500, kvm=True, up=True):
    return SrvLoad(id=i, name=f"s{i}", cores=cores, cpu_load=load, mem_total_mb=total, mem_used_mb=used,
                   disks={100 + i: free_gb}, kvm=kvm, up=up)


def _vm(i, server, mem, cpu=0.1, **kw):
    return VMLoad(id=i, name=f"v{i}", server_id=server, memory_mb=mem, cpu=cpu, disk_gb=kw.pop("disk_gb", 10), **kw)


def test_one_vm_that_is_enough_moves_alone_and_the_smallest_such():
    servers = [_srv(1, 9500), _srv(2, 2000), _srv(3, 1000)]
    vms = [_vm(1, 1, 500), _vm(2, 1, 1500), _vm(3, 1, 3000), _vm(4, 1, 4500)]
    p = plan(servers, vms, T)
    assert [(m.vm_id, m.target_id) for m in p.moves] == [(2, 3)]  # 1000 MB must go; 1500 is the smallest enough
    assert p.after[1][1] <= T.mem and not p.still_over
    assert servers[0].mem_used_mb == 9500  # inputs untouched
    assert plan(servers[:1] + servers[1:], vms, Thresholds(cpu=0.8, mem=0.99)).moves == []


def test_rules_backup_server_kvm_disk_up_and_cpu():
    servers = [_srv(1, 9500), _srv(2, 0), _srv(3, 0, kvm=False), _srv(4, 0, free_gb=5), _srv(5, 0, up=False),
               _srv(6, 5000)]
    # Every candidate except server 6 is ruled out for this VM: 2 is its LiveSync backup, 3 has no KVM,
    # 4 has no room on a VM disk, 5 is down.
    vms = [_vm(1, 1, 1500, backup_server_id=2, kvm=True)]
    p = plan(servers, vms, T)
    assert [(m.vm_id, m.target_id) for m in p.moves] == [(1, 6)]
    # CPU: the only VM that helps would push the target over its load threshold.
    cpu = plan([_srv(1, 0, load=8.0), _srv(2, 0, load=5.0)], [_vm(1, 1, 100, cpu=2.0)], T)
    assert cpu.moves == [] and cpu.still_over == [1]
    # Not movable (not running, or a task holds it): stays.
    assert plan(servers, [_vm(1, 1, 1500, movable=False)], T).moves == []


def test_cpu_and_memory_together_take_fewer_moves_than_greedy():
    servers = [_srv(1, 9600, load=9.0), _srv(2, 1000, load=1.0), _srv(3, 1000, load=1.0)]
    vms = [_vm(i, 1, 400, cpu=0.2) for i in range(1, 11)] + [_vm(11, 1, 1500, cpu=2.8)]
    ours, greedy = plan(servers, vms, T), greedy_baseline(servers, vms, T)
    assert not ours.still_over and len(ours.moves) == 1 and len(greedy.moves) > 1


def test_synthetic_cluster_of_1000_servers_and_20000_vms():
    servers, vms = synthetic_cluster(1000, 20000, seed=7)
    ours = plan(servers, vms, T)
    greedy = greedy_baseline(servers, vms, T)
    assert len(ours.over_before(T)) > 50
    assert len(ours.moves) <= len(greedy.moves)
    if not greedy.still_over:
        assert not ours.still_over
    assert all(c <= T.cpu + 1e-9 and m <= T.mem + 1e-9 for sid, (c, m) in ours.after.items()
               if sid not in ours.still_over)
    vm_by_id = {v.id: v for v in vms}
    assert len({m.vm_id for m in ours.moves}) == len(ours.moves)  # each VM moves once
    for m in ours.moves:
        v = vm_by_id[m.vm_id]
        assert v.movable and m.target_id != v.backup_server_id and m.source_id == v.server_id


@pytest.fixture
def packed(app, client):
    """Three servers in the database, one packed with running VMs (memory from the poll's samples)."""
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        make_user("boss", Role.MANAGER)
        owner = make_user("pat", Role.POWER)
        hot, cool, spare = (make_server(n) for n in ("hot", "cool", "spare"))
        for s, used in ((hot, 15000), (cool, 2000), (spare, 1000)):
            s.memory_mb, s.free_memory_mb, s.load1 = 16384, 16384 - used, 0.5
        hot.load1 = 7.5  # 8 cores
        now = utcnow()
        db.session.add_all([ServerSample(server_id=s.id, at=now - timedelta(seconds=30), mem_used_mb=used,
                                         mem_total_mb=16384, disk_used_gb=1, disk_total_gb=1000)
                            for s, used in ((hot, 15000), (cool, 2000), (spare, 1000))])
        vms = [make_vm(owner, f"pk{i}", server=hot, memory_mb=2048, state="running",
                       disk_id=hot.disks[0].id) for i in range(6)]
        vms[1].backup_server_id, vms[1].backup_mode = spare.id, "livesync"
        db.session.commit()
        return {"hot": hot.id, "cool": cool.id, "spare": spare.id, "vms": [v.id for v in vms]}


def test_page_proposes_and_approval_starts_live_migrations(app, client, packed):
    client.post("/login", data={"username": "boss", "password": PASSWORD})
    page = client.get("/rebalance/").get_data(as_text=True)
    assert 'data-testid="proposal"' in page and "hot" in page
    with app.app_context():
        proposal, _ = rebalance.propose()
        assert proposal.moves and not proposal.still_over
        assert all(m.source_id == packed["hot"] for m in proposal.moves)
        assert all(not (m.vm_id == packed["vms"][1] and m.target_id == packed["spare"]) for m in proposal.moves)
        chosen = [f"{m.vm_id}:{m.target_id}" for m in proposal.moves]
    # Approving one move of the proposal, and one that breaks the LiveSync rule.
    bad = f"{packed['vms'][1]}:{packed['spare']}"
    r = client.post("/rebalance/apply", data={"move": [chosen[0], bad]}, follow_redirects=True)
    body = r.get_data(as_text=True)
    assert "it holds the VM&#39;s LiveSync copy" in body
    with app.app_context():
        started = db.session.execute(db.select(Task).where(Task.kind == "vm-migrate")).scalars().all()
        assert len(started) == 1 and started[0].target_id == int(chosen[0].split(":")[0])
        logged = db.session.execute(db.select(ActionLog).where(ActionLog.action == "rebalance-approved")).scalar_one()
        assert logged.target_id == started[0].target_id and logged.detail == started[0].title


def test_automatic_mode_waits_for_the_time_over_and_caps_moves(app, packed):
    app.config.update(REBALANCE_AUTO=True, REBALANCE_AUTO_AFTER_SECONDS=600, REBALANCE_MAX_MOVES=1)
    with app.app_context():
        now = utcnow()
        assert rebalance.auto_step(now) == []  # over since now: not long enough
        db.session.commit()
        subs = rebalance.auto_step(now + timedelta(seconds=601))
        db.session.commit()
        assert len(subs) == 1  # one at most
        assert rebalance.auto_step(now + timedelta(seconds=700)) == []  # that migration still counts as running
        db.session.execute(db.update(Task).values(state="succeeded", active_key=None))
        db.session.add(Task(kind="livesync-failback", title="Fail back", state="running", log=""))
        db.session.commit()
        assert rebalance.auto_step(now + timedelta(seconds=800)) == []  # never during a failover or fail-back


# --- on the bed -------------------------------------------------------------------------

def _names(bs) -> list[str]:
    return subprocess.run(["virsh", "-c", bs.uri_tcp, "list", "--all", "--name"], capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.fixture
def third_server(app, bed, bed_portal):
    """A third bed server for this test only, registered in Corral; taken down afterwards (the
    session's two stay as they are)."""
    from tests.conftest import register_bed_server

    bed.up(n=3)
    bs3 = bed.server(3)
    try:
        yield bs3, register_bed_server(app, bs3)
    finally:
        for name in _names(bs3):
            subprocess.run(["virsh", "-c", bs3.uri_tcp, "destroy", name], capture_output=True)
            subprocess.run(["virsh", "-c", bs3.uri_tcp, "undefine", "--managed-save", name], capture_output=True)
        subprocess.run(["rm", "-rf", str(bs3.host_path(f"{bs3.disk_dir}/corral-vms")),
                        str(bs3.host_path(f"{bs3.disk_dir}/corral-bases"))])
        bed.up(n=2)


@pytest.mark.bed
@pytest.mark.slow
def test_a_packed_bed_is_spread_by_real_live_migrations(app, client, bed_portal, bed_servers, third_server):
    """Three VMs running on bed1 (75 % of its memory, the threshold 30 %): the proposal moves two of
    them, one to each other server; approving it migrates them live (their heartbeats go on) and a
    second run proposes nothing."""
    b1, b2 = bed_servers[:2]
    b3, s3 = third_server
    s1, s2 = bed_portal["servers"]
    app.config.update(REBALANCE_MEMORY_THRESHOLD=0.3, REBALANCE_CPU_THRESHOLD=100.0)
    names = ["t-rb1", "t-rb2", "t-rb3"]
    for name in names:
        r = client.post("/vms/new", data={"name": name, "appliance": bed_portal["appliance"], "memory_mb": 256,
                                          "vcpus": 1, "placement": str(bed_portal["disks"][s1]), "clone": "y",
                                          "mac": ""})
        assert r.status_code == 302
    run_worker_burst()
    with app.app_context():
        ids = dict(db.session.execute(db.select(VM.name, VM.id).where(VM.name.like("t-rb%"))).all())
        make_user("boss", Role.MANAGER)
    for name in names:
        assert client.post(f"/vms/{ids[name]}/power/start").status_code == 302
    run_worker_burst()
    # Booted and beating (READY alone may come before the first heartbeat line).
    before = {name: parse_serial_log(wait_serial(
        b1, name, lambda text, n=name: f"CORRAL-READY {n}" in text and bool(parse_serial_log(text).heartbeats),
        timeout=120)).last_heartbeat for name in names}

    client.post("/logout")
    log_in_client(client, "boss")
    page = client.get("/rebalance/").get_data(as_text=True)
    assert 'data-testid="proposal"' in page
    with app.app_context():
        proposal, _ = rebalance.propose()
    assert len(proposal.moves) == 2 and {m.target_id for m in proposal.moves} == {s2, s3}
    assert all(c[1] <= 0.3 for c in proposal.after.values())
    r = client.post("/rebalance/apply", data={"move": [f"{m.vm_id}:{m.target_id}" for m in proposal.moves]})
    assert r.status_code == 302
    run_worker_burst(timeout=600)
    by_server = {s2: b2, s3: b3}
    with app.app_context():
        tasks_ = db.session.execute(db.select(Task).where(Task.kind == "vm-migrate")).scalars().all()
        assert [t.state for t in tasks_] == ["succeeded", "succeeded"], [(t.error, t.log) for t in tasks_]
        for m in proposal.moves:
            vm = db.session.get(VM, m.vm_id)
            assert (vm.server_id, vm.state) == (m.target_id, "running")
    for m in proposal.moves:
        bs = by_server[m.target_id]
        assert domstate(bs, m.vm_name) == "running" and m.vm_name not in _names(b1)
        st = parse_serial_log(wait_serial(bs, m.vm_name, lambda text: len(parse_serial_log(text).heartbeats) >= 3))
        assert not st.ready and st.heartbeats[0] >= before[m.vm_name]  # the same boot, still beating
    with app.app_context():
        second, _ = rebalance.propose()
        assert second.moves == [] and not second.over_before(rebalance.thresholds())
    assert 'data-testid="balanced"' in client.get("/rebalance/").get_data(as_text=True)

"""Virtual cluster rules without hosts: round robin, the Rocks MAC rule and its uniqueness, validation that
changes nothing, quotas counting every VM of a cluster, the pages' and the API's refusals."""

from __future__ import annotations

import pytest

from portal import clusters, macs, networks
from portal.extensions import db
from portal.models import NIC, VM, Appliance, ApplianceDisk, ClusterMember, Network, Role, Task, VirtualCluster
from tests.conftest import log_in_client, make_server, make_user, make_vm

GIB = 1024 ** 3


def _appliance() -> int:
    row = Appliance(name="tiny", min_memory_mb=128, max_memory_mb=1024, state="ready")
    db.session.add(row)
    db.session.flush()
    db.session.add(ApplianceDisk(appliance_id=row.id, position=0, path="/nonexistent.qcow2", virtual_size_bytes=GIB,
                                 file_size_bytes=1 << 20, sha256="0" * 64))
    db.session.commit()
    return row.id


def _req(appliance: int, **kw) -> clusters.ClusterRequest:
    base = dict(fqdn="vc1.example.org", public_ip="137.110.119.118", computes=2, appliance_id=appliance,
                frontend=clusters.Sizing(256, 1), compute=clusters.Sizing(128, 1))
    base.update(kw)
    return clusters.ClusterRequest(**base)


def _counts() -> tuple[int, int, int, int]:
    return tuple(db.session.execute(db.select(db.func.count()).select_from(t)).scalar_one()
                 for t in (VM, NIC, Network, VirtualCluster))


def test_round_robin_puts_the_frontend_first_and_spreads_computes():
    assert clusters.round_robin(["a", "b"], 3) == ["a", "b", "a", "b"]
    assert clusters.round_robin(["a", "b", "c"], 4) == ["a", "b", "c", "a", "b"]
    assert clusters.round_robin(["a"], 2) == ["a", "a", "a"]
    nine = clusters.round_robin(["a", "b"], 8)
    assert (nine.count("a"), nine.count("b")) == (5, 4)
    with pytest.raises(clusters.ClusterError, match="at least one"):
        clusters.round_robin([], 1)


def test_private_addresses_follow_rocks():
    assert clusters.private_ip("frontend", 0) == "10.1.1.1"
    assert [clusters.private_ip("compute", i) for i in range(3)] == ["10.1.255.254", "10.1.255.253", "10.1.255.252"]


def test_record_new_places_round_robin_with_rocks_macs(app):
    with app.app_context():
        s1, s2 = make_server("node-a"), make_server("node-b")
        owner = make_user("boss", Role.MANAGER)
        cluster = clusters.record_new(owner, _req(_appliance(), computes=3))
        db.session.commit()
        fe, *cn = clusters.vms_of(cluster)
        assert [fe.name, *(v.name for v in cn)] == ["vc1", "vc1-0", "vc1-1", "vc1-2"]
        assert [v.server.hostname for v in (fe, *cn)] == ["node-a", "node-b", "node-a", "node-b"]
        assert [n.mac for n in fe.nics] == ["76:77:6e:80:00:00", "76:77:6e:80:00:01"]
        assert [v.nics[0].mac for v in cn] == ["76:77:6e:80:00:02", "76:77:6e:80:00:03", "76:77:6e:80:00:04"]
        private = cluster.network
        assert (private.kind, private.vlan, private.cidr, private.name) == ("isolated", 2, "10.1.0.0/16", "vc-vc1")
        assert fe.nics[0].network_id == private.id and fe.nics[1].network_id is None  # public: outbound only
        assert all(v.nics[0].network_id == private.id and len(v.nics) == 1 for v in cn)
        assert {(r.mac, r.ip) for r in private.reservations} >= {("76:77:6e:80:00:00", "10.1.1.1"),
                                                                 ("76:77:6e:80:00:02", "10.1.255.254")}
        assert networks.oem_strings(cn[0]) == ("corral.ip=10.1.255.254/16",)
        assert all(v.state == "creating" and v.is_clone for v in (fe, *cn))
        assert cluster.server_ids == f"{s1.id},{s2.id}"
        # a second cluster: next free VLAN; a public IP with the same prefix skips the MACs taken
        other = clusters.record_new(owner, _req(cluster.appliance_id, fqdn="vc2.example.org",
                                                public_ip="10.110.119.118", computes=1))
        assert other.vlan == 3
        assert [n.mac for v in clusters.vms_of(other) for n in v.nics] == [
            "76:77:6e:80:00:05", "76:77:6e:80:00:06", "76:77:6e:80:00:07"]
        assert len(macs.taken_macs()) == 8


def test_macs_never_collide_with_generated_ones(app):
    with app.app_context():
        make_server()
        owner = make_user("boss", Role.MANAGER)
        vm = make_vm(owner, "plain")
        taken = vm.nics[0].mac
        with pytest.raises(clusters.ClusterError, match="which Corral's generated MACs use"):
            clusters.record_new(owner, _req(_appliance(), public_ip="1.1.192.2"))  # -> 02:c0:01
        assert macs.rocks_macs("137.110.119.118", 2, taken={"76:77:6e:80:00:00"}) == [
            "76:77:6e:80:00:01", "76:77:6e:80:00:02"]
        assert taken not in macs.rocks_macs("137.110.119.118", 50)


@pytest.mark.parametrize("change, message", [
    ({"fqdn": "bad_name!"}, "is not a host name"),
    ({"fqdn": "toolongname.example.org"}, "1 to 8 characters"),
    ({"fqdn": "abcdefg.example.org", "computes": 12}, "shorten the FQDN's first label to 5"),
    ({"public_ip": "300.1.1.1"}, "is not an IPv4 address"),
    ({"public_ip": "127.0.0.1"}, "cannot be a frontend's public address"),
    ({"computes": 65}, "0 to 64 computes"),
    ({"frontend": clusters.Sizing(64, 1)}, "Frontend: between 128 and 1024 MB"),
    ({"compute": clusters.Sizing(128, 0)}, "Computes: 1 to 64 vCPUs"),
    ({"compute": clusters.Sizing(128, 1, 999999)}, "Computes: a disk between 1 GB"),
    ({"vlan": 5000}, "between 1 and 4094"),
    ({"vlan": 77}, "VLAN 77 is in use"),
    ({"server_ids": (999999,)}, "not up"),
    ({"uplink": "eth9"}, "has no interface eth9"),
    ({"appliance_id": 999999}, "ready appliance"),
    ({"public_network_id": 999999}, "no longer exists"),
])
def test_bad_requests_are_refused_and_change_nothing(app, change, message):
    with app.app_context():
        make_server("node-a", interfaces_json='["eth0", "br0"]')
        owner = make_user("boss", Role.MANAGER)
        appliance = _appliance()
        networks.create(name="used", kind="isolated", vlan=77)
        db.session.commit()
        before = _counts()
        with pytest.raises(clusters.ClusterError, match=message):
            clusters.record_new(owner, _req(appliance, **change))
        db.session.rollback()
        assert _counts() == before


def test_names_taken_refuse_the_whole_cluster(app):
    with app.app_context():
        make_server()
        owner = make_user("boss", Role.MANAGER)
        make_vm(owner, "vc1-1")
        appliance = _appliance()
        before = _counts()
        with pytest.raises(clusters.ClusterError, match="A VM called vc1-1 exists already"):
            clusters.record_new(owner, _req(appliance))
        db.session.rollback()
        assert _counts() == before
        clusters.record_new(owner, _req(appliance, computes=1))
        db.session.commit()
        for change, message in (({"fqdn": "vc1.example.org", "public_ip": "1.2.3.4"}, "exists already"),
                                ({"fqdn": "vc9.example.org"}, "public address of cluster vc1.example.org")):
            with pytest.raises(clusters.ClusterError, match=message):
                clusters.record_new(owner, _req(appliance, **change))
            db.session.rollback()


def test_quota_counts_every_vm_of_the_cluster(app):
    with app.app_context():
        make_server()
        pow_ = make_user("pow", Role.POWER, max_vms=3, max_memory_mb=1000, max_disk_gb=50)
        appliance = _appliance()
        with pytest.raises(clusters.ClusterError, match=r"4 VMs .* VMs 0 \+ 4 > 3"):
            clusters.record_new(pow_, _req(appliance, computes=3))
        db.session.rollback()
        with pytest.raises(clusters.ClusterError, match=r"memory 0 \+ 1280 MB > 1000 MB"):
            clusters.record_new(pow_, _req(appliance, computes=2, compute=clusters.Sizing(512, 1)))
        db.session.rollback()
        cluster = clusters.record_new(pow_, _req(appliance, computes=2))
        db.session.commit()
        assert len(cluster.members) == 3
        with pytest.raises(clusters.ClusterError, match=r"VMs 3 \+ 1 > 3"):
            clusters.add_computes(cluster, 1)
        db.session.rollback()
        regular = make_user("reg")
        with pytest.raises(clusters.ClusterError, match="may not create VMs"):
            clusters.record_new(regular, _req(appliance, fqdn="r.example.org", public_ip="1.2.3.4"))


def test_server_memory_bounds_the_whole_request(app):
    with app.app_context():
        make_server("small").free_memory_mb = 600
        owner = make_user("boss", Role.MANAGER)
        with pytest.raises(clusters.ClusterError, match="small has 88 MB of free memory left for vc1-2"):
            clusters.record_new(owner, _req(_appliance(), computes=3, compute=clusters.Sizing(128, 1),
                                            frontend=clusters.Sizing(256, 1)))


def test_add_computes_and_power_order(app):
    with app.app_context():
        make_server("node-a"), make_server("node-b")
        owner = make_user("boss", Role.MANAGER)
        cluster = clusters.record_new(owner, _req(_appliance(), computes=1))
        db.session.commit()
        added = clusters.add_computes(cluster, 2)
        db.session.commit()
        assert [v.name for v in added] == ["vc1-1", "vc1-2"]
        assert [v.nics[0].mac for v in added] == ["76:77:6e:80:00:03", "76:77:6e:80:00:04"]
        assert [v.server.hostname for v in clusters.vms_of(cluster)] == ["node-a", "node-b", "node-a", "node-b"]
        for vm in clusters.vms_of(cluster):
            vm.state = "off"
        assert [v.name for v in clusters.power_order(cluster, "start")] == ["vc1", "vc1-0", "vc1-1", "vc1-2"]
        for vm in clusters.vms_of(cluster):
            vm.state = "running"
        assert [v.name for v in clusters.power_order(cluster, "poweroff")] == ["vc1-2", "vc1-1", "vc1-0", "vc1"]
        with pytest.raises(clusters.ClusterError, match="Nothing to start"):
            clusters.power_order(cluster, "start")
        with pytest.raises(clusters.ClusterError, match="Unknown cluster action"):
            clusters.power_order(cluster, "explode")
        with pytest.raises(clusters.ClusterError, match="Power vc1-0 off"):
            clusters.check_remove_compute(cluster, clusters.computes(cluster)[0])
        assert clusters.status(cluster) == "running"


def test_pages_create_refuse_and_list(app, client):
    with app.app_context():
        make_server("node-a")
        make_user("pow", Role.POWER, max_vms=5, max_memory_mb=4096, max_disk_gb=50)
        appliance = _appliance()
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    log_in_client(client, "pow")
    page = client.get("/clusters/new").get_data(as_text=True)
    assert "Frontend FQDN" in page and "next free one (2)" in page
    form = {"fqdn": "pc.example.org", "public_ip": "137.110.119.118", "computes": "9", "appliance": str(appliance),
            "frontend_memory_mb": "256", "compute_memory_mb": "128", "clone": "y", "clone_field": "1"}
    r = client.post("/clusters/new", data=form)
    assert r.status_code == 400 and "do not fit" in r.get_data(as_text=True)
    assert 'value="pc.example.org"' in r.get_data(as_text=True)  # the form keeps what was typed
    with app.app_context():
        assert _counts()[0] == 0
    r = client.post("/clusters/new", data={**form, "computes": "2"})
    assert r.status_code == 302 and "/tasks/" in r.location
    with app.app_context():
        cluster = db.session.execute(db.select(VirtualCluster)).scalar_one()
        task = db.session.execute(db.select(Task).where(Task.kind == "cluster-create")).scalar_one()
        assert (task.target_type, task.target_id) == ("virtualcluster", cluster.id)
        assert db.session.execute(db.select(db.func.count()).select_from(ClusterMember)).scalar_one() == 3
        cid = cluster.id
    listing = client.get("/clusters/").get_data(as_text=True)
    assert "pc.example.org" in listing and "creating" in listing
    assert "vc-pc" not in client.get("/clusters/new").get_data(as_text=True)  # not a public network to offer
    detail = client.get(f"/clusters/{cid}").get_data(as_text=True)
    assert "76:77:6e:80:00:01" in detail and "pc-1" in detail
    r = client.post(f"/clusters/{cid}/delete")
    assert r.status_code == 302
    assert "already under way" in client.get(f"/clusters/{cid}").get_data(as_text=True)  # its create task
    with app.app_context():
        db.session.execute(db.update(Task).values(state="failed", active_key=None))  # as if its worker died
        db.session.execute(db.update(VM).where(VM.name == "pc-0").values(state="migrating"))
        db.session.commit()
    client.post(f"/clusters/{cid}/delete")
    assert "pc-0 is moving to another server" in client.get(f"/clusters/{cid}").get_data(as_text=True)
    with app.app_context():
        db.session.execute(db.update(VM).where(VM.name == "pc-0").values(state="creating"))
        db.session.commit()
    assert "/tasks/" in client.post(f"/clusters/{cid}/delete").location  # VMs left "creating" go too


def test_api_create_list_show_and_refusals(app, client):
    from portal import api_tokens
    from portal.models import User

    with app.app_context():
        make_server("node-a")
        make_user("pow", Role.POWER, max_vms=5, max_memory_mb=4096, max_disk_gb=50)
        appliance = _appliance()
        token = api_tokens.create(db.session.execute(db.select(User).where(User.username == "pow")).scalar_one(),
                                  name="t", scope="write", expires_in_days=None)[1]
        db.session.commit()
    h = {"Authorization": f"Bearer {token}"}
    body = {"fqdn": "ac.example.org", "public_ip": "137.110.119.118", "computes": 1, "appliance_id": appliance,
            "frontend": {"memory_mb": 256}, "compute": {"memory_mb": 128}}
    bad = client.post("/api/v1/clusters", json={**body, "public_ip": "nope"}, headers=h)
    assert bad.status_code == 422 and "not an IPv4 address" in bad.get_json()["error"]["message"]
    r = client.post("/api/v1/clusters", json=body, headers=h)
    assert r.status_code == 202, r.get_json()
    listed = client.get("/api/v1/clusters", headers=h).get_json()["items"]
    assert [c["name"] for c in listed] == ["ac.example.org"]
    shown = client.get(f"/api/v1/clusters/{listed[0]['id']}", headers=h).get_json()
    assert [(m["name"], m["role"], m["macs"]) for m in shown["vms"]] == [
        ("ac", "frontend", ["76:77:6e:80:00:00", "76:77:6e:80:00:01"]), ("ac-0", "compute", ["76:77:6e:80:00:02"])]
    assert shown["vlan"] == 2 and shown["state"] == "creating"
    r = client.post(f"/api/v1/clusters/{listed[0]['id']}/actions", json={"action": "start"}, headers=h)
    assert r.status_code == 409 and "Nothing to start" in r.get_json()["error"]["message"]


def test_cli_lists_clusters_rocks_style():
    from portal.cli_client import cluster_table

    doc = [{"name": "vc1.example.org", "state": "running", "vms": [
        {"name": "vc1", "role": "frontend", "server": "node-a", "state": "running",
         "macs": ["76:77:6e:80:00:00", "76:77:6e:80:00:01"]},
        {"name": "vc1-0", "role": "compute", "server": "node-b", "state": "off", "macs": ["76:77:6e:80:00:02"]}]},
        {"name": "empty.example.org", "state": "empty", "vms": []}]
    assert cluster_table(doc, status=True).splitlines() == [
        "FRONTEND           CLIENT NODES TYPE HOST   MAC               STATUS",
        "vc1.example.org:   -----        VM   node-a 76:77:6e:80:00:00 running",
        "---------------:   vc1-0        VM   node-b 76:77:6e:80:00:02 off",
        "empty.example.org: -----        VM   -----  -----             empty"]
    assert "STATUS" not in cluster_table(doc, status=False)


def test_the_create_task_plans_each_servers_share(app):
    """What each server's thread gets: the cluster's VLAN segment (VXLAN peers: the other server), the clones on
    the cached base, cloud-init seeds for an appliance that wants them, and every domain's XML."""
    from portal.jobs.clusters import plan

    with app.app_context():
        a, b = make_server("node-a"), make_server("node-b")
        appliance_id = _appliance()
        db.session.get(Appliance, appliance_id).cloud_init = True
        cluster = clusters.record_new(make_user("boss", Role.MANAGER), _req(appliance_id, computes=2,
                                                                            compute=clusters.Sizing(128, 1, 3)))
        db.session.commit()
        work = {w.hostname: w for w in plan(cluster, clusters.vms_of(cluster))}
        assert sorted(work) == ["node-a", "node-b"]
        seg = work["node-a"].segments[0]
        assert (seg.bridge, seg.vlan, seg.local, seg.peers) == ("cbr2", 2, a.address, (b.address,))
        disks = work["node-a"].disks
        assert [d.vm for d in disks] == ["vc1", "vc1-1"]
        assert all(d.base and d.base.endswith(".qcow2") and "/corral-bases/" in d.base for d in disks)
        assert [d.grow_gb for d in disks] == [None, 3]  # computes' boot disks grow to 3 GB after cloning
        assert [name for name, _ in work["node-b"].domains] == ["vc1-0"]
        assert "76:77:6e:80:00:02" in work["node-b"].domains[0][1]
        assert [s.hostname for s, _ in work["node-a"].seeds] == ["vc1", "vc1-1"]


def test_public_network_reservation_and_the_frontend_stays_with_its_cluster(app, client):
    from portal import vms

    with app.app_context():
        make_server("node-a")
        owner = make_user("boss", Role.MANAGER)
        public = networks.create(name="pub", kind="bridged", uplink="br0", cidr="137.110.119.0/24")
        cluster = clusters.record_new(owner, _req(_appliance(), computes=1, public_network_id=public.id))
        db.session.commit()
        fe, compute = clusters.vms_of(cluster)
        assert fe.nics[1].network_id == public.id
        assert [(r.mac, r.ip) for r in public.reservations] == [("76:77:6e:80:00:01", "137.110.119.118")]
        assert networks.oem_strings(fe) == ("corral.ip=10.1.1.1/16",)  # the private NIC comes first, as in Rocks
        fe.state = compute.state = "off"
        with pytest.raises(vms.VMError, match="frontend of virtual cluster vc1.example.org: delete the cluster"):
            vms.check_delete(fe)
        vms.check_delete(compute)  # a compute may go from its own page too (its membership goes with it)
        fe_id, cid = fe.id, cluster.id
        db.session.commit()
    log_in_client(client, "boss")
    page = client.get(f"/vms/{fe_id}").get_data(as_text=True)
    assert f'href="/clusters/{cid}"' in page and "(frontend)" in page


def test_a_create_task_whose_worker_died_leaves_partial_vms(app, client):
    from datetime import timedelta

    from portal import tasks

    with app.app_context():
        make_server("node-a")
        make_user("boss", Role.MANAGER)
        appliance = _appliance()
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    log_in_client(client, "boss")
    form = {"fqdn": "dc.example.org", "public_ip": "137.110.119.118", "computes": "1", "appliance": str(appliance),
            "frontend_memory_mb": "256", "compute_memory_mb": "128"}
    assert client.post("/clusters/new", data=form).status_code == 302
    with app.app_context():
        task = db.session.execute(db.select(Task).where(Task.kind == "cluster-create")).scalar_one()
        task.job_id = "gone"  # its job vanished with its worker
        assert tasks.reconcile(task, grace=timedelta(0))
        db.session.commit()
        assert "dc, dc-0 are recorded as partially created" in task.log
        assert {v.state for v in db.session.execute(db.select(VM)).scalars()} == {"partial"}
        assert clusters.status(db.session.execute(db.select(VirtualCluster)).scalar_one()) == "partial"

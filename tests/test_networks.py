"""Networks: the rules (names, VLANs, subnets, reservations, NIC choices), the managers' page, and on the
bed two VMs on two servers on one VLAN reaching each other while a VM on another VLAN stays out of reach,
and a VM on a NAT network taking its address by DHCP and reaching the bed's router through the NAT."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading

import pytest

from portal import networks
from portal.extensions import db
from portal.models import NIC, VM, Network, Role, Server
from portal.vmm import netdev
from portal.vmm.facts import probe_facts
from tests.conftest import log_in_client, make_server, make_user, make_vm, run_worker_burst
from tests.bed.core import BRIDGE_ADDRESS
from tests.vm_util import act, bed_session, last_task, serial_command, vm_row, wait_serial


def test_rules_refuse_bad_input_and_change_nothing(app):
    with app.app_context():
        cases = [
            (dict(name="Bad name", kind="isolated"), "lowercase"),
            (dict(name="n1", kind="routed"), "Unknown network kind"),
            (dict(name="n1", kind="nat"), "A NAT network needs a subnet"),
            (dict(name="n1", kind="nat", cidr="10.1.0.0/24", vlan=7), "no VLAN or uplink"),
            (dict(name="n1", kind="bridged"), "needs the servers' interface"),
            (dict(name="n1", kind="bridged", uplink="eth0", vlan=5000), "between 1 and 4094"),
            (dict(name="n1", kind="isolated", cidr="10.1.0.0/33"), "not an IPv4 subnet"),
            (dict(name="n1", kind="isolated", dhcp_start="10.1.0.5", dhcp_end="10.1.0.9"), "needs a subnet"),
            (dict(name="n1", kind="isolated", cidr="10.1.0.0/24", dhcp_start="10.1.0.9", dhcp_end="10.1.0.5"),
             "after its last"),
            (dict(name="n1", kind="isolated", cidr="10.1.0.0/24", dhcp_start="10.2.0.9", dhcp_end="10.1.0.5"),
             "not a host address"),
        ]
        for kwargs, message in cases:
            with pytest.raises(networks.NetworkError, match=message):
                networks.create(**kwargs)
        assert db.session.execute(db.select(Network)).first() is None
        a = networks.create(name="v10", kind="bridged", uplink="eth0", vlan=10, cidr="10.10.0.7/24")
        assert (a.bridge, a.cidr) == ("cbr10", "10.10.0.0/24")
        with pytest.raises(networks.NetworkError, match="VLAN 10 is already used"):
            networks.create(name="v10b", kind="isolated", vlan=10)
        with pytest.raises(networks.NetworkError, match="already exists"):
            networks.create(name="v10", kind="isolated")
        assert networks.create(name="lab", kind="isolated").bridge.startswith("cbn")
        assert networks.create(name="flat", kind="bridged", uplink="br0").bridge == "br0"
        nat = networks.create(name="nat", kind="nat", cidr="10.9.0.0/24", dhcp_start="10.9.0.100",
                              dhcp_end="10.9.0.199")
        networks.add_reservation(nat, "02:aa:00:00:00:09", "10.9.0.9")
        xml = netdev.nat_xml(networks.nat_network(nat))
        assert "<forward mode='nat'/>" in xml and 'address="10.9.0.1" netmask="255.255.255.0"' in xml
        assert '<range start="10.9.0.100" end="10.9.0.199"/><host mac="02:aa:00:00:00:09" ip="10.9.0.9"/>' in xml
        networks.add_reservation(a, "02:AA:00:00:00:01", "10.10.0.5")
        with pytest.raises(networks.NetworkError, match="already reserved"):
            networks.add_reservation(a, "02:aa:00:00:00:02", "10.10.0.5")
        with pytest.raises(networks.NetworkError, match="not a host address"):
            networks.add_reservation(a, "02:aa:00:00:00:02", "10.10.0.255")


def test_nic_choices_reservation_address_and_delete_refused_while_used(app):
    with app.app_context():
        owner = make_user("own", Role.POWER)
        net = networks.create(name="v20", kind="bridged", uplink="eth0", vlan=20, cidr="10.20.0.0/24")
        vm = make_vm(owner, "m1")
        with pytest.raises(networks.NetworkError, match="unknown network choice"):
            networks.from_form({"nic0": "x"})
        with pytest.raises(networks.NetworkError, match="no longer exists"):
            networks.from_form({"nic0": "99999"})
        chosen = networks.from_form({"nic0": "user", "nic1": str(net.id), "nic2": "", "nic3": str(net.id)})
        assert chosen == [None, net, net]
        assert networks.from_form({}) == [None]  # no choice: one outbound-only NIC
        networks.attach(vm, chosen)
        nics = db.session.execute(db.select(NIC).where(NIC.vm_id == vm.id).order_by(NIC.position)).scalars().all()
        assert [n.network_id for n in nics] == [None, net.id, net.id]
        assert len({n.mac for n in nics}) == 3
        networks.add_reservation(net, nics[1].mac, "10.20.0.40")
        assert networks.oem_strings(vm) == ("corral.ip=10.20.0.40/24",)
        assert [v.name for v in networks.vms_on(net)] == ["m1"]
        with pytest.raises(networks.NetworkError, match="used by m1"):
            networks.delete(net)


def test_page_creates_lists_reserves_and_deletes(app, client):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        make_user("boss", Role.MANAGER)
        db.session.commit()
    log_in_client(client, "boss")
    assert ">Networks<" in client.get("/").get_data(as_text=True)
    r = client.post("/networks/", data={"name": "v30", "kind": "bridged", "uplink": "eth0", "vlan": "30",
                                        "cidr": "10.30.0.0/24", "dhcp_start": "10.30.0.100",
                                        "dhcp_end": "10.30.0.199"}, follow_redirects=True)
    assert "Network v30 created" in r.get_data(as_text=True)
    r = client.post("/networks/", data={"name": "v31", "kind": "bridged", "uplink": "eth0", "vlan": "x"},
                    follow_redirects=True)
    assert "between 1 and 4094" in r.get_data(as_text=True)
    with app.app_context():
        nid = db.session.execute(db.select(Network.id).where(Network.name == "v30")).scalar_one()
        assert db.session.execute(db.select(db.func.count(Network.id))).scalar_one() == 1
    r = client.post(f"/networks/{nid}/reservations", data={"mac": "02:00:00:00:30:01", "ip": "10.30.0.5"},
                    follow_redirects=True)
    html = r.get_data(as_text=True)
    assert "02:00:00:00:30:01" in html and "10.30.0.5" in html and "DHCP 10.30.0.100" in html
    r = client.post(f"/networks/{nid}/reservations", data={"mac": "01:00:00:00:30:01", "ip": "10.30.0.6"},
                    follow_redirects=True)
    assert "multicast" in r.get_data(as_text=True)
    r = client.post(f"/networks/{nid}/delete", follow_redirects=True)
    assert "Network v30 deleted" in r.get_data(as_text=True)


def test_vm_networks_change_while_off_only(app, client):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    with app.app_context():
        owner = make_user("pow", Role.POWER)
        net = networks.create(name="v40", kind="isolated", vlan=40)
        vm = make_vm(owner, "m4", server=make_server(), state="running")
        vm_id, net_id, mac0 = vm.id, net.id, vm.nics[0].mac
        db.session.commit()
    log_in_client(client, "pow")
    assert 'data-testid="vm-nics"' in client.get(f"/vms/{vm_id}").get_data(as_text=True)
    r = client.post(f"/networks/vm/{vm_id}", data={"nic0": str(net_id)}, follow_redirects=True)
    assert "Power m4 off" in r.get_data(as_text=True)
    with app.app_context():
        db.session.get(VM, vm_id).state = "off"
        db.session.commit()
    r = client.post(f"/networks/vm/{vm_id}", data={"nic0": str(net_id), "nic1": "user"})
    assert r.status_code == 302 and "/tasks/" in r.headers["Location"]
    with app.app_context():
        nics = db.session.execute(db.select(NIC).where(NIC.vm_id == vm_id).order_by(NIC.position)).scalars().all()
        assert [(n.mac == mac0, n.network_id) for n in nics] == [(True, net_id), (False, None)]
    client.post(f"/networks/vm/{vm_id}", data={"nic0": "user"})  # the first task is still queued: busy
    with app.app_context():
        assert db.session.execute(db.select(db.func.count(NIC.id)).where(NIC.vm_id == vm_id)).scalar_one() == 2


def test_placement_and_moves_only_offer_servers_with_the_uplink(app):
    from portal import moves, vms

    with app.app_context():
        owner = make_user("own", Role.POWER)
        with_eth1 = make_server("has-eth1", interfaces_json=json.dumps(["br0", "eth0", "eth1"]))
        without = make_server("no-eth1", interfaces_json=json.dumps(["eth0"]))
        without.free_memory_mb = 65000  # the roomier one: chosen but for its interfaces
        net = networks.create(name="v50", kind="bridged", uplink="eth1", vlan=50)
        assert networks.carry_problem(net, without) == "no-eth1 has no interface eth1 for network v50"
        assert networks.carry_problem(net, make_server("unprobed")) is None  # checked by its task instead
        db.session.execute(db.update(Server).where(Server.hostname == "unprobed").values(status="marked_down"))
        placed = vms.place(256, 1, eligible=networks.carries_all([net]))
        assert placed.server.hostname == "has-eth1"
        with pytest.raises(vms.VMError, match="no-eth1 lack the VM's networks"):
            vms.place(256, 1, server_id=without.id, eligible=networks.carries_all([net]))
        vm = make_vm(owner, "m5", server=without)
        with pytest.raises(networks.NetworkError, match="no interface eth1"):
            networks.attach(vm, [net])
        vm.server_id, vm.disk_id = with_eth1.id, with_eth1.disks[0].id
        db.session.flush()
        db.session.refresh(vm)
        networks.attach(vm, [net])
        cand = moves.assess(vm, without, "cold")
        assert "no-eth1 has no interface eth1 for network v50" in cand.problems


# --- on the bed -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _http_server(address: str, body: bytes):
    """A one-page HTTP server on *address* (the bed's router, in this namespace); yields its port."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((address, 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _curl(bed, index: int, url: str) -> str | None:
    """GET from inside a bed server's namespace (the guests serve their name with busybox httpd)."""
    r = bed.exec(index, ["curl", "-s", "--connect-timeout", "3", "--max-time", "5", url], check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def test_vlan_network_across_two_servers(app, client, bed, bed_servers, bed_portal):
    """VMs a (server 1) and b (server 2) on VLAN 101, c (server 2) on VLAN 102 and on a NAT network, addresses
    from reservations. From server 1's VLAN-101 bridge, b answers across servers and c does not; c's NAT network
    runs on server 2 with its reservation; deleting the VMs removes bridges, carriers and the NAT network."""
    s1, s2 = bed_servers[:2]
    with app.app_context():
        n101 = networks.create(name="v101", kind="bridged", uplink="br0", vlan=101, cidr="10.101.0.0/24")
        n102 = networks.create(name="v102", kind="bridged", uplink="br0", vlan=102, cidr="10.102.0.0/24")
        for net, mac, ip in ((n101, "02:00:00:65:00:0a", "10.101.0.10"), (n101, "02:00:00:65:00:0b", "10.101.0.11"),
                             (n102, "02:00:00:66:00:0c", "10.102.0.12")):
            networks.add_reservation(net, mac, ip)
        nat = networks.create(name="nat1", kind="nat", cidr="10.103.0.0/24", dhcp_start="10.103.0.100",
                              dhcp_end="10.103.0.199")
        ids = {"v101": n101.id, "v102": n102.id, "nat1": nat.id}
        db.session.commit()
    guests = [("t-neta", 0, "02:00:00:65:00:0a", "v101"), ("t-netb", 1, "02:00:00:65:00:0b", "v101"),
              ("t-netc", 1, "02:00:00:66:00:0c", "v102")]
    for name, server, mac, net in guests:
        r = client.post("/vms/new", data={
            "name": name, "appliance": bed_portal["appliance"], "memory_mb": 256, "vcpus": 1, "clone": "y",
            "placement": str(bed_portal["disks"][bed_portal["servers"][server]]), "mac": mac,
            "nic0": str(ids[net]), **({"nic1": str(ids["nat1"])} if name == "t-netc" else {})})
        assert r.status_code == 302, r.get_data(as_text=True)
    run_worker_burst()
    for name, *_ in guests:
        task = last_task(app, name)
        assert task.state == "succeeded", (name, task.error, task.log)
    with app.app_context():
        nat_nic = db.session.execute(db.select(NIC).join(VM, VM.id == NIC.vm_id).where(
            VM.name == "t-netc", NIC.position == 1)).scalar_one()
        assert nat_nic.network_id == ids["nat1"]
        networks.add_reservation(db.session.get(Network, ids["nat1"]), nat_nic.mac, "10.103.0.50")
        nat_mac = nat_nic.mac
        db.session.commit()
    for name, *_ in guests:
        act(app, client, name, "start", "running")
    nat_xml = bed.virsh(s2.index, "net-dumpxml", "corral-nat1").stdout
    assert f"<host mac='{nat_mac}' ip='10.103.0.50'/>" in nat_xml
    assert "10.103.0.1/24" in bed.exec(s2.index, ["ip", "-o", "addr", "show"]).stdout
    assert "as vxlan" in last_task(app, "t-netb").log  # this kernel has no 802.1Q
    for name, server, *_ in guests:
        wait_serial(bed_servers[server], name, lambda t: "CORRAL-READY" in t)

    # what the bed uses: a VXLAN carrier with VNI = the VLAN id, on both servers
    assert "vxlan id 101" in bed.exec(s1.index, ["ip", "-d", "link", "show", "cx101"]).stdout
    assert "vxlan id 102" in bed.exec(s2.index, ["ip", "-d", "link", "show", "cx102"]).stdout
    assert bed.exec(s1.index, ["ip", "link", "show", "cx102"], check=False).returncode != 0  # only where needed
    # idempotent: ensuring again adds nothing (one FDB entry per peer)
    with app.app_context():
        server = db.session.get(VM, vm_row(app, "t-neta").id).server
        seg = networks.segment(db.session.get(Network, ids["v101"]), server, (s2.address,))
    with bed_session(s1) as session:
        assert netdev.ensure(session, seg) == "vxlan"
        assert "br0" in probe_facts(session).interfaces  # what placement checks uplinks against
        with pytest.raises(netdev.NetdevError, match="has no network interface nosuch0"):
            netdev.ensure(session, netdev.Segment("cbr999", "nosuch0", 999, s1.address))
    assert bed.exec(s1.index, ["ip", "link", "show", "cbr999"], check=False).returncode != 0  # nothing made
    fdb = bed.exec(s1.index, ["bridge", "fdb", "show", "dev", "cx101"]).stdout
    assert len(re.findall(rf"00:00:00:00:00:00 dst {re.escape(s2.address)} ", fdb)) == 1

    # a probe address on server 1's VLAN-101 bridge, in both subnets
    bed.exec(s1.index, ["ip", "addr", "add", "10.101.0.250/24", "dev", "cbr101"])
    bed.exec(s1.index, ["ip", "addr", "add", "10.102.0.250/24", "dev", "cbr101"])
    assert _curl(bed, s1.index, "http://10.101.0.10/") == "t-neta"  # same server
    assert _curl(bed, s1.index, "http://10.101.0.11/") == "t-netb"  # the other server, over the VLAN
    assert _curl(bed, s1.index, "http://10.102.0.12/") is None  # another VLAN: out of reach

    # NAT: c's second NIC takes its reserved address from the NAT network's DHCP, and c reaches out
    # through server 2's masquerade to the bed's own router address (a loopback-only HTTP server there);
    # the servers have no default route, so nothing leaves the bed.
    assert bed.exec(s2.index, ["ip", "route", "show", "default"]).stdout.strip() == ""
    with _http_server(BRIDGE_ADDRESS, b"corral-nat-ok\n") as port:
        script = ("printf '#!/bin/sh\\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface "
                  "&& ip route add default via $router\\n' > /tmp/dh; chmod +x /tmp/dh; ip link set eth1 up; "
                  "udhcpc -i eth1 -n -q -t 10 -s /tmp/dh >/dev/null 2>&1; "
                  "echo ADDR=$(ip -4 -o addr show eth1 | awk '{print $4}')=; "
                  f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {BRIDGE_ADDRESS} {port} | sed 's/^/BODY-/'; "
                  "echo DONE-$((40+2))")
        out = serial_command(bed, s2, "t-netc", script, r"DONE-42", timeout=60)
    assert "ADDR=10.103.0.50/24=" in out and "BODY-corral-nat-ok" in out, out

    for name, *_ in guests:
        vm = vm_row(app, name)
        act(app, client, name, "poweroff", "off")
        assert client.post(f"/vms/{vm.id}/delete").status_code == 302
        run_worker_burst()
    for bs in (s1, s2):
        links = bed.exec(bs.index, ["ip", "-o", "link", "show"]).stdout
        assert not re.search(r"\b(cbr|cx|cv)10[12]\b|cnat", links), links
    assert bed.virsh(s2.index, "net-info", "corral-nat1", check=False).returncode != 0

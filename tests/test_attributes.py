"""Attributes (lights-out installs): override resolution G < A < O < H with sources, key validation, the
pages and the API, the NoCloud seed ISO's files (read back from the ISO), and on the bed a VM from a
cloud-init appliance that boots with its seed CD-ROM and prints an attribute on serial."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from portal import attributes
from portal.extensions import db
from portal.jobs.vms import domain_spec
from portal.models import NIC, VM, Appliance, Attribute, LicenseKey, Network, NetworkReservation, Role
from portal.vmm import seed
from portal.vmm.domain import render
from tests.conftest import log_in_client, make_server, make_user, make_vm, run_worker_burst
from tests.vm_util import act, create, last_task, vm_row, wait_serial


def _world(app) -> dict:
    with app.app_context():
        boss = make_user("boss", Role.MANAGER)
        pow_ = make_user("pow", Role.POWER)
        reg = make_user("reg")
        server = make_server()
        app_row = Appliance(name="cloudy", state="ready", os_type="debian12", cloud_init=True)
        db.session.add(app_row)
        db.session.flush()
        vm = make_vm(pow_, "pvm", server=server, appliance_id=app_row.id, disk_id=server.disks[0].id)
        rvm = make_vm(reg, "rvm", server=server, appliance_id=app_row.id, disk_id=server.disks[0].id)
        return {"boss": boss.id, "appliance": app_row.id, "vm": vm.id, "rvm": rvm.id}


def _set(scope, key, value):
    attributes.set_attr(scope, key, value)
    db.session.commit()


def test_more_specific_overrides_with_source_letters(app):
    ids = _world(app)
    with app.app_context():
        vm = db.session.get(VM, ids["vm"])
        appliance = db.session.get(Appliance, ids["appliance"])
        _set(attributes.GLOBAL, "corral_motd", "global")
        _set(attributes.GLOBAL, "timezone", "UTC")
        _set(attributes.GLOBAL, "only_global", "g")
        _set(attributes.for_appliance(appliance), "corral_motd", "appliance")
        _set(attributes.for_appliance(appliance), "timezone", "Europe/Paris")
        _set(attributes.for_os("debian12"), "corral_motd", "os")
        _set(attributes.for_os("other"), "only_global", "not mine")
        _set(attributes.for_vm(vm), "corral_motd", "vm")
        got = {r.key: (r.value, r.source) for r in attributes.resolve(vm)}
        assert got == {"corral_motd": ("vm", "H"), "timezone": ("Europe/Paris", "A"), "only_global": ("g", "G")}
        attributes.unset(attributes.for_vm(vm), "corral_motd")
        assert {r.key: r.source for r in attributes.resolve(vm)}["corral_motd"] == "O"
        appliance.os_type = None
        assert {r.key: r.source for r in attributes.resolve(vm)}["corral_motd"] == "A"
        # the pool's key shows as an H attribute nobody sets by hand
        db.session.add(LicenseKey(appliance_id=appliance.id, key="KEY-123", vm_id=vm.id))
        db.session.flush()
        assert ("license_key", "KEY-123", "H") in [(r.key, r.value, r.source) for r in attributes.resolve(vm)]
        with pytest.raises(attributes.AttributeError_, match="license key pool"):
            attributes.set_attr(attributes.for_vm(vm), "license_key", "mine")
        # setting again changes the value in place: one row per scope and key
        _set(attributes.GLOBAL, "timezone", "UTC+1")
        assert db.session.execute(db.select(db.func.count(Attribute.id)).where(Attribute.key == "timezone",
                                                                               Attribute.scope == "global")
                                  ).scalar_one() == 1
        # a VM's and an appliance's own attributes go with them
        db.session.delete(vm)
        db.session.commit()
        assert not db.session.execute(db.select(Attribute.id).where(Attribute.scope == "vm")).first()
        db.session.execute(db.delete(Appliance).where(Appliance.id == ids["appliance"]))
        db.session.commit()
        assert not db.session.execute(db.select(Attribute.id).where(Attribute.scope == "appliance")).first()


@pytest.mark.parametrize("key, message", [
    ("", "letters, digits or underscores"), ("1abc", "does not start with a digit"), ("a-b", "letters, digits"),
    ("a" * 65, "1 to 64"), ("with space", "not one"),
])
def test_bad_keys_are_refused_with_a_clear_message(app, key, message):
    with app.app_context(), pytest.raises(attributes.AttributeError_, match=message):
        attributes.set_attr(attributes.GLOBAL, key, "v")


def test_bad_values_and_os_types_are_refused(app):
    with app.app_context():
        with pytest.raises(attributes.AttributeError_, match="U\\+0007"):
            attributes.set_attr(attributes.GLOBAL, "k", "bell\x07")
        with pytest.raises(attributes.AttributeError_, match="at most 4096"):
            attributes.set_attr(attributes.GLOBAL, "k", "x" * 4097)
        with pytest.raises(attributes.AttributeError_, match="OS type"):
            attributes.for_os("Debian 12")
        assert attributes.check_value("a\r\nb\tc") == "a\nb\tc"
        assert attributes.parse_assignment("corral_motd=a=b") == ("corral_motd", "a=b")


def _read_iso(iso: Path, name: str) -> str:
    """One file of an ISO, read back with xorriso (as a guest would see it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name
        subprocess.run(["xorriso", "-indev", str(iso), "-osirrox", "on", "-extract", f"/{name}", str(out)],
                       capture_output=True, check=True)
        return out.read_text(encoding="utf-8")


def test_seed_iso_holds_valid_nocloud_files(app, tmp_path):
    ids = _world(app)
    with app.app_context():
        vm = db.session.get(VM, ids["vm"])
        net = Network(name="lan", kind="nat", cidr="10.20.0.0/24", dhcp_start="10.20.0.100", dhcp_end="10.20.0.200")
        iso_net = Network(name="iso", kind="isolated")
        db.session.add_all([net, iso_net])
        db.session.flush()
        vm.nics[0].network_id = net.id
        db.session.add(NetworkReservation(network_id=net.id, mac=vm.nics[0].mac, ip="10.20.0.5"))
        db.session.add(NIC(vm_id=vm.id, position=1, mac="52:54:00:99:00:01", network_id=iso_net.id))
        db.session.add(NIC(vm_id=vm.id, position=2, mac="52:54:00:99:00:02"))
        db.session.commit()
        db.session.refresh(vm)
        tricky = "it's \"quoted\": #not a comment\n  indented line\nünïcödé ✓ $(not run) `nor this`"
        _set(attributes.GLOBAL, "corral_motd", tricky)
        _set(attributes.GLOBAL, "ssh_authorized_keys", "ssh-ed25519 AAAA one\nssh-ed25519 BBBB two\n")
        _set(attributes.GLOBAL, "packages", "htop, curl vim")
        _set(attributes.for_vm(vm), "hostname", "web-1")
        data = attributes.seed_for(vm)
        iso = tmp_path / "seed.iso"
        seed.build_iso(data, iso)
        label = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info"], capture_output=True, text=True,
                               check=True).stdout
        assert "Volume Id    : cidata" in label
        meta = yaml.safe_load(_read_iso(iso, "meta-data"))
        assert meta == {"instance-id": f"corral-{vm_uuid(vm)}", "local-hostname": "pvm"}
        user_text = _read_iso(iso, "user-data")
        assert user_text.startswith("#cloud-config\n")
        user = yaml.safe_load(user_text)
        assert user["hostname"] == "web-1"
        assert user["ssh_authorized_keys"] == ["ssh-ed25519 AAAA one", "ssh-ed25519 BBBB two"]
        assert user["packages"] == ["htop", "curl", "vim"]
        [wf] = user["write_files"]
        assert wf["path"] == "/etc/corral/attributes" and wf["permissions"] == "0600"
        # the guest's attribute file is shell: sourcing it gives back every value unchanged, running nothing
        env_file = tmp_path / "attrs"
        env_file.write_text(wf["content"])
        out = subprocess.run(["sh", "-c", '. "$1"; printf %s "$corral_motd"', "sh", str(env_file)],
                             capture_output=True, text=True, check=True).stdout
        assert out == tricky
        net_cfg = yaml.safe_load(_read_iso(iso, "network-config"))
        assert net_cfg["version"] == 2
        eth = net_cfg["ethernets"]
        assert eth["eth0"]["match"]["macaddress"] == vm.nics[0].mac
        assert eth["eth0"]["addresses"] == ["10.20.0.5/24"] and eth["eth0"]["dhcp4"] is False
        assert eth["eth0"]["routes"] == [{"to": "0.0.0.0/0", "via": "10.20.0.1"}]
        assert eth["eth1"]["dhcp4"] is False  # isolated, no DHCP range: nobody to ask
        assert eth["eth2"]["dhcp4"] is True  # user-mode: QEMU's DHCP


def vm_uuid(vm) -> str:
    from portal.vms import domain_uuid

    return domain_uuid(vm)


def test_domain_gets_the_seed_cdrom_only_from_cloud_init_appliances(app):
    ids = _world(app)
    with app.app_context():
        vm = db.session.get(VM, ids["vm"])
        xml = ET.fromstring(render(domain_spec(vm)))
        [cd] = [d for d in xml.iter("disk") if d.get("device") == "cdrom"]
        assert cd.find("source").get("file").endswith("/corral-vms/pvm/seed.iso")
        assert cd.find("source").get("startupPolicy") == "optional"
        assert cd.find("target").get("dev") == "hdd"
        assert seed.OEM_STRING in [e.text for e in xml.iter("entry")]
        assert [b.get("dev") for b in xml.find("os").iter("boot")] == ["hd"]  # never booted from
        db.session.get(Appliance, ids["appliance"]).cloud_init = False
        xml = ET.fromstring(render(domain_spec(vm)))
        assert not [d for d in xml.iter("disk") if d.get("device") == "cdrom"]


def test_pages_managers_scopes_and_vm_owner_rules(app, client):
    app.config["TEST_CLIENT_SENDS_CSRF"] = True
    ids = _world(app)
    log_in_client(client, "boss")
    r = client.post("/attributes/set", data={"scope": "global", "target": "", "key": "corral_motd",
                                             "value": "from-global"}, follow_redirects=True)
    assert "corral_motd set at global." in r.get_data(as_text=True)
    r = client.post("/attributes/set", data={"scope": "os", "target": "debian12", "key": "9bad", "value": "x"},
                    follow_redirects=True)
    assert "does not start with a digit" in r.get_data(as_text=True)
    r = client.post("/attributes/set", data={"scope": "os", "target": "Not An OS", "key": "k", "value": "x"},
                    follow_redirects=True)
    assert "is not one" in r.get_data(as_text=True)
    r = client.post("/attributes/set", data={"scope": "os", "target": "debian12", "key": "corral_os", "value": "deb"},
                    follow_redirects=True)
    assert "corral_os set at OS type debian12." in r.get_data(as_text=True)
    r = client.post(f"/attributes/appliances/{ids['appliance']}/settings", data={"os_type": "alpine"},
                    follow_redirects=True)
    body = r.get_data(as_text=True)
    assert "OS type alpine; its VMs get no seed" in body
    r = client.post(f"/attributes/appliances/{ids['appliance']}/settings",
                    data={"os_type": "debian12", "cloud_init": "y"}, follow_redirects=True)
    assert "get a cloud-init seed CD-ROM" in r.get_data(as_text=True)
    page = client.get("/attributes/").get_data(as_text=True)
    assert "from-global" in page and "debian12" in page and "cloudy" in page
    assert "deb" in client.get("/attributes/os/debian12").get_data(as_text=True)
    client.post("/logout")

    log_in_client(client, "pow")  # a power owner sets the VM's own attributes on its page
    r = client.post(f"/attributes/vm/{ids['vm']}", data={"key": "corral_motd", "value": "mine"},
                    follow_redirects=True)
    body = r.get_data(as_text=True)
    assert "corral_motd set on pvm; the guest reads it at its next power on." in body
    assert 'data-testid="vm-attributes"' in body and "mine" in body and "deb" in body
    assert client.post(f"/attributes/vm/{ids['rvm']}", data={"key": "k", "value": "v"}).status_code == 404
    client.post("/logout")

    log_in_client(client, "reg")  # a regular owner reads them, without forms
    page = client.get(f"/vms/{ids['rvm']}").get_data(as_text=True)
    assert "from-global" in page and 'data-testid="set-attribute"' not in page
    assert client.post(f"/attributes/vm/{ids['rvm']}", data={"key": "k", "value": "v"}).status_code == 403
    assert client.get("/attributes/").status_code == 403


def test_api_lists_with_sources_sets_and_unsets(app, client):
    from portal import api_tokens

    ids = _world(app)
    with app.app_context():
        from portal.models import User

        tokens = {name: api_tokens.create(db.session.execute(db.select(User).where(User.username == name))
                                          .scalar_one(), name="t", scope="write", expires_in_days=None)[1]
                  for name in ("boss", "pow")}
        db.session.commit()
    boss = {"Authorization": f"Bearer {tokens['boss']}"}
    pow_ = {"Authorization": f"Bearer {tokens['pow']}"}
    r = client.put("/api/v1/attributes", json={"scope": "appliance", "target": str(ids["appliance"]),
                                               "key": "corral_motd", "value": "app"}, headers=boss)
    assert r.status_code == 200 and r.get_json()["items"] == [
        {"key": "corral_motd", "value": "app", "source": "A", "scope": "appliance"}]
    r = client.put("/api/v1/attributes", json={"scope": "global", "key": "bad-key", "value": "x"}, headers=boss)
    assert r.status_code == 422 and "letters, digits" in r.get_json()["error"]["message"]
    r = client.put(f"/api/v1/vms/{ids['vm']}/attributes", json={"key": "corral_motd", "value": "vm"}, headers=pow_)
    assert r.status_code == 200
    assert r.get_json()["items"] == [{"key": "corral_motd", "value": "vm", "source": "H", "scope": "vm"}]
    assert r.get_json()["cloud_init"] is True
    r = client.delete(f"/api/v1/vms/{ids['vm']}/attributes?key=corral_motd", headers=pow_)
    assert r.get_json()["items"][0]["source"] == "A"
    r = client.get(f"/api/v1/attributes?scope=appliance&target={ids['appliance']}", headers=boss)
    assert r.get_json()["scope"] == "appliance" and len(r.get_json()["items"]) == 1
    r = client.delete(f"/api/v1/attributes?scope=appliance&target={ids['appliance']}&key=corral_motd", headers=boss)
    assert r.status_code == 200 and r.get_json()["items"] == []
    url = f"/api/v1/library/appliances/{ids['appliance']}/cloud-init"
    r = client.put(url, json={"os_type": "Bad OS", "cloud_init": False}, headers=boss)
    assert r.status_code == 422 and "OS type" in r.get_json()["error"]["message"]
    r = client.put(url, json={"os_type": "alpine", "cloud_init": False}, headers=boss)
    assert r.get_json() == {"id": ids["appliance"], "name": "cloudy", "os_type": "alpine", "cloud_init": False}
    assert client.get(f"/api/v1/vms/{ids['vm']}/attributes", headers=pow_).get_json()["cloud_init"] is False
    assert client.put(url, json={"cloud_init": True}, headers=pow_).status_code == 403


# --- on the bed: a VM from a cloud-init appliance boots with its seed and prints an attribute ---------------


@pytest.fixture
def cloudy(app, bed_portal):
    with app.app_context():
        appliance = db.session.get(Appliance, bed_portal["appliance"])
        attributes.set_appliance_os(appliance, os_type="busybox", cloud_init=True)
        attributes.set_attr(attributes.GLOBAL, "corral_motd", "from-global")
        attributes.set_attr(attributes.for_os("busybox"), "corral_os", "busybox via O")
        db.session.commit()
    return bed_portal


def test_guest_reads_its_attribute_from_the_seed_cdrom(app, client, cloudy, bed_servers):
    bs = bed_servers[0]
    assert create(client, cloudy, "t-attr", clone=True).status_code == 302
    run_worker_burst()
    task = last_task(app, "t-attr")
    assert task.state == "succeeded", (task.error, task.log)
    assert "Writing the cloud-init seed" in task.log
    vm = vm_row(app, "t-attr")
    with app.app_context():
        from portal.vms import seed_path

        iso = bs.host_path(seed_path(db.session.get(VM, vm.id)))
    assert yaml.safe_load(_read_iso(iso, "meta-data"))["local-hostname"] == "t-attr"
    dumpxml = subprocess.run(["virsh", "-c", bs.uri_tcp, "dumpxml", "t-attr"], capture_output=True, text=True,
                             check=True).stdout
    assert "seed.iso" in dumpxml
    # the VM's own value overrides the global one; the guest sees it at power on (the seed is rendered again)
    r = client.post(f"/attributes/vm/{vm.id}", data={"key": "corral_motd", "value": "hello from H"},
                    follow_redirects=True)
    assert "set on t-attr" in r.get_data(as_text=True)
    act(app, client, "t-attr", "start", "running")
    text = wait_serial(bs, "t-attr", lambda t: "CORRAL-READY" in t, timeout=60)
    assert "CORRAL-ATTR corral_motd=hello from H" in text
    assert "CORRAL-ATTR corral_os=busybox via O" in text
    # a live migration renders the seed on the target (the domain there points at it) and removes the source's
    b2 = bed_servers[1]
    r = client.post(f"/vms/{vm.id}/move", data={"mode": "live", "server_id": cloudy["servers"][1]})
    assert r.status_code == 303 and "/tasks/" in r.headers["Location"]
    run_worker_burst()
    task = last_task(app, "t-attr")
    assert task.state == "succeeded", (task.error, task.log)
    assert "Writing the cloud-init seed" in task.log
    assert vm_row(app, "t-attr").server_id == cloudy["servers"][1]
    with app.app_context():
        path2 = seed_path(db.session.get(VM, vm.id))
    iso2 = b2.host_path(path2)
    assert iso2.exists() and not iso.exists()
    on_b2 = subprocess.run(["virsh", "-c", b2.uri_tcp, "dumpxml", "t-attr"], capture_output=True, text=True,
                           check=True).stdout
    assert seed_path_text(on_b2) == path2  # present there (a missing optional CD-ROM would have no source)
    act(app, client, "t-attr", "poweroff", "off")
    assert client.post(f"/vms/{vm.id}/delete").status_code == 302
    run_worker_burst()
    assert vm_row(app, "t-attr") is None
    assert not iso2.exists()  # deleting the VM removed its seed from the server


def seed_path_text(xml: str) -> str | None:
    """The seed CD-ROM's file in a domain XML."""
    for disk in ET.fromstring(xml).iter("disk"):
        if disk.get("device") == "cdrom":
            return disk.find("source").get("file")
    return None


# Debian's cloud-init package, unpacked (not installed) by `.ci/install --test`; it runs under the system
# Python, whose Debian packages provide what it imports.
CLOUD_INIT_LIB = Path(__file__).resolve().parents[1] / ".cache/cloud-init/usr/lib/python3/dist-packages"
CLOUD_INIT = ["/usr/bin/python3", "-c", "import sys; from cloudinit.cmd.main import main; sys.exit(main())"]


@pytest.mark.skipif(not (CLOUD_INIT_LIB / "cloudinit").is_dir(), reason="run bash .ci/install --test (cloud-init)")
def test_cloud_init_accepts_the_rendered_files(tmp_path):
    """cloud-init's own schema check of user-data, and its network-state parser of network-config (Debian's
    cloud-init 22.4 runs under the system Python)."""
    env = {**os.environ, "PYTHONPATH": str(CLOUD_INIT_LIB)}
    data = seed.Seed("corral-x", "t1", (
        ("corral_motd", "it's \"q\"\n  two ✓"), ("fqdn", "t1.example.org"), ("locale", "C.UTF-8"),
        ("packages", "htop curl"), ("runcmd", "echo a\necho b"), ("ssh_authorized_keys", "ssh-ed25519 AAAA a"),
        ("timezone", "UTC")),
        (seed.SeedNic("52:54:00:aa:bb:cc", "eth0", address="10.0.0.5/24", gateway="10.0.0.1"),
         seed.SeedNic("52:54:00:aa:bb:cd", "eth1"), seed.SeedNic("52:54:00:aa:bb:ce", "eth2", dhcp=False)))
    files = seed.files(data)
    (tmp_path / "user-data").write_text(files["user-data"])
    (tmp_path / "network-config").write_text(files["network-config"])
    r = subprocess.run([*CLOUD_INIT, "schema", "--config-file", str(tmp_path / "user-data")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "Valid cloud-config" in r.stdout, r.stdout + r.stderr
    (tmp_path / "bad").write_text("#cloud-config\npackages: 5\n")  # the check does check
    assert subprocess.run([*CLOUD_INIT, "schema", "-c", str(tmp_path / "bad")], capture_output=True,
                          env=env).returncode
    parse = ("import sys, yaml\nfrom cloudinit.net.network_state import parse_net_config_data\n"
             "ns = parse_net_config_data(yaml.safe_load(open(sys.argv[1])))\n"
             "for i in ns.iter_interfaces():\n"
             "    print(i['name'], i['mac_address'], [(s['type'], s.get('address'), s.get('prefix'),"
             " [(r.get('network'), r.get('gateway')) for r in s.get('routes', [])]) for s in i['subnets']])\n")
    out = subprocess.run(["/usr/bin/python3", "-c", parse, str(tmp_path / "network-config")], capture_output=True,
                         text=True, check=True, env=env).stdout.splitlines()
    assert out[0] == "eth0 52:54:00:aa:bb:cc [('static', '10.0.0.5', 24, [('0.0.0.0', '10.0.0.1')])]"
    assert out[1] == "eth1 52:54:00:aa:bb:cd [('dhcp4', None, None, [])]"
    assert out[2] == "eth2 52:54:00:aa:bb:ce []"


def test_corral_cli_lists_sets_and_removes_host_attrs(app, live_server, tmp_path):
    """``corral-cli list|set|remove host attr`` as a real process against a live portal (Rocks' listing)."""
    import os
    import sys

    from portal import api_tokens
    from portal.models import User

    ids = _world(app)
    with app.app_context():
        _set(attributes.GLOBAL, "timezone", "UTC")
        pow_ = db.session.get(User, db.session.get(VM, ids["vm"]).owner_id)
        token = api_tokens.create(pow_, name="cli", scope="write", expires_in_days=None)[1]
        boss = api_tokens.create(db.session.get(User, ids["boss"]), name="cli", scope="write",
                                 expires_in_days=None)[1]
        db.session.commit()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path), "CORRAL_URL": live_server, "CORRAL_TOKEN": token})
    cli = str(Path(sys.executable).with_name("corral-cli"))

    def run(*args, who=token):
        return subprocess.run([cli, *args], capture_output=True, text=True, env={**env, "CORRAL_TOKEN": who},
                              timeout=60)

    # the managers' scopes: global, appliance (by name), OS type
    assert run("set", "appliance", "attr", "cloudy", "corral_app=a1", who=boss).returncode == 0
    assert run("set", "os", "attr", "debian12", "corral_os=o1", who=boss).returncode == 0
    assert [line.split() for line in run("list", "os", "attr", "debian12", who=boss).stdout.splitlines()] == [
        ["OS", "ATTR", "VALUE", "SOURCE"], ["debian12:", "corral_os", "o1", "O"]]
    assert [line.split() for line in run("list", "attr", who=boss).stdout.splitlines()] == [
        ["ATTR", "VALUE", "SOURCE"], ["timezone", "UTC", "G"]]
    assert run("remove", "appliance", "attr", "cloudy", "corral_app", who=boss).returncode == 0
    assert run("set", "attr", "x=1").returncode == 1  # a power user: the managers' scope

    r = run("set", "host", "attr", "pvm", "corral_motd=two words")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in run("list", "host", "attr", "pvm").stdout.splitlines()]
    assert rows == [["HOST", "ATTR", "VALUE", "SOURCE"], ["pvm:", "corral_motd", "two", "words", "H"],
                    ["pvm:", "corral_os", "o1", "O"], ["pvm:", "timezone", "UTC", "G"]]
    bad = run("set", "host", "attr", "pvm", "9x=1")
    assert bad.returncode == 1 and "does not start with a digit" in bad.stderr
    assert run("remove", "host", "attr", "pvm", "corral_motd").returncode == 0
    assert [i["key"] for i in json.loads(run("--json", "list", "host", "attr", "pvm").stdout)["items"]] == [
        "corral_os", "timezone"]
    assert run("remove", "host", "attr", "pvm", "corral_motd").returncode == 1  # not set any more
    assert run("list", "host", "attr", "rvm").returncode == 1  # someone else's VM: not found

"""The bed itself: servers, SSH, libvirt, the appliance, migration, teardown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.bed import (
    BRIDGE,
    Bed,
    BedServer,
    appliance_domain_xml,
    bed_processes,
    wait_for_serial,
)
from tests.bed._appliance import appliance
from tests.bed.core import NETNS_PREFIX, _link_exists, _netns_list, _tcp_open
from tests.bed.guest import GuestLog, serial_log_path

pytestmark = [pytest.mark.bed, pytest.mark.slow]

GUEST_IP = "10.77.0.101"  # inside the bed's internal subnet
BOOT_TIMEOUT = 90  # TCG on a busy 2-core machine; never asserted as a duration


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          **kw)  # type: ignore[call-overload]


def _virsh(uri: str, *args: str) -> str:
    proc = _run(["virsh", "-q", "-c", uri, *args])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _linked_clone(base: Path, server: BedServer, name: str) -> str:
    """Create a linked clone of *base* in the server's images dir; return its in-server path."""
    host = Path(server.images_dir_host) / f"{name}.qcow2"
    host.unlink(missing_ok=True)
    proc = _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                 str(host)])
    assert proc.returncode == 0, proc.stderr
    return f"{server.images_dir}/{name}.qcow2"


def test_two_servers_up(bed: Bed, bed_servers: list[BedServer]) -> None:
    assert [s.name for s in bed_servers] == ["bed1", "bed2"]
    assert [s.address for s in bed_servers] == ["10.77.0.11", "10.77.0.12"]
    status = bed.status()
    assert status["bridge"] is True
    for s in bed_servers:
        st = status["servers"][s.name]
        assert st["netns"] and st["holder_pid"] and st["sshd_pid"] and st["libvirtd_pid"]
        assert st["ssh_port_open"] and st["libvirt_port_open"]
        # Its own UTS namespace and /etc/hosts.
        assert bed.exec(s.index, ["hostname"]).stdout.strip() == s.name
        hosts = bed.exec(s.index, ["cat", "/etc/hosts"]).stdout
        assert "10.77.0.11\tbed1" in hosts and "10.77.0.12\tbed2" in hosts
        # Private /run and per-server libvirt dirs.
        assert bed.exec(s.index, ["test", "-S", "/run/libvirt/libvirt-sock"]).returncode == 0
        assert bed.exec(s.index, ["test", "-d", s.disk_dir]).returncode == 0
    # No route out of a server namespace.
    routes = bed.exec(1, ["ip", "route"]).stdout
    assert "default" not in routes


def test_sshd_accepts_bed_key(bed: Bed, bed_servers: list[BedServer]) -> None:
    for s in bed_servers:
        proc = _run(bed.ssh_argv(s.index, ["hostname"]))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == s.name
        # The pinned fingerprint is the one the server presents.
        scan = _run(["ssh-keyscan", "-t", "ed25519", s.address])
        key_file = Path(bed.state_dir) / f"scan-{s.name}.pub"
        key_file.write_text(scan.stdout)
        fp = _run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(key_file)]).stdout.split()[1]
        key_file.unlink()
        assert fp == s.host_key_fingerprint


def test_sshd_password_auth(bed_servers: list[BedServer]) -> None:
    paramiko = pytest.importorskip("paramiko")
    real_root = next(line for line in Path("/etc/shadow").read_text().splitlines()
                     if line.startswith("root:"))
    s = bed_servers[1]
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.get_host_keys().add(s.address, "ssh-ed25519",
                               paramiko.Ed25519Key(data=_b64(s.host_key_public.split()[1])))
    client.connect(s.address, username="root", password=s.root_password,
                   look_for_keys=False, allow_agent=False, timeout=10)
    try:
        _, out, _ = client.exec_command("hostname")
        assert out.read().decode().strip() == s.name
    finally:
        client.close()
    with pytest.raises(paramiko.AuthenticationException):
        bad = paramiko.SSHClient()
        bad.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            bad.connect(s.address, username="root", password="not-the-password",
                        look_for_keys=False, allow_agent=False, timeout=10)
        finally:
            bad.close()
    # The machine's own root password is untouched.
    assert next(line for line in Path("/etc/shadow").read_text().splitlines()
                if line.startswith("root:")) == real_root


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def test_libvirt_tcp_and_ssh_with_distinct_host_uuids(bed_servers: list[BedServer]) -> None:
    uuids = set()
    for s in bed_servers:
        assert _virsh(s.uri_tcp, "hostname").strip() == s.name
        assert _virsh(s.uri_ssh, "hostname").strip() == s.name
        assert _virsh(s.uri_libssh, "hostname").strip() == s.name
        caps = _virsh(s.uri_tcp, "capabilities")
        m = re.search(r"<host>\s*<uuid>([0-9a-f-]+)</uuid>", caps)
        assert m, caps[:500]
        assert m.group(1) == s.host_uuid
        uuids.add(m.group(1))
        pool = _virsh(s.uri_tcp, "pool-info", "default")
        assert re.search(r"State:\s+running", pool)
    assert len(uuids) == len(bed_servers)


def test_domain_type_detection(domain_type: str) -> None:
    assert domain_type in ("kvm", "qemu")
    if not os.path.exists("/dev/kvm"):
        assert domain_type == "qemu"


def test_appliance_boots_and_live_migrates(bed: Bed, bed_servers: list[BedServer],
                                          appliance_image: Path, domain_type: str,
                                          tmp_path: Path) -> None:
    s1, s2 = bed_servers[0], bed_servers[1]
    name = "bedmig"
    disk = _linked_clone(appliance_image, s1, name)
    xml = tmp_path / "dom.xml"
    xml.write_text(appliance_domain_xml(name, disk, domain_type=domain_type,
                                        guest_ip=f"{GUEST_IP}/24"))
    valid = _run(["virt-xml-validate", str(xml), "domain"])
    assert valid.returncode == 0, valid.stdout + valid.stderr
    _virsh(s1.uri_tcp, "define", str(xml))
    _virsh(s1.uri_tcp, "start", name)

    log1 = s1.host_path(serial_log_path(name))
    st = wait_for_serial(log1, lambda st: st.ready and len(st.heartbeats) >= 5,
                         BOOT_TIMEOUT, "READY and 5 heartbeats")
    assert st.name == name
    assert st.heartbeats == list(range(st.heartbeats[0], st.heartbeats[0] + len(st.heartbeats)))
    # The guest is on the bed's L2 segment (br0 in bed1 -> corralbr0).
    assert _http_get(f"http://{GUEST_IP}/").strip() == name

    mig = _run(["virsh", "-c", s1.uri_tcp, "migrate", "--live", "--copy-storage-all",
                "--persistent", "--undefinesource", name, s2.uri_tcp])
    assert mig.returncode == 0, mig.stderr
    assert "running" in _virsh(s2.uri_tcp, "domstate", name)
    assert name not in _virsh(s1.uri_tcp, "list", "--all", "--name").split()

    last_src = GuestLog(log1).state().last_heartbeat
    assert last_src is not None
    log2 = s2.host_path(serial_log_path(name))
    st2 = wait_for_serial(log2, lambda st: len(st.heartbeats) >= 5, BOOT_TIMEOUT,
                          "heartbeats on the destination")
    beats = st2.heartbeats
    # The guest kept counting across the switchover (a line may be cut in two).
    assert 0 < beats[0] - last_src <= 2
    assert beats == list(range(beats[0], beats[0] + len(beats)))
    assert _http_get(f"http://{GUEST_IP}/").strip() == name  # reachable on bed2 now

    # Graceful shutdown via ACPI; the disk holds the last heartbeat printed.
    _virsh(s2.uri_tcp, "shutdown", name)
    final = wait_for_serial(log2, lambda st: st.shutdown, BOOT_TIMEOUT, "CORRAL-SHUTDOWN")
    _wait_shut_off(s2.uri_tcp, name)
    on_disk = appliance.read_disk_heartbeat(Path(s2.host_path(disk)))
    assert on_disk == final.last_heartbeat
    _virsh(s2.uri_tcp, "undefine", name)


def _http_get(url: str) -> str:
    import time
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=2) as resp:
                return resp.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _wait_shut_off(uri: str, name: str) -> None:
    import time

    deadline = time.monotonic() + BOOT_TIMEOUT
    while "shut off" not in _virsh(uri, "domstate", name):
        assert time.monotonic() < deadline, "domain did not power off"
        time.sleep(0.2)


def test_blank_vm_boots_from_iso(bed: Bed, bed_servers: list[BedServer],
                                 appliance_iso: Path, domain_type: str, tmp_path: Path) -> None:
    s = bed_servers[1]
    name = "bediso"
    disk = Path(s.images_dir_host) / f"{name}.qcow2"
    disk.unlink(missing_ok=True)
    assert _run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"]).returncode == 0
    xml = tmp_path / "iso.xml"
    xml.write_text(appliance_domain_xml(name, f"{s.images_dir}/{name}.qcow2",
                                        domain_type=domain_type, iso=str(appliance_iso),
                                        uuid=str(uuid.uuid4())))
    _virsh(s.uri_tcp, "create", str(xml))
    try:
        st = wait_for_serial(s.host_path(serial_log_path(name)),
                             lambda st: st.ready and len(st.heartbeats) >= 2, BOOT_TIMEOUT,
                             "READY from the ISO")
        assert st.name == name
    finally:
        _run(["virsh", "-c", s.uri_tcp, "destroy", name])


def test_stop_and_start_daemons(bed: Bed, bed_servers: list[BedServer]) -> None:
    s = bed_servers[1]
    bed.stop_libvirtd(s.index)
    assert not _tcp_open(s.address, 16509)
    assert _run(["virsh", "-c", s.uri_tcp, "hostname"]).returncode != 0
    bed.stop_sshd(s.index)
    assert not _tcp_open(s.address, 22)
    bed.start_sshd(s.index)
    bed.start_libvirtd(s.index)
    assert _virsh(s.uri_tcp, "hostname").strip() == s.name
    assert _run(bed.ssh_argv(s.index, ["true"])).returncode == 0


def test_down_leaves_nothing(bed: Bed) -> None:
    n = len(bed.servers())
    mounts_before = Path("/proc/self/mountinfo").read_text()
    created = json.loads(bed.state_file.read_text()).get("created_dirs", [])
    bed.down()
    try:
        assert not [ns for ns in _netns_list() if ns.startswith(NETNS_PREFIX)]
        assert not _link_exists(BRIDGE)
        assert not bed_processes()
        procs = _run(["ps", "-eo", "args"]).stdout
        assert f"{bed.state_dir}/" not in procs  # no sshd -f <state>/..., no libvirtd of ours
        assert "sleep infinity" not in procs or not any(
            Path(f"/proc/{p}/cmdline").exists() for p in bed_processes())
        mounts = Path("/proc/self/mountinfo").read_text()
        assert f"/run/netns/{NETNS_PREFIX}" not in mounts
        assert str(bed.state_dir) not in mounts
        assert len(mounts.splitlines()) <= len(mounts_before.splitlines())
        # Mountpoint dirs the bed had to create on the machine are gone again.
        assert not [d for d in created if Path(d).exists()]
    finally:
        bed.up(n=n)  # later tests of the session still have their bed

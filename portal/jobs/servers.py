"""Jobs for the VM Servers area: first contact, registration, disks."""

from __future__ import annotations

import json

from .. import library, secrets_relay, servers
from ..extensions import db
from ..models import Server
from ..vmm import appliance, detect, facts
from ..vmm.session import Target, fetch_host_key, install_key, open_session, pinned_fingerprint
from . import Progress, task_job


def _detect(session, progress: Progress) -> str:
    progress.step("Checking whether guests run under KVM (booting a test guest)", 60)
    if not detect.offers_kvm(session):
        progress.log("libvirt offers no KVM domains here: guests run under QEMU (TCG).")
        return "qemu"
    image = appliance.build_appliance(library.appliance_cache())
    result = detect.detect_domain_type(session, image)
    progress.log("A guest booted under KVM." if result == "kvm" else
                 "KVM is offered but a guest does not run under it: guests run under QEMU (TCG).")
    return result


@task_job
def probe_new_server(progress: Progress, hostname: str, address: str, port: int, transport: str) -> str:
    """First contact: pin the host key, install Corral's key with the root password, probe facts.

    The password comes from the secret relay (never from arguments) and is
    dropped as soon as the key is in place. Returns JSON for the review form.
    """
    host_key = None
    if transport == "ssh":
        progress.step(f"Contacting {address}:{port}", 5)
        password = secrets_relay.take(f"task-{progress.task_id}")
        host_key = fetch_host_key(address, port, hostname)
        progress.log(f"SSH host key {pinned_fingerprint(host_key)}")
        progress.step("Installing Corral's SSH key with the root password", 20)
        _, public = servers.corral_key()
        target = Target(hostname=hostname, address=address, port=port, host_key=host_key)
        try:
            install_key(target, password, public)
        finally:
            del password
        progress.log("Corral's key is installed; the password has been discarded.")
    progress.step("Detecting CPUs, memory, NICs and hypervisor", 40)
    with open_session(servers.make_target(hostname, address, port, transport, host_key)) as session:
        found = facts.probe_facts(session)
        progress.log(f"{found.cpus} CPU(s) x {found.cores_per_cpu} cores, {found.memory_mb} MB, "
                     f"{found.nics} NIC(s), {found.hypervisor_vendor} {found.hypervisor_version}")
        domain_type = _detect(session, progress)
    return json.dumps({"hostname": hostname, "address": address, "port": port, "transport": transport,
                       "host_key": host_key, "fingerprint": pinned_fingerprint(host_key) if host_key else None,
                       "facts": found.as_dict(), "domain_type": domain_type})


@task_job
def register_server(progress: Progress, payload: str) -> str:
    """Validate each VM disk on the server, then create the server and its disks."""
    data = json.loads(payload)
    progress.step("Validating VM disks on the server", 20)
    target = servers.make_target(data["hostname"], data["address"], data["port"], data["transport"],
                                 data["host_key"])
    disks = []
    with open_session(target) as session:
        for i, d in enumerate(data["disks"]):
            found = facts.probe_disk(session, d["mountpoint"])
            size = d.get("size_gb") or found.size_gb
            progress.log(f"{d['mountpoint']}: {found.size_gb} GB, {found.free_gb} GB free")
            disks.append((d["mountpoint"], size, found.free_gb))
            progress.step(f"Validated {d['mountpoint']}", 20 + 60 * (i + 1) // max(1, len(data["disks"])))
    progress.step("Registering the server", 90)
    server = servers.register(hostname=data["hostname"], address=data["address"], port=data["port"],
                              transport=data["transport"], host_key=data["host_key"], facts=data["facts"],
                              domain_type=data["domain_type"], disks=disks)
    server_id = server.id
    db.session.commit()
    return str(server_id)


@task_job
def add_server_disk(progress: Progress, server_id: int, mountpoint: str, size_gb: int | None) -> str:
    server = db.session.get(Server, server_id)
    if server is None:
        raise LookupError("the server was deleted meanwhile")
    progress.step(f"Validating {mountpoint} on {server.hostname}", 30)
    with servers.session_for(server) as session:
        found = facts.probe_disk(session, mountpoint)
    servers.add_disk(server, mountpoint, size_gb or found.size_gb, found.free_gb)
    db.session.commit()
    return mountpoint

"""This machine as a VM server: what ``corral up`` does for a newcomer.

Starts libvirtd when it is installed but not running, probes the facts over
the local transport (``qemu:///system``), decides KVM or TCG by booting the
test appliance once, and registers the server with one VM disk directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from flask import current_app

from . import servers
from .extensions import db
from .models import Server
from .vmm import appliance, facts
from .vmm.errors import VmmError
from .vmm.session import Target, open_session

LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")  # QEMU's console and log output goes through it


class LocalServerError(Exception):
    """This machine cannot be used as a VM server; the message says why."""


def ensure_virtlogd() -> None:
    """Start virtlogd when nothing (systemd's socket activation) provides it."""
    if VIRTLOGD_SOCKET.exists():
        return
    daemon = shutil.which("virtlogd") or "/usr/sbin/virtlogd"
    if Path(daemon).exists():
        subprocess.run([daemon, "--daemon"], check=False, timeout=30)
        for _ in range(50):
            if VIRTLOGD_SOCKET.exists():
                return
            time.sleep(0.1)


def ensure_libvirtd() -> None:
    ensure_virtlogd()
    if LIBVIRT_SOCKET.exists() and subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                                  capture_output=True, timeout=30).returncode == 0:
        return
    daemon = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    if not Path(daemon).exists():
        raise LocalServerError("libvirtd is not installed (apt-get install libvirt-daemon-system qemu-system-x86).")
    subprocess.run([daemon, "--daemon"], check=False, timeout=60)
    ensure_virtlogd()
    for _ in range(150):  # a first start probes QEMU's capabilities for a while
        if LIBVIRT_SOCKET.exists() and subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                                      capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(0.2)
    raise LocalServerError("libvirtd did not start; see its log (journalctl or /var/log/libvirt).")


def ensure_registered(disk: str = "/var/lib/corral/disk1") -> Server | None:
    """Register this machine once (None when it is already); start its daemons either way."""
    exists = db.session.execute(db.select(Server).where(Server.transport == "local")).scalar_one_or_none()
    if exists is not None:
        ensure_libvirtd()
        return None
    return register(disk)


def register(disk: str) -> Server:
    ensure_libvirtd()
    Path(disk).mkdir(parents=True, exist_ok=True)
    hostname = socket.gethostname().split(".")[0].lower() or "localhost"
    target = Target(hostname=hostname, address="127.0.0.1", transport="local")
    try:
        with open_session(target) as session:
            found = facts.probe_facts(session)
            disk_facts = facts.probe_disk(session, disk)
    except VmmError as exc:
        raise LocalServerError(str(exc)) from exc
    cache = current_app.config.get("APPLIANCE_CACHE")
    domain_type = appliance.detect_domain_type(Path(cache) if cache else None) if found.kvm_capable else "qemu"
    try:
        server = servers.register(hostname=hostname, address="127.0.0.1", port=22, transport="local",
                                  host_key=None, facts=found.as_dict(), domain_type=domain_type,
                                  disks=[(disk, disk_facts.size_gb, disk_facts.free_gb)])
    except servers.ServerError as exc:
        db.session.rollback()
        raise LocalServerError(str(exc)) from exc
    db.session.commit()
    return server

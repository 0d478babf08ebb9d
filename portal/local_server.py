"""This machine as a VM server: what ``corral up`` does for a newcomer.

Starts libvirtd when it is installed but not running, probes the facts over
the local transport (``qemu:///system``), decides KVM or TCG by booting the
test appliance once, and registers the server with one VM disk directory.
"""

from __future__ import annotations

import socket
from pathlib import Path

from flask import current_app

from . import servers
from .extensions import db
from .models import Server
from .vmm import detect, facts, local
from .vmm.errors import VmmError
from .vmm.session import Target, open_session


class LocalServerError(Exception):
    """This machine cannot be used as a VM server; the message says why."""


def ensure_daemons() -> None:
    try:
        local.ensure_libvirtd()
    except VmmError as exc:
        raise LocalServerError(str(exc)) from exc


def ensure_registered(disk: str = "/var/lib/corral/disk1") -> Server | None:
    """Register this machine once (None when it is already); start its daemons either way."""
    exists = db.session.execute(db.select(Server).where(Server.transport == "local")).scalar_one_or_none()
    if exists is not None:
        ensure_daemons()
        return None
    return register(disk)


def register(disk: str) -> Server:
    """Probe and record this machine as a server; flushes, the caller commits."""
    ensure_daemons()
    hostname = socket.gethostname().split(".")[0].lower() or "localhost"
    target = Target(hostname=hostname, address="127.0.0.1", transport="local")
    try:
        local.ensure_directory(disk)
        with open_session(target) as session:
            found = facts.probe_facts(session)
            disk_facts = facts.probe_disk(session, disk)
    except VmmError as exc:
        raise LocalServerError(str(exc)) from exc
    cache = current_app.config.get("APPLIANCE_CACHE")
    domain_type = detect.local_domain_type(Path(cache) if cache else None) if found.kvm_capable else "qemu"
    try:
        server = servers.register(hostname=hostname, address="127.0.0.1", port=22, transport="local",
                                  host_key=None, facts=found.as_dict(), domain_type=domain_type,
                                  disks=[(disk, disk_facts.size_gb, disk_facts.free_gb)])
    except servers.ServerError as exc:
        raise LocalServerError(str(exc)) from exc
    return server

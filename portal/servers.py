"""VM servers: registering, marking down/up, deleting, and reaching them.

Plain functions that flush and never commit; views and jobs commit. The one
bridge from a ``Server`` row to :mod:`portal.vmm` is :func:`target_for`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

from flask import current_app
from sqlalchemy import func

from . import actionlog
from .extensions import db
from .models import VM, Server, ServerDisk, ServerStatus, utcnow
from .vmm import keys
from .vmm.session import HostSession, Target, open_session, write_ssh_wrapper

HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
MOUNTPOINT_RE = re.compile(r"^/[A-Za-z0-9._/-]*$")
MAX_DISKS = 4


class ServerError(Exception):
    """A server change that cannot be made, with a message for the manager."""


def ssh_dir() -> Path:
    path = Path(current_app.instance_path) / "ssh"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def corral_key() -> tuple[Path, str]:
    """Corral's private key path and public key line (generated on first use)."""
    return keys.ensure_keypair(ssh_dir() / "id_ed25519")


def known_hosts_file(hostname: str, address: str, port: int, host_key: str | None) -> str | None:
    """A known_hosts file holding just this server's pinned key (for libvirt's libssh)."""
    if not host_key:
        return None
    folder = ssh_dir() / "known_hosts.d"
    folder.mkdir(mode=0o700, exist_ok=True)
    name = address if port == 22 else f"[{address}]:{port}"
    line = f"{name} {' '.join(host_key.split()[:2])}\n"
    path = folder / hostname
    if not path.exists() or path.read_text() != line:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(line)
        tmp.replace(path)
    return str(path)


def write_known_hosts() -> None:
    """Write every registered server's known_hosts file (after keys changed)."""
    for server in db.session.execute(db.select(Server).where(Server.host_key.is_not(None))).scalars():
        known_hosts_file(server.hostname, server.address, server.ssh_port, server.host_key)


def make_target(hostname: str, address: str, port: int, transport: str, host_key: str | None) -> Target:
    key_file, _ = corral_key()
    uris = current_app.config.get("LIBVIRT_URI_OVERRIDES") or {}
    known_hosts = known_hosts_file(hostname, address, port, host_key)
    wrapper = write_ssh_wrapper(ssh_dir() / "known_hosts.d" / f"{hostname}.ssh", known_hosts) if known_hosts else None
    return Target(
        hostname=hostname, address=address, transport=transport, port=port, host_key=host_key,
        key_file=str(key_file), known_hosts=known_hosts, ssh_command=wrapper, libvirt_uri=uris.get(hostname),
    )


def target_for(server: Server) -> Target:
    return make_target(server.hostname, server.address, server.ssh_port, server.transport, server.host_key)


def session_for(server: Server) -> HostSession:
    return open_session(target_for(server))


# --- validation ---------------------------------------------------------------------

def check_hostname(hostname: str) -> str:
    hostname = hostname.strip().lower()
    if not HOSTNAME_RE.match(hostname):
        raise ServerError(f"{hostname!r} is not a valid host name (letters, digits, hyphens and dots).")
    if db.session.execute(db.select(Server.id).where(func.lower(Server.hostname) == hostname)).first():
        raise ServerError(f"A server called {hostname} is registered already.")
    return hostname


def check_address(address: str) -> str:
    address = address.strip()
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        if HOSTNAME_RE.match(address):
            return address.lower()
    raise ServerError(f"{address!r} is neither an IP address nor a host name.")


@dataclass
class DiskSpec:
    mountpoint: str
    size_gb: int | None = None


def check_disks(disks: list[DiskSpec]) -> list[DiskSpec]:
    if len(disks) > MAX_DISKS:
        raise ServerError(f"A server has at most {MAX_DISKS} VM disks.")
    seen = set()
    for d in disks:
        if not MOUNTPOINT_RE.match(d.mountpoint) or ".." in d.mountpoint.split("/"):
            raise ServerError(f"{d.mountpoint!r} is not an absolute path of letters, digits, '.', '_', '-', '/'.")
        if d.mountpoint in seen:
            raise ServerError(f"{d.mountpoint} is listed twice.")
        seen.add(d.mountpoint)
    return disks


# --- changes -------------------------------------------------------------------------

def register(*, hostname: str, address: str, port: int, transport: str, host_key: str | None,
             facts: dict, domain_type: str, disks: list[tuple[str, int, int]]) -> Server:
    """Create the server row with its facts and validated disks (size, free)."""
    server = Server(
        hostname=check_hostname(hostname), address=address, ssh_port=port, transport=transport,
        host_key=host_key, host_key_fingerprint=_fp(host_key), domain_type=domain_type,
        status=ServerStatus.UP.value, last_seen=utcnow(),
        **{k: facts[k] for k in ("cpus", "cores_per_cpu", "hyperthreading", "memory_mb", "free_memory_mb", "nics",
                                 "mhz", "hypervisor_vendor", "hypervisor_type", "hypervisor_version")},
        interfaces_json=json.dumps(facts["interfaces"]) if facts.get("interfaces") else None,
    )
    db.session.add(server)
    db.session.flush()
    for mountpoint, size_gb, free_gb in disks:
        db.session.add(ServerDisk(server_id=server.id, mountpoint=mountpoint, size_gb=size_gb, free_gb=free_gb))
    actionlog.record("server-added", target=server,
                     detail=f"{address}:{port}, {len(disks)} disk(s), host key {server.host_key_fingerprint or 'local'}")
    db.session.flush()
    return server


def _fp(host_key: str | None) -> str | None:
    if not host_key:
        return None
    key_type, b64 = host_key.split()[:2]
    return keys.fingerprint(key_type, b64)


def add_disk(server: Server, mountpoint: str, size_gb: int, free_gb: int) -> ServerDisk:
    if len(server.disks) >= MAX_DISKS:
        raise ServerError(f"{server.hostname} has {MAX_DISKS} VM disks already.")
    if any(d.mountpoint == mountpoint for d in server.disks):
        raise ServerError(f"{mountpoint} is declared on {server.hostname} already.")
    disk = ServerDisk(server_id=server.id, mountpoint=mountpoint, size_gb=size_gb, free_gb=free_gb)
    db.session.add(disk)
    db.session.flush()
    actionlog.record("server-disk-added", target=server, detail=f"{mountpoint} ({size_gb} GB)")
    return disk


def mark_down(server: Server) -> None:
    if server.status == ServerStatus.MARKED_DOWN.value:
        raise ServerError(f"{server.hostname} is marked down already.")
    server.status = ServerStatus.MARKED_DOWN.value
    actionlog.record("server-marked-down", target=server)
    db.session.flush()


def mark_up(server: Server) -> None:
    """Resume polling; the next poll decides whether it is really up."""
    if server.status != ServerStatus.MARKED_DOWN.value:
        raise ServerError(f"{server.hostname} is not marked down.")
    server.status = ServerStatus.DOWN.value if server.last_error else ServerStatus.UP.value
    actionlog.record("server-marked-up", target=server)
    db.session.flush()


def vms_on(server: Server) -> list[VM]:
    return db.session.execute(
        db.select(VM).where((VM.server_id == server.id) | (VM.backup_server_id == server.id)).order_by(VM.name)
    ).scalars().all()


def delete(server: Server) -> None:
    vms = vms_on(server)
    if vms:
        names = ", ".join(vm.name for vm in vms)
        raise ServerError(f"{server.hostname} still holds VMs ({names}); move or delete them first.")
    actionlog.record("server-deleted", target=server)
    db.session.delete(server)
    db.session.flush()


def set_domains(server: Server, domains: list[dict]) -> None:
    server.domains_json = json.dumps(sorted(domains, key=lambda d: d["name"]))

"""NoCloud seed ISOs: what cloud-init reads on a guest's first (and every) boot.

A seed is plain data (:class:`Seed`: instance id, hostname, the VM's resolved
attributes and its NICs); this module renders the three NoCloud files and
builds the ISO (volume label ``cidata``) with ``xorriso`` on this machine, then
copies it to the VM's folder on its server. The domain XML attaches it as a
read-only CD-ROM (see :mod:`portal.vmm.domain`).

``user-data`` is a ``#cloud-config`` document: well-known attributes become
cloud-config keys (``hostname``, ``fqdn``, ``timezone``, ``locale``,
``ssh_authorized_keys``, ``packages``, ``runcmd``) and *every* attribute is
written to :data:`ATTRIBUTES_FILE` in the guest as shell assignments
(``key='value'``), the last item of the document so that a guest without
cloud-init (the test appliance) can read it with ``sed``. Scalars are written as
JSON strings, which are valid YAML double-quoted scalars; values never hold
control characters (``portal.attributes`` refuses them).
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import VmmError
from .session import HostSession

VOLUME_LABEL = "cidata"
ATTRIBUTES_FILE = "/etc/corral/attributes"
#: SMBIOS OEM string telling the guest a seed CD-ROM is attached (the test appliance waits for it only then).
OEM_STRING = "corral.seed=cidata"
#: Attributes whose values are lists, one item per line (``packages``: also split on spaces or commas).
LIST_KEYS = ("ssh_authorized_keys", "runcmd", "packages")
SCALAR_KEYS = ("fqdn", "timezone", "locale")


@dataclass(frozen=True)
class SeedNic:
    mac: str
    name: str  # the interface name the guest gives it (eth0, eth1, ...)
    address: str | None = None  # ADDR/PREFIX from a reservation
    gateway: str | None = None
    dhcp: bool = True


@dataclass(frozen=True)
class Seed:
    instance_id: str
    hostname: str
    attributes: tuple[tuple[str, str], ...] = ()
    nics: tuple[SeedNic, ...] = ()


def _q(value: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one)."""
    return json.dumps(value, ensure_ascii=False)


def meta_data(seed: Seed) -> str:
    return f"instance-id: {_q(seed.instance_id)}\nlocal-hostname: {_q(seed.hostname)}\n"


def _list_items(key: str, value: str) -> list[str]:
    if key == "packages":
        return [p for p in value.replace(",", " ").split() if p]
    return [line.strip() for line in value.splitlines() if line.strip()]


def attributes_file(seed: Seed) -> str:
    """The guest's attribute file: one ``key='value'`` shell assignment per attribute (sourceable)."""
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in seed.attributes)


def user_data(seed: Seed) -> str:
    attrs = dict(seed.attributes)
    out = ["#cloud-config", "# Rendered by Corral from the VM's attributes (global, appliance, OS, VM).",
           f"hostname: {_q(attrs.get('hostname') or seed.hostname)}"]
    for key in SCALAR_KEYS:
        if attrs.get(key):
            out.append(f"{key}: {_q(attrs[key])}")
    for key in LIST_KEYS:
        items = _list_items(key, attrs.get(key, ""))
        if items:
            out.append(f"{key}:")
            out.extend(f"  - {_q(item)}" for item in items)
    content = attributes_file(seed)
    out += ["write_files:", f"  - path: {ATTRIBUTES_FILE}", '    permissions: "0600"']
    if content:
        # a literal block, last in the document: each line indented by six spaces
        out.append("    content: |")
        out.extend(("      " + line) if line else "" for line in content.rstrip("\n").split("\n"))
    else:
        out.append('    content: ""')
    return "\n".join(out) + "\n"


def network_config(seed: Seed) -> str:
    """Netplan-style version 2: each NIC matched by MAC, a reserved address or DHCP."""
    out = ["version: 2", "ethernets:"]
    if not seed.nics:
        return "version: 2\nethernets: {}\n"
    for nic in seed.nics:
        out += [f"  {nic.name}:", "    match:", f"      macaddress: {_q(nic.mac.lower())}",
                f"    set-name: {_q(nic.name)}"]
        if nic.address:
            out += ["    dhcp4: false", f"    addresses: [{_q(nic.address)}]"]
            if nic.gateway:
                out += ["    routes:", f"      - to: {_q('0.0.0.0/0')}", f"        via: {_q(nic.gateway)}"]
        else:
            out.append(f"    dhcp4: {'true' if nic.dhcp else 'false'}")
    return "\n".join(out) + "\n"


def files(seed: Seed) -> dict[str, str]:
    return {"meta-data": meta_data(seed), "user-data": user_data(seed), "network-config": network_config(seed)}


def build_iso(seed: Seed, out: str | os.PathLike) -> None:
    """Write the seed's ISO 9660 image (Joliet + Rock Ridge, label ``cidata``) to *out* on this machine."""
    with tempfile.TemporaryDirectory(prefix="corral-seed-") as tmp:
        tree = Path(tmp) / "cidata"
        tree.mkdir()
        for name, text in files(seed).items():
            (tree / name).write_text(text, encoding="utf-8")
        argv = ["xorriso", "-as", "mkisofs", "-quiet", "-o", os.fspath(out), "-V", VOLUME_LABEL, "-J", "-R",
                os.fspath(tree)]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except FileNotFoundError as exc:
            raise VmmError("xorriso is not installed on the Corral machine (apt-get install xorriso)") from exc
        if r.returncode != 0:
            raise VmmError(f"building the seed ISO failed: {r.stderr.strip() or r.stdout.strip()}")


def write(session: HostSession, seed: Seed, remote: str) -> None:
    """Build the seed ISO here and put it at *remote* on the server (replacing the previous one)."""
    with tempfile.TemporaryDirectory(prefix="corral-seed-") as tmp:
        local = Path(tmp) / "seed.iso"
        build_iso(seed, local)
        session.run(["mkdir", "-p", posixpath.dirname(remote)])
        partial = remote + ".new"
        session.put(local, partial)
        session.run(["mv", "-f", partial, remote])

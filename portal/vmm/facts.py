"""What a VM server has: CPUs, memory, NICs, hypervisor; and its VM disks."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

import libvirt

from .errors import CommandFailed, LibvirtUnavailable, MountpointMissing, VmmError
from .session import HostSession

# libvirt's node memory may disagree with the kernel's by this much before Corral says so.
MEMORY_TOLERANCE = 0.05

# Interfaces that are not the server's own NICs.
_VIRTUAL_NIC = re.compile(r"^(lo|vnet\d+|virbr\d+(-nic)?|tap.*|macvtap.*|docker\d*|veth.*-.*)$")


@dataclass
class HostFacts:
    cpus: int
    cores_per_cpu: int
    hyperthreading: bool
    memory_mb: int
    free_memory_mb: int
    nics: int
    nic_names: list[str]
    mhz: int
    hypervisor_vendor: str
    hypervisor_type: str
    hypervisor_version: str
    kvm_capable: bool  # /dev/kvm and a kvm domain type offered (whether guests really run: see detection)
    hostname: str
    memory_note: str | None = None  # why memory_mb is not what libvirt reports, when they disagree
    interfaces: list[str] = field(default_factory=list)  # NICs and bridges a network may ride on (uplinks)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DiskFacts:
    mountpoint: str
    size_gb: int
    free_gb: int
    writable: bool


@dataclass
class LoadFacts:
    load1: float
    load5: float
    load15: float
    cpus_online: int


def _version(n: int) -> str:
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


@dataclass(frozen=True)
class Memory:
    total_mb: int
    available_mb: int
    note: str | None = None


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as {field: kB}."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            out[name.strip()] = int(value[0])
    return out


def memory_from(meminfo: str, libvirt_mb: int) -> Memory:
    """Memory as the kernel reports it: MemTotal, and MemAvailable as free.

    libvirt's node info can be far off (in containers and sandboxes it reads
    a cgroup or a fake figure: 5,850 MB on a 24 GB machine), and placement
    would then refuse VMs that fit; when the two disagree, the note says so.
    """
    fields = parse_meminfo(meminfo)
    if "MemTotal" not in fields:
        raise VmmError("/proc/meminfo has no MemTotal line")
    total = fields["MemTotal"] // 1024
    # Kernels before 3.14 have no MemAvailable: what is free or only caches.
    available_kb = fields.get("MemAvailable",
                              fields.get("MemFree", 0) + fields.get("Buffers", 0) + fields.get("Cached", 0))
    note = None
    if abs(libvirt_mb - total) > MEMORY_TOLERANCE * max(total, 1):
        note = (f"libvirt reports {libvirt_mb:,} MB, the kernel (MemTotal in /proc/meminfo) {total:,} MB; "
                "Corral uses the kernel's figure.")
    return Memory(total, available_kb // 1024, note)


def probe_facts(session: HostSession) -> HostFacts:
    """Facts from libvirt (nodeinfo, capabilities, versions) and the server's /proc and /sys."""
    try:
        conn = session.libvirt()
        model, memory_mb, cpus_total, mhz, nodes, sockets, cores, threads = conn.getInfo()
        hv_type = conn.getType()  # "QEMU" for the qemu driver
        hv_version = _version(conn.getVersion())
        lib_version = _version(conn.getLibVersion())
        caps = ET.fromstring(conn.getCapabilities())
        hostname = conn.getHostname()
    except libvirt.libvirtError as exc:
        raise LibvirtUnavailable(f"{session.target.hostname}: libvirt did not answer: {exc}") from exc
    domain_types = {d.get("type") for d in caps.iter("domain")}
    memory = memory_from(session.run(["cat", "/proc/meminfo"]).stdout, int(memory_mb))
    # Interfaces that are not bridges (a host bridge for guests is not a NIC).
    script = 'for n in /sys/class/net/*; do [ -d "$n/bridge" ] || echo "${n##*/}"; done'
    out = session.run(["sh", "-c", script]).stdout.split()
    nic_names = sorted(n for n in out if not _VIRTUAL_NIC.match(n))
    interfaces = sorted(n for n in session.run(["ls", "/sys/class/net"]).stdout.split() if not _VIRTUAL_NIC.match(n))
    return HostFacts(
        cpus=max(1, nodes * sockets),
        cores_per_cpu=max(1, cores),
        hyperthreading=threads > 1,
        memory_mb=memory.total_mb,
        free_memory_mb=memory.available_mb,
        nics=len(nic_names),
        nic_names=nic_names,
        interfaces=interfaces,
        mhz=int(mhz),
        hypervisor_vendor="QEMU" if hv_type == "QEMU" else hv_type,
        hypervisor_type="KVM/QEMU" if "kvm" in domain_types else "QEMU (TCG)",
        hypervisor_version=f"{hv_version} (libvirt {lib_version})",
        kvm_capable="kvm" in domain_types,
        hostname=hostname,
        memory_note=memory.note,
    )


def probe_disk(session: HostSession, mountpoint: str) -> DiskFacts:
    """Size and free space of a VM disk; it must exist and be writable by root."""
    if not mountpoint.startswith("/") or ".." in mountpoint.split("/"):
        raise MountpointMissing(f"{mountpoint!r} is not an absolute path.")
    host = session.target.hostname
    if not session.run(["test", "-d", mountpoint], check=False).ok:
        raise MountpointMissing(f"{mountpoint} does not exist on {host} (create or mount it first).")
    probe = f"{mountpoint.rstrip('/')}/.corral-write-test"
    writable = session.run(["touch", probe], check=False).ok
    session.run(["rm", "-f", probe], check=False)
    if not writable:
        raise MountpointMissing(f"{mountpoint} on {host} is not writable by root.")
    try:
        out = session.run(["df", "-P", "-B1", mountpoint]).stdout.splitlines()
    except CommandFailed as exc:
        raise MountpointMissing(f"{mountpoint} on {host}: df failed: {exc.stderr.strip()}") from exc
    fields = out[-1].split()
    size, avail = int(fields[1]), int(fields[3])
    gib = 1024 ** 3
    return DiskFacts(mountpoint, size // gib, avail // gib, True)


def probe_load(session: HostSession) -> LoadFacts:
    text = session.run(["cat", "/proc/loadavg"]).stdout.split()
    online = session.run(["getconf", "_NPROCESSORS_ONLN"]).stdout.strip()
    return LoadFacts(float(text[0]), float(text[1]), float(text[2]), int(online or 1))

"""Domain XML: the one place that turns a VM's spec into libvirt XML.

Plain dataclasses in, a string out; validated with ``virt-xml-validate`` in
the tests. The guest's serial console is a pty whose output libvirt also
writes to a log file on the server (the dashboard shows it); the SMBIOS
system serial carries the VM's name, which the test appliance uses as its
hostname.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

BUSES = ("virtio", "scsi", "ide")
_DEV_PREFIX = {"virtio": "vd", "scsi": "sd", "ide": "hd"}


@dataclass(frozen=True)
class DiskSpec:
    path: str
    bus: str = "virtio"
    format: str = "qcow2"
    readonly: bool = False


@dataclass(frozen=True)
class NicSpec:
    mac: str
    bridge: str | None = None  # bridged onto a host bridge
    network: str | None = None  # or a libvirt network (NAT / isolated)
    # neither: QEMU user-mode networking (outbound NAT, needs nothing on the server)
    model: str = "virtio"


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    memory_mb: int
    vcpus: int = 1
    domain_type: str = "qemu"  # "kvm" where guests really run under KVM, else TCG
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    cdrom: str | None = None  # ISO path; the VM boots from it first
    seed: str | None = None  # a NoCloud seed ISO (portal/vmm/seed.py): a second CD-ROM, never booted from
    usb_tablet: bool = False
    serial_log: str | None = None
    vnc: bool = True  # graphical console for the web console (listens on the server's loopback)
    description: str = ""
    extra_oem: tuple[str, ...] = field(default=())


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def target_devs(disks: tuple[DiskSpec, ...]) -> list[str]:
    """Device names per disk: vda, vdb, sda, hda, ... counted per bus (hdc is the CD-ROM)."""
    used: dict[str, int] = {}
    out = []
    for d in disks:
        n = used.get(d.bus, 0)
        if d.bus == "ide" and n >= 2:
            n += 1  # hdc is taken by the CD-ROM
        out.append(_DEV_PREFIX[d.bus] + "abcdefghijklmnop"[n])
        used[d.bus] = n + 1
    return out


def render(spec: DomainSpec) -> str:
    if spec.domain_type not in ("kvm", "qemu"):
        raise ValueError(f"unknown domain type {spec.domain_type!r}")
    for d in spec.disks:
        if d.bus not in BUSES:
            raise ValueError(f"unknown disk bus {d.bus!r}")
    dom = ET.Element("domain", type=spec.domain_type)
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    if spec.description:
        _sub(dom, "description", spec.description)
    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))
    sysinfo = _sub(dom, "sysinfo", type="smbios")
    system = _sub(sysinfo, "system")
    _sub(system, "entry", "Corral", name="manufacturer")
    _sub(system, "entry", spec.name, name="serial")
    if spec.extra_oem:
        oem = _sub(sysinfo, "oemStrings")
        for s in spec.extra_oem:
            _sub(oem, "entry", s)
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.cdrom:
        _sub(os_el, "boot", dev="cdrom")
    _sub(os_el, "boot", dev="hd")
    _sub(os_el, "smbios", mode="sysinfo")
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.domain_type == "qemu":
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", "qemu64", fallback="allow")
    else:
        _sub(dom, "cpu", mode="host-model")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    if any(d.bus == "scsi" for d in spec.disks):
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    for d, dev in zip(spec.disks, target_devs(spec.disks)):
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=d.format, cache="none" if d.format == "raw" else "writeback")
        _sub(disk, "source", file=d.path)
        _sub(disk, "target", dev=dev, bus=d.bus)
        if d.readonly:
            _sub(disk, "readonly")
    if spec.cdrom:
        cd = _sub(devices, "disk", type="file", device="cdrom")
        _sub(cd, "driver", name="qemu", type="raw")
        _sub(cd, "source", file=spec.cdrom)
        _sub(cd, "target", dev="hdc", bus="ide")
        _sub(cd, "readonly")
    if spec.seed:
        if "hdd" in target_devs(spec.disks):
            raise ValueError("a seed CD-ROM needs hdd free: use fewer IDE disks")
        cd = _sub(devices, "disk", type="file", device="cdrom")
        _sub(cd, "driver", name="qemu", type="raw")
        # optional: a server without the file (a failover target) starts the VM without it
        _sub(cd, "source", file=spec.seed, startupPolicy="optional")
        _sub(cd, "target", dev="hdd", bus="ide")
        _sub(cd, "readonly")
    for nic in spec.nics:
        if nic.bridge:
            iface = _sub(devices, "interface", type="bridge")
            _sub(iface, "source", bridge=nic.bridge)
        elif nic.network:
            iface = _sub(devices, "interface", type="network")
            _sub(iface, "source", network=nic.network)
        else:
            iface = _sub(devices, "interface", type="user")
        _sub(iface, "mac", address=nic.mac)
        _sub(iface, "model", type=nic.model)
    serial = _sub(devices, "serial", type="pty")
    if spec.serial_log:
        _sub(serial, "log", file=spec.serial_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    if spec.usb_tablet:
        _sub(devices, "input", type="tablet", bus="usb")
    if spec.vnc:
        _sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen="127.0.0.1")
        video = _sub(devices, "video")
        _sub(video, "model", type="vga")
    _sub(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"

"""Helpers to run the test appliance on bed servers (domain XML, serial log)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape, quoteattr

from ._appliance import appliance
from .core import GUEST_BRIDGE

if TYPE_CHECKING:
    from portal.vmm.appliance import SerialState


def detect_domain_type(cache_dir: Path) -> str:
    """``"kvm"`` if guests really run under KVM here, else ``"qemu"`` (cached)."""
    from portal.vmm.detect import local_domain_type  # noqa: PLC0415 (needs the portal's deps)

    return local_domain_type(Path(cache_dir))


def serial_log_path(domain: str) -> str:
    """Path *inside a server* of the serial log :func:`appliance_domain_xml` configures."""
    return f"/var/log/libvirt/qemu/{domain}.serial.log"


def appliance_domain_xml(name: str, disk: str, *, domain_type: str = "qemu",
                         memory_mib: int = 256, bridge: str | None = GUEST_BRIDGE,
                         mac: str | None = None, serial_log: str | None = None,
                         iso: str | None = None, uuid: str | None = None,
                         guest_ip: str | None = None) -> str:
    """Minimal domain XML for the appliance.

    The guest names itself from the SMBIOS system serial (= *name*).  Its
    serial console is a pty whose output is also logged to *serial_log*
    (default :func:`serial_log_path`): read it on the host through
    ``BedServer.host_path``.  ACPI is on, so ``virsh shutdown`` powers it off.
    *guest_ip* (``ADDR/PREFIX``, e.g. ``10.77.0.101/24`` on the bed's L2) is
    passed as an SMBIOS OEM string; the guest then serves ``http://ADDR/``.
    """
    oem = (f"<oemStrings><entry>corral.ip={escape(guest_ip)}</entry></oemStrings>"
           if guest_ip else "")
    serial_log = serial_log or serial_log_path(name)
    cpu = ("<cpu mode='custom' match='exact' check='none'><model fallback='allow'>qemu64</model></cpu>"
           if domain_type == "qemu" else "<cpu mode='host-model'/>")
    nic = ""
    if bridge:
        nic = (f"<interface type='bridge'><source bridge={quoteattr(bridge)}/>"
               + (f"<mac address={quoteattr(mac)}/>" if mac else "")
               + "<model type='virtio'/></interface>")
    cdrom = ""
    boot = "<boot dev='hd'/>"
    if iso:
        cdrom = (f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                 f"<source file={quoteattr(iso)}/><target dev='hdc' bus='ide'/><readonly/></disk>")
        boot = "<boot dev='cdrom'/><boot dev='hd'/>"
    return f"""<domain type={quoteattr(domain_type)}>
  <name>{escape(name)}</name>
  {f"<uuid>{escape(uuid)}</uuid>" if uuid else ""}
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <sysinfo type='smbios'><system><entry name='serial'>{escape(name)}</entry></system>{oem}</sysinfo>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}<smbios mode='sysinfo'/></os>
  <features><acpi/><apic/></features>
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(disk)}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {cdrom}
    {nic}
    <serial type='pty'><log file={quoteattr(serial_log)} append='off'/><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass
class GuestLog:
    """A serial log file on the host (e.g. ``server.host_path(serial_log_path(name))``)."""

    path: Path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def state(self) -> SerialState:
        state: SerialState = appliance.parse_serial_log(self.text())
        return state


def wait_for_serial(path: Path, predicate: Callable[[SerialState], bool], timeout: float = 60,
                    what: str = "serial condition") -> SerialState:
    """Poll the serial log at *path* until *predicate* holds; return the state."""
    log = GuestLog(Path(path))
    deadline = time.monotonic() + timeout
    while True:
        st = log.state()
        if predicate(st):
            return st
        if time.monotonic() > deadline:
            tail = log.text()[-2000:]
            raise TimeoutError(f"timed out waiting for {what} in {path}; log tail:\n{tail}")
        time.sleep(0.2)

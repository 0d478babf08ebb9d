"""Decide per server whether guests really run under KVM, by booting one.

``/dev/kvm`` existing is not enough: a nested device without VT-x/SVM lets
SeaBIOS start and then stops the guest with ``KVM internal error``. So the
test appliance is copied to the server and booted once with ``-accel kvm``;
a heartbeat on its serial console means KVM works, anything else means TCG
(libvirt domain type ``qemu``).
"""

from __future__ import annotations

import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

from .appliance import HEARTBEAT_MARKER
from .session import HostSession

REMOTE_DIR = "/var/tmp/corral-detect"


def offers_kvm(session: HostSession) -> bool:
    caps = ET.fromstring(session.libvirt().getCapabilities())
    return any(d.get("type") == "kvm" for d in caps.iter("domain"))


def detect_domain_type(session: HostSession, appliance: Path, *, timeout: float = 20.0) -> str:
    """``"kvm"`` when the appliance boots under KVM on the server, else ``"qemu"``."""
    if session.target.transport == "test" or not offers_kvm(session):
        return "qemu"
    disk, log, err = f"{REMOTE_DIR}/disk.qcow2", f"{REMOTE_DIR}/serial.log", f"{REMOTE_DIR}/stderr.log"
    session.run(["mkdir", "-p", REMOTE_DIR])
    try:
        session.put(appliance, disk)
        qemu = shlex.join(["qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-nodefaults", "-display", "none",
                           "-no-user-config", "-snapshot", "-drive", f"file={disk},if=virtio,format=qcow2",
                           "-serial", f"file:{log}", "-no-reboot"])
        steps = int(timeout / 0.2)
        script = (
            f"{qemu} </dev/null >/dev/null 2>{shlex.quote(err)} & pid=$!; "
            f"for i in $(seq 1 {steps}); do "
            f"grep -q {shlex.quote(HEARTBEAT_MARKER)} {shlex.quote(log)} 2>/dev/null && {{ kill $pid; echo kvm; exit 0; }}; "
            f"grep -q 'KVM internal error' {shlex.quote(err)} 2>/dev/null && break; "
            "kill -0 $pid 2>/dev/null || break; sleep 0.2; done; "
            "kill $pid 2>/dev/null; echo qemu"
        )
        out = session.run(["sh", "-c", script], timeout=timeout + 15).stdout.strip().splitlines()
        return "kvm" if out and out[-1] == "kvm" else "qemu"
    finally:
        session.run(["rm", "-rf", REMOTE_DIR], check=False)

"""This machine's libvirt daemons: start them when installed but not running.

``corral up`` on a fresh machine finds libvirt installed by the package
manager but often not started (containers, no systemd). These functions
start ``virtlogd`` and ``libvirtd`` as daemons and wait until libvirt answers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .errors import LibvirtUnavailable, MountpointMissing

LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")  # QEMU's console and log output goes through it
LOCAL_URI = "qemu:///system"


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


def libvirtd_answers() -> bool:
    """True when the system libvirtd here answers a ``virsh version``."""
    if not LIBVIRT_SOCKET.exists():
        return False
    try:
        r = subprocess.run(["virsh", "-c", LOCAL_URI, "version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def ensure_libvirtd() -> None:
    """Start virtlogd and libvirtd unless they run; LibvirtUnavailable says what to do when that fails."""
    ensure_virtlogd()
    if libvirtd_answers():
        return
    daemon = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    if not Path(daemon).exists():
        raise LibvirtUnavailable("libvirtd is not installed (apt-get install libvirt-daemon-system qemu-system-x86).")
    subprocess.run([daemon, "--daemon"], check=False, timeout=60)
    ensure_virtlogd()
    for _ in range(150):  # a first start probes QEMU's capabilities for a while
        if libvirtd_answers():
            return
        time.sleep(0.2)
    raise LibvirtUnavailable("libvirtd did not start; see its log (journalctl or /var/log/libvirt).")


def ensure_directory(path: str) -> None:
    """Create a VM disk directory on this machine (the default one does not exist on a fresh machine)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MountpointMissing(f"cannot create the VM disk directory {path}: {exc.strerror}") from exc

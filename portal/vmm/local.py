"""This machine's libvirt daemons: start them when installed but not running.

``corral up`` on a fresh machine finds libvirt installed by the package
manager but often not started (containers, no systemd). These functions
start ``virtlogd`` and ``libvirtd`` as daemons and wait until libvirt answers.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from .errors import LibvirtUnavailable, MountpointMissing

LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")  # QEMU's console and log output goes through it
LOCAL_URI = "qemu:///system"


def listening(path: Path) -> bool:
    """True when something accepts connections on the unix socket *path* (a socket file left by a
    daemon that died is refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except PermissionError:
            return True  # not ours to judge (not root): leave it alone
        except OSError:
            return False
    return True


def ensure_virtlogd() -> None:
    """Start virtlogd when nothing (itself, or systemd's socket activation) listens on its socket."""
    if listening(VIRTLOGD_SOCKET):
        return
    for stale in (VIRTLOGD_SOCKET, VIRTLOGD_SOCKET.with_name("virtlogd-admin-sock")):
        try:
            stale.unlink(missing_ok=True)  # left by a virtlogd that died: QEMU could not start through it
        except OSError:
            pass
    daemon = shutil.which("virtlogd") or "/usr/sbin/virtlogd"
    if Path(daemon).exists():
        subprocess.run([daemon, "--daemon"], check=False, timeout=30)
        for _ in range(50):
            if listening(VIRTLOGD_SOCKET):
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

"""Decide per server whether guests really run under KVM, by booting one.

``/dev/kvm`` existing is not enough: a nested device without VT-x/SVM lets
SeaBIOS start and then stops the guest with ``KVM internal error``. So the
test appliance is copied to the server and booted once with ``-accel kvm``;
a heartbeat on its serial console means KVM works, anything else means TCG
(libvirt domain type ``qemu``). One function does it for every server, this
machine included (through a local session).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from .appliance import DEFAULT_CACHE_DIR, HEARTBEAT_MARKER, build_appliance
from .session import HostSession, LocalSession, Target

_CACHE_NAME = "domain-type.json"


def offers_kvm(session: HostSession) -> bool:
    caps = ET.fromstring(session.libvirt().getCapabilities())
    return any(d.get("type") == "kvm" for d in caps.iter("domain"))


def detect_domain_type(session: HostSession, appliance: Path, *, timeout: float = 20.0) -> str:
    """``"kvm"`` when the appliance boots under KVM on the server, else ``"qemu"``.

    Needs no libvirt: callers that talk to libvirt ask :func:`offers_kvm` first.
    """
    if not session.run(["test", "-r", "/dev/kvm", "-a", "-w", "/dev/kvm"], check=False).ok:
        return "qemu"
    # A directory of its own: two detections on one server must not share files.
    work = session.run(["mktemp", "-d", "/var/tmp/corral-detect.XXXXXX"]).stdout.strip()
    disk, log, err = f"{work}/disk.qcow2", f"{work}/serial.log", f"{work}/stderr.log"
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
        session.run(["rm", "-rf", "--", work], check=False)


def local_domain_type(cache_dir: Path | None = None, *, timeout: float = 20.0) -> str:
    """:func:`detect_domain_type` for this machine, remembered in *cache_dir*.

    The answer is kept keyed by CPU flags, kernel and QEMU binary, so a
    machine boots the test guest once. ``CORRAL_DOMAIN_TYPE`` (kvm|qemu) overrides.
    """
    forced = os.environ.get("CORRAL_DOMAIN_TYPE")
    if forced in ("kvm", "qemu"):
        return forced
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    key = _machine_key()
    cache_file = cache_dir / _CACHE_NAME
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key and cached.get("domain_type") in ("kvm", "qemu"):
            return str(cached["domain_type"])
    result = "qemu"
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        with LocalSession(Target("localhost", "127.0.0.1", transport="local")) as session:
            result = detect_domain_type(session, build_appliance(cache_dir), timeout=timeout)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "domain_type": result}) + "\n")
    os.replace(tmp, cache_file)
    return result


def _machine_key() -> str:
    h = hashlib.sha256()
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    except OSError:
        flags = ""
    h.update(flags.encode())
    h.update(os.uname().release.encode())
    qemu = shutil.which("qemu-system-x86_64") or ""
    if qemu:
        st = os.stat(qemu)
        h.update(f"{qemu}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(b"kvm" if os.path.exists("/dev/kvm") else b"nokvm")
    return h.hexdigest()[:16]

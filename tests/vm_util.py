"""Helpers for tests that drive VMs through the portal on the test bed (plain functions, no fixtures).

Kept out of the test modules so that tests share them by import, never by
importing another test module; fixtures live in conftest.py (``bed_portal``).
"""

from __future__ import annotations

import subprocess
import time

import pytest

from portal.extensions import db
from portal.models import VM, Task
from portal.vmm.session import SSHSession, Target
from tests.conftest import run_worker_burst


def bed_session(bs) -> SSHSession:
    """Corral's SSH session to a bed server, built one way for every test and bench."""
    return SSHSession(Target(hostname=bs.name, address=bs.address, port=bs.ssh_port, host_key=bs.host_key_public,
                             key_file=bs.client_key, known_hosts=bs.known_hosts, ssh_command=bs.ssh_command,
                             libvirt_uri=bs.uri_tcp))


def create(client, setup, name, *, server=0, clone=False, mac="", memory=256):
    data = {"name": name, "appliance": setup["appliance"], "memory_mb": memory, "vcpus": 1,
            "placement": str(setup["disks"][setup["servers"][server]]), "mac": mac}
    if clone:
        data["clone"] = "y"
    return client.post("/vms/new", data=data)


def vm_row(app, name) -> VM:
    with app.app_context():
        vm = db.session.execute(db.select(VM).where(VM.name == name)).scalar_one_or_none()
        if vm is not None:
            db.session.expunge(vm)
        return vm


def last_task(app, name) -> Task:
    with app.app_context():
        vm_id = db.session.execute(db.select(VM.id).where(VM.name == name)).scalar_one()
        return db.session.execute(db.select(Task).where(Task.target_type == "vm", Task.target_id == vm_id)
                                  .order_by(Task.id.desc())).scalars().first()


def act(app, client, name, action, expect_state):
    vm = vm_row(app, name)
    r = client.post(f"/vms/{vm.id}/power/{action}")
    assert r.status_code == 302
    run_worker_burst()
    task = last_task(app, name)
    assert task.state == "succeeded", (action, task.error, task.log)
    assert vm_row(app, name).state == expect_state, action


def domstate(bs, name) -> str:
    return subprocess.run(["virsh", "-c", bs.uri_tcp, "domstate", name], capture_output=True, text=True,
                          check=True).stdout.strip()


def wait_serial(bs, name, predicate, timeout=90):
    path = bs.host_path(f"/var/log/libvirt/qemu/{name}.serial.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if predicate(text):
            return text
        time.sleep(0.3)
    pytest.fail(f"serial log of {name} never matched; tail: {text[-500:]}")


def last_ack(bs, name) -> int:
    """The last write the guest *name* on bed server *bs* was told is durable: its last serial heartbeat
    (the appliance prints ``CORRAL-HB n`` only after the fsync of record n returned; 0 before any)."""
    from portal.vmm.appliance import parse_serial_log

    path = bs.host_path(f"/var/log/libvirt/qemu/{name}.serial.log")
    return (parse_serial_log(path.read_text(errors="replace")).last_heartbeat or 0) if path.exists() else 0


def disk_counter(bs, path) -> int | None:
    """The heartbeat counter stored in the disk image *path* (a path inside bed server *bs*), read offline
    (shared lock ignored: read it while no QEMU writes it, or accept a value at most one write behind)."""
    from portal.vmm.appliance import read_disk_heartbeat

    return read_disk_heartbeat(bs.host_path(path))


def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    """Poll *predicate* until it returns something true (returned), or fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RunningSampler:
    """Every 100 ms (in a thread): on which bed servers does domain *name* run? Lists over each server's
    unix socket from the root namespace, so a partitioned server is still seen. ``both`` counts the
    samples where it ran on two servers at once."""

    def __init__(self, bed, indexes, name):
        import threading

        self.bed, self.indexes, self.name, self.stop = bed, list(indexes), name, threading.Event()
        self.samples: list[tuple[float, set[int]]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def running_on(self) -> set[int]:
        on = set()
        for i in self.indexes:
            out = subprocess.run(["virsh", "-q", "-c", self.bed.server(i).uri_unix, "list", "--name",
                                  "--state-running"], capture_output=True, text=True, timeout=5).stdout
            if self.name in out.split():
                on.add(i)
        return on

    def _run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), self.running_on()))
            time.sleep(0.1)

    def start(self) -> RunningSampler:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    @property
    def both(self) -> int:
        return sum(1 for _t, on in self.samples if len(on) > 1)

    def first_on(self, i: int, after: float) -> float | None:
        return next((t for t, on in list(self.samples) if t >= after and i in on), None)

    def last_on(self, i: int, after: float) -> float:
        times = [t for t, on in list(self.samples) if t >= after and i in on]
        return times[-1] if times else after


def boot_heartbeats(bs, name) -> list[int]:
    """The heartbeats the guest *name* printed on *bs* since its last boot (``CORRAL-READY``)."""
    from portal.vmm.appliance import parse_serial_log

    path = bs.host_path(f"/var/log/libvirt/qemu/{name}.serial.log")
    text = path.read_text(errors="replace") if path.exists() else ""
    if "CORRAL-READY" not in text:
        return []
    return parse_serial_log(text[text.rindex("CORRAL-READY"):]).heartbeats


_SERIAL_COMMAND = r"""
import os, re, select, sys, termios, time, tty
pty, command, marker, timeout = sys.argv[1], sys.argv[2], re.compile(sys.argv[3]), float(sys.argv[4])
fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
tty.setraw(fd)
attrs = termios.tcgetattr(fd)
attrs[3] &= ~termios.ECHO
termios.tcsetattr(fd, termios.TCSANOW, attrs)
os.write(fd, b"\x15" + command.encode() + b"\r")
out, deadline = b"", time.monotonic() + timeout
while time.monotonic() < deadline and not marker.search(out.decode(errors="replace")):
    if select.select([fd], [], [], 0.2)[0]:
        out += os.read(fd, 65536)
sys.stdout.write(out.decode(errors="replace"))
sys.exit(0 if marker.search(out.decode(errors="replace")) else 1)
"""


def serial_command(bed, bs, name: str, command: str, until: str, timeout: float = 60) -> str:
    """Type *command* into the guest's serial shell (the test appliance runs one on ttyS0) through its
    pty on the server, and return what came back once the regex *until* matched (the echo included;
    choose an *until* the echoed command itself cannot match). Fails the test on a timeout."""
    import re as _re

    xml = bed.virsh(bs.index, "dumpxml", name).stdout
    pty = _re.search(r"<console type='pty'[^>]*>\s*<source path='([^']+)'", xml) or \
        _re.search(r"<serial type='pty'>\s*<source path='([^']+)'", xml)
    assert pty, f"{name} has no serial pty"
    r = bed.exec(bs.index, ["python3", "-c", _SERIAL_COMMAND, pty.group(1), command, until, str(timeout)],
                 check=False, timeout=timeout + 30)
    assert r.returncode == 0, f"{name} did not answer {command!r} with {until!r}:\n{r.stdout[-3000:]}"
    return r.stdout

"""The serial console: one follower per running VM fills a Redis buffer that every viewer reads."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from portal import consoles
from portal.extensions import db, queues
from portal.models import VM, Role, Server
from portal.vmm import console as vmm_console
from tests.bed.guest import appliance_domain_xml, serial_log_path
from tests.conftest import log_in_client, make_server, make_user, make_vm, register_bed_server


def _wait_for(fn, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
    return value


def _console(client, vm_id: int) -> str:
    r = client.get(f"/vms/{vm_id}/_console", headers={"HX-Request": "true"})
    assert r.status_code == 200
    return r.get_data(as_text=True)


def test_the_page_shows_only_this_vms_buffer_and_says_when_nobody_follows(app, client):
    with app.app_context():
        owner = make_user("pat", Role.REGULAR)
        vm = make_vm(owner, "con0", server=make_server(), state="running")
        vm_id, source = vm.id, consoles.source_of(vm)
        key = consoles.buffer_key(app.config["QUEUE_PREFIX"], vm_id)
    log_in_client(client, "pat")
    page = _console(client, vm_id)
    assert "Waiting for the guest&#39;s first output" in page and "corral monitor" in page
    with app.app_context():
        # A buffer from another log (the VM moved, or a deleted VM had this id) is not shown.
        queues.redis.hset(key, mapping={"data": b"someone else's guest\n", "offset": 21, "source": "99:/x.log"})
        assert "someone else" not in _console(client, vm_id)
        lines = b"".join(b"CORRAL-HB %d\n" % i for i in range(60))
        queues.redis.hset(key, mapping={"data": lines, "offset": len(lines), "source": source})
        queues.redis.set(consoles.alive_key(app.config["QUEUE_PREFIX"]), 1)
    page = _console(client, vm_id)
    assert "CORRAL-HB 59" in page and "CORRAL-HB 20" in page and "CORRAL-HB 19\n" not in page  # the last 40 lines
    assert "corral monitor" not in page
    assert queues_empty(app)  # a viewer never asks a worker


def queues_empty(app) -> bool:
    with app.app_context():
        return queues.queue().count == 0


@pytest.fixture
def counted_reads(monkeypatch):
    """Every vmm.console.read_new call, with the thread that made it (a wrapper: the reads stay real)."""
    calls: list[tuple[str, list[tuple[str, int]]]] = []
    real = vmm_console.read_new

    def counting(session, positions, max_bytes):
        calls.append((threading.current_thread().name, list(positions)))
        return real(session, positions, max_bytes)

    monkeypatch.setattr(vmm_console, "read_new", counting)
    return calls


@pytest.mark.bed
def test_one_follower_per_vm_fills_the_buffer_every_viewer_reads(app, client, bed_servers, appliance_image,
                                                                 domain_type, counted_reads, console_follower):
    bs = bed_servers[1]
    sid = register_bed_server(app, bs)
    with app.app_context():
        owner = make_user("pat", Role.REGULAR)
        server = db.session.get(Server, sid)
        vm_id = make_vm(owner, "con1", server=server, state="running").id
        # A second running VM on the same server whose log does not exist yet: read in the same command.
        idle_id = make_vm(owner, "con2", server=server, state="running").id
    disk = f"{bs.images_dir}/con1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(appliance_image), "-F", "qcow2",
                    str(bs.host_path(disk))], check=True, capture_output=True)
    virsh = ["virsh", "-c", bs.uri_tcp]
    subprocess.run([*virsh, "create", "/dev/stdin"], input=appliance_domain_xml("con1", disk, domain_type=domain_type,
                                                                                bridge=None),
                   text=True, check=True, capture_output=True)
    reader = f"console-{bs.name}"
    try:
        log_in_client(client, "pat")
        page = _wait_for(lambda: (p := _console(client, vm_id)) and "CORRAL-READY con1" in p and p, "the ready line")
        assert "corral monitor" not in page
        assert _console(client, idle_id).count("Waiting for the guest") == 1

        # Twelve viewers polling at once: every read is the follower's, one command for the server's logs.
        before = len(counted_reads)
        errors: list[str] = []

        def viewer():
            c = app.test_client()
            log_in_client(c, "pat")
            for _ in range(5):
                if "CORRAL-HB" not in _console(c, vm_id):
                    errors.append("a viewer saw no heartbeat")

        threads = [threading.Thread(target=viewer, name=f"viewer-{i}") for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        _wait_for(lambda: len(counted_reads) > before + 1, "the follower to keep reading")
        assert {name for name, _ in counted_reads} == {reader}
        assert all(sorted(p for p, _ in positions) == [serial_log_path("con1"), serial_log_path("con2")]
                   for _, positions in counted_reads[before:])
        assert queues_empty(app)

        # The guest powers off: its last line still reaches the buffer, then nothing follows it.
        subprocess.run([*virsh, "shutdown", "con1"], check=True, capture_output=True)
        _wait_for(lambda: subprocess.run([*virsh, "domstate", "con1"], capture_output=True).returncode != 0,
                  "the transient domain to go")
        with app.app_context():
            for vm in db.session.execute(db.select(VM).where(VM.id.in_([vm_id, idle_id]))).scalars():
                vm.state = "off"  # what the monitor records from the lifecycle event
            db.session.commit()
        _wait_for(lambda: not console_follower.following(), "the follower to let go")
        _wait_for(lambda: not any(t.name == reader for t in threading.enumerate()), "the reader to end")
        done = len(counted_reads)
        assert "CORRAL-SHUTDOWN" in _console(client, vm_id)
        assert len(counted_reads) == done
    finally:
        subprocess.run([*virsh, "destroy", "con1"], capture_output=True)
        bs.host_path(disk).unlink(missing_ok=True)
        bs.host_path(serial_log_path("con1")).unlink(missing_ok=True)

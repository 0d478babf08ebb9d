"""The Corral agent (portal/vmm/agent.py) as a real process on loopback: signed leases only, peers'
heartbeats, and self-fencing of its protected "domains" (here a sleep process standing for a QEMU,
found through its pid file like libvirt's) once it hears neither Corral nor a peer."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from portal.vmm import agent, fence
from tests.conftest import free_port


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _start(tmp_path, name, port, peers=(), fence_after=1.0):
    cfg = {"address": "127.0.0.1", "port": port, "secret": f"s-{name}", "fence_after": fence_after,
           "libvirt_uri": "test:///default", "pid_dir": str(tmp_path),
           "peers": [{"address": "127.0.0.1", "port": p, "secret": "pair"} for p in peers]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    with open(tmp_path / f"{name}.log", "w") as out:
        proc = subprocess.Popen([sys.executable, agent.__file__, "--config", str(path)], stdout=out,
                                stderr=subprocess.STDOUT)
    _wait(lambda: _open(port), 10, "agent up")
    return proc, fence.AgentConfig("127.0.0.1", port, f"s-{name}", fence_after, ())


def _open(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def guest(tmp_path):
    proc = subprocess.Popen(["sleep", "300"])
    (tmp_path / "vm1.pid").write_text(f"{proc.pid}\n")
    yield proc
    proc.kill()
    proc.wait()


def test_signed_leases_only_and_self_fencing(tmp_path, guest):
    proc, cfg = _start(tmp_path, "a", free_port())
    try:
        with pytest.raises((OSError, ValueError)):
            fence.lease(fence.AgentConfig(cfg.address, cfg.port, "wrong", 1.0, ()), ["vm1"])
        answer = fence.lease(cfg, ["vm1"])
        assert answer["ok"] and answer["protect"] == ["vm1"]
        # renewed leases keep it running past the fence time
        for _ in range(15):
            fence.lease(cfg, ["vm1"])
            time.sleep(0.1)
        assert guest.poll() is None
        _wait(lambda: guest.poll() is not None, 10, "the agent to kill its protected guest")
        _wait(lambda: fence.lease(cfg, [])["fenced"] == ["vm1"], 10, "the agent to report it")
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_peer_heard_means_no_fencing(tmp_path, guest):
    pa, pb = free_port(), free_port()
    a, cfg = _start(tmp_path, "a", pa, peers=[pb])
    b, _ = _start(tmp_path, "b", pb, peers=[pa])
    try:
        fence.lease(cfg, ["vm1"])  # Corral names the protected guest once, then goes away
        time.sleep(2.5)  # longer than fence_after without Corral: the peer's heartbeats keep it alive
        assert guest.poll() is None
        assert fence.lease(cfg, ["vm1"])["peers"]["127.0.0.1"] < 1.0
        b.terminate()  # now it hears neither: it fences
        b.wait(10)
        _wait(lambda: guest.poll() is not None, 5, "fencing once the peer is gone too")
    finally:
        for p in (a, b):
            p.terminate()
            p.wait(10)

#!/usr/bin/env python3
"""The Corral agent: one small stdlib-only process on every VM server that takes part in LiveSync.

Corral copies this file to the server and starts it (portal/vmm/fence.py). It reads one JSON config
(``--config``): ``{"address", "port", "secret", "fence_after", "peers": [{"address", "port",
"secret"}], "libvirt_uri"}`` and listens on ``address:port`` only (the servers' own network).

Every message is one JSON line ``{"op", "t", ..., "mac"}``; ``mac`` is HMAC-SHA256 of the message
without it under a shared secret (Corral <-> agent: the server's secret; agent <-> agent: the pair's
secret), and ``t`` must be within 30 s of the receiver's clock (no replays of old leases).

* ``lease`` (Corral, the witness, about every 0.5 s): renews the lease and names the protected domains
  running here (``protect``); the answer says how long ago each peer was heard.
* ``hb`` (a paired agent, every 0.5 s each way): a heartbeat.

Self-fencing: while protected domains run here and neither Corral nor any peer was heard for
``fence_after`` seconds, the agent destroys them (``virsh destroy``, then SIGKILL of the QEMU from its
pid file), so the backup may start them: Corral takes over only later (``HA_TAKEOVER_SECONDS`` >
``fence_after`` + margin). A primary that hears either keeps running. On real servers run it under
systemd with ``WatchdogSec=`` and the kernel watchdog (see README) so that a hung agent reboots the
server instead of leaving a VM running unfenced.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time

MAX_SKEW = 30.0
PID_DIR = "/run/libvirt/qemu"


def sign(secret: str, message: dict) -> dict:
    body = {k: v for k, v in message.items() if k != "mac"}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, "mac": hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()}


def verify(secret: str, message: dict) -> bool:
    mac = message.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(sign(secret, message)["mac"], mac):
        return False
    t = message.get("t")
    return isinstance(t, int | float) and abs(time.time() - t) <= MAX_SKEW


def call(address: str, port: int, secret: str, message: dict, timeout: float = 1.0) -> dict:
    """Send one signed message and return the (verified) answer; raises OSError/ValueError."""
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(json.dumps(sign(secret, {**message, "t": time.time()})).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"{}")
    if not verify(secret, answer):
        raise ValueError("bad signature in the answer")
    return answer


class Agent:
    def __init__(self, config: dict):
        self.config = config
        self.started = time.monotonic()
        self.corral_at = None  # monotonic time of the last lease
        self.peer_at = {p["address"]: None for p in config.get("peers", [])}
        self.protect: list[str] = []
        self.fenced: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _secret_for(self, message: dict) -> str | None:
        if message.get("op") == "lease":
            return self.config["secret"]
        for p in self.config.get("peers", []):
            if p["address"] == message.get("from"):
                return p["secret"]
        return None

    def handle(self, message: dict) -> dict | None:
        secret = self._secret_for(message)
        if secret is None or not verify(secret, message):
            return None
        now = time.monotonic()
        with self.lock:
            if message["op"] == "lease":
                self.corral_at = now
                self.protect = [str(n) for n in message.get("protect", [])]
                if self.protect:
                    self.fenced = [n for n in self.fenced if n not in self.protect]
            else:
                self.peer_at[message["from"]] = now
            answer = {"ok": True, "t": time.time(), "from": self.config["address"], "protect": self.protect, "fenced": self.fenced,
                      "corral_age": None if self.corral_at is None else now - self.corral_at,
                      "peers": {a: (None if at is None else now - at) for a, at in self.peer_at.items()},
                      "uptime": now - self.started, "digest": self.config.get("digest")}
        return sign(secret, answer)

    def heartbeats(self) -> None:
        while not self.stop.wait(0.5):
            for p in self.config.get("peers", []):
                try:
                    call(p["address"], int(p["port"]), p["secret"], {"op": "hb", "from": self.config["address"]},
                         timeout=0.5)
                except (OSError, ValueError):
                    continue
                with self.lock:
                    self.peer_at[p["address"]] = time.monotonic()

    def isolated_for(self) -> float:
        """Seconds since this server last heard Corral or any peer (since start when never)."""
        now = time.monotonic()
        heard = [t for t in [self.corral_at, *self.peer_at.values()] if t is not None]
        return now - max(heard, default=self.started)

    def fence_loop(self) -> None:
        fence_after = float(self.config.get("fence_after", 3.0))
        while not self.stop.wait(0.1):
            with self.lock:
                victims = list(self.protect) if self.isolated_for() >= fence_after else []
            for name in victims:
                self.fence(name)

    def fence(self, name: str) -> None:
        uri = self.config.get("libvirt_uri") or "qemu:///system"
        pid_file = os.path.join(self.config.get("pid_dir") or PID_DIR, f"{name}.pid")
        pid = None
        try:
            with open(pid_file) as fh:
                pid = int(fh.read().strip())
        except (OSError, ValueError):
            pass
        if pid is not None:  # first the QEMU itself: libvirtd may be the part that hangs
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            subprocess.run(["virsh", "-c", uri, "destroy", name], capture_output=True, timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        log(f"fenced {name}: isolated for {self.isolated_for():.1f} s (pid {pid})")
        with self.lock:
            if name in self.protect:
                self.protect.remove(name)
            if name not in self.fenced:
                self.fenced.append(name)

    def serve(self) -> None:
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 2

            def handle(self):
                try:
                    message = json.loads(self.rfile.readline(65536) or b"{}")
                    answer = agent.handle(message) if isinstance(message, dict) else None
                except (OSError, ValueError):
                    return
                if answer is not None:
                    self.wfile.write(json.dumps(answer).encode() + b"\n")

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        threading.Thread(target=self.heartbeats, daemon=True).start()
        threading.Thread(target=self.fence_loop, daemon=True).start()
        with Server((self.config["address"], int(self.config["port"])), Handler) as server:
            signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
            log(f"listening on {self.config['address']}:{self.config['port']}")
            server.serve_forever(poll_interval=0.2)
        self.stop.set()


def log(text: str) -> None:
    print(time.strftime("%Y-%m-%dT%H:%M:%S"), text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Corral agent (LiveSync quorum and self-fencing)")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    with open(args.config) as fh:
        config = json.load(fh)
    with open(os.path.join(os.path.dirname(os.path.abspath(args.config)), "agent.pid"), "w") as fh:
        fh.write(f"{os.getpid()}\n")
    Agent(config).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

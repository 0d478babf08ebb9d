"""Corral's side of the agent (portal/vmm/agent.py): install and start it on a server over SSH, renew
its lease, and the host facts the two-of-three rule needs (live NBD clients of an export).

In this version the agent runs detached from ``/run/corral-agent`` (so it is gone after a reboot, and
Corral installs it again when the server answers SSH); a real deployment adds a systemd unit with
``WatchdogSec=`` and the kernel watchdog (README, LiveSync section).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import agent
from .session import HostSession

AGENT_DIR = "/run/corral-agent"
AGENT_SOURCE = Path(agent.__file__)


@dataclass(frozen=True)
class AgentConfig:
    address: str
    port: int
    secret: str
    fence_after: float
    peers: tuple[tuple[str, int, str], ...]  # (address, port, pair secret)
    libvirt_uri: str = "qemu:///system"

    def as_json(self) -> dict:
        body = {"address": self.address, "port": self.port, "secret": self.secret, "fence_after": self.fence_after,
                "libvirt_uri": self.libvirt_uri,
                "peers": [{"address": a, "port": p, "secret": s} for a, p, s in self.peers]}
        return {**body, "digest": self.digest}

    @property
    def digest(self) -> str:
        """Names the config (without secrets in clear) so Corral sees when an agent runs an old one."""
        raw = json.dumps([self.address, self.port, self.secret, self.fence_after, list(self.peers),
                          self.libvirt_uri, AGENT_SOURCE.read_bytes().hex()], sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def install(session: HostSession, config: AgentConfig) -> None:
    """Copy the agent and its config (mode 600) to the server and (re)start it detached. Idempotent."""
    session.run(["sh", "-c", f"umask 077 && mkdir -p {AGENT_DIR} && cat > {AGENT_DIR}/agent.json.new && "
                             f"mv {AGENT_DIR}/agent.json.new {AGENT_DIR}/agent.json"],
                input=json.dumps(config.as_json()))
    session.put(AGENT_SOURCE, f"{AGENT_DIR}/agent.py")
    stop(session)
    session.run(["sh", "-c", f"setsid -f python3 {AGENT_DIR}/agent.py --config {AGENT_DIR}/agent.json "
                             f"</dev/null >>{AGENT_DIR}/agent.log 2>&1"], timeout=15)


def stop(session: HostSession) -> None:
    session.run(["sh", "-c", f"p=$(cat {AGENT_DIR}/agent.pid 2>/dev/null) && kill $p 2>/dev/null; "
                             f"for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 $p 2>/dev/null || exit 0; sleep 0.1; done; "
                             f"kill -9 $p 2>/dev/null; true"], check=False, timeout=15)


def lease(config: AgentConfig, protect: list[str], timeout: float = 0.8) -> dict:
    """Renew the server's lease; tells the agent which protected domains run there. Raises OSError or
    ValueError when the agent does not answer (or answers unsigned)."""
    return agent.call(config.address, config.port, config.secret, {"op": "lease", "protect": sorted(protect)},
                      timeout=timeout)


def live_clients(session: HostSession, port: int, quiet_ms: int) -> int:
    """Established connections to the export's *port* that received data within *quiet_ms*.

    A primary whose link went down leaves its connection ESTABLISHED on the backup for good (no reset
    arrives), so a connection silent for longer than the lease counts as gone; a primary that is
    alive and writing shows as a live client."""
    out = session.run(["ss", "-Htni", "state", "established", f"( sport = :{port} )"], check=False).stdout
    blocks: list[str] = []
    for line in out.splitlines():
        if line[:1].isspace() and blocks:
            blocks[-1] += " " + line
        elif line.strip():
            blocks.append(line)
    live = 0
    for block in blocks:
        rcv = [f for f in block.split() if f.startswith("lastrcv:")]
        if not rcv or int(rcv[0].split(":", 1)[1]) < quiet_ms:  # no timing info: count it (safe side)
            live += 1
    return live

"""Helpers for the Nagios checks: run a check as a process, a registered bed server.

``run_plugin`` runs ``python -m checks.check_X`` the way Nagios runs the
console script; it inherits the test's ``CORRAL_*`` settings (the ``app_env``
fixture puts them in ``os.environ``), so the check sees the test's database
and Redis. It asserts that stdout starts with a Nagios status line whose state
matches the exit code.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from portal import servers
from tests.bed.core import BedServer
from tests.conftest import register_bed_server

ROOT = Path(__file__).resolve().parents[2]
EXIT_CODES = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}
# "NAME STATE - summary | perfdata"; argument errors and early failures read "NAME UNKNOWN: ...".
STATUS_LINE = re.compile(r"^(?:(?P<name>[A-Z_]+) )?(?P<state>OK|WARNING|CRITICAL|UNKNOWN)(?: - |: )"
                         r"(?P<summary>.*?)(?: \| (?P<perfdata>.*))?$")


@dataclass
class PluginRun:
    code: int
    name: str | None
    state: str
    summary: str
    perfdata: dict[str, str] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""

    def value(self, label: str) -> float:
        """The number of one perfdata item (``mem_free=93.1%;10;5;0;100`` -> 93.1)."""
        return float(re.match(r"-?[\d.]+", self.perfdata[label]).group())


def run_plugin(check: str, *args: str, env: dict[str, str] | None = None, timeout: float = 90) -> PluginRun:
    proc = subprocess.run([sys.executable, "-m", f"checks.{check}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    m = STATUS_LINE.match(first)
    assert m, f"not a Nagios status line (exit {proc.returncode}): {proc.stdout!r}; stderr: {proc.stderr!r}"
    assert EXIT_CODES[m["state"]] == proc.returncode, proc.stdout + proc.stderr
    perfdata = {}
    for item in shlex.split(m["perfdata"] or ""):
        label, _, value = item.rpartition("=")
        perfdata[label] = value
    return PluginRun(proc.returncode, m["name"], m["state"], m["summary"], perfdata, proc.stdout, proc.stderr)


def unregister_key(bed_server: BedServer, public: str) -> None:
    authorized = Path(bed_server.host_path("/root/.ssh/authorized_keys"))
    if authorized.exists():
        kept = [line for line in authorized.read_text().splitlines() if line.strip() != public]
        tmp = authorized.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, authorized)


@pytest.fixture
def registered_server(app, bed_servers) -> BedServer:
    """The first bed server, registered in the test's database (``Server.hostname == .name``)."""
    bed_server = bed_servers[0]
    register_bed_server(app, bed_server)
    with app.app_context():
        _, public = servers.corral_key()
    yield bed_server
    unregister_key(bed_server, public)

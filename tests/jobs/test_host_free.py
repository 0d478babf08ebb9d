"""The VM and server jobs and the local-server flow reach hosts only through portal.vmm."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "portal"
HOST_MODULES = {"libvirt", "subprocess", "fabric", "paramiko", "invoke"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("module", ["jobs/vms.py", "jobs/servers.py", "local_server.py"])
def test_no_host_libraries(module):
    assert not _imports(ROOT / module) & HOST_MODULES


@pytest.mark.parametrize("module", ["jobs/servers.py", "local_server.py"])
def test_no_host_commands(module):
    """Commands on a server are composed in portal.vmm, not here."""
    calls = [n for n in ast.walk(ast.parse((ROOT / module).read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "run"]
    assert calls == []

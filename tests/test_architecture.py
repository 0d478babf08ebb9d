"""The architecture's hard rules, read from the source with ``ast``.

* Only ``portal/vmm`` touches hosts: nowhere else under ``portal/`` imports
  libvirt, Fabric, Paramiko, Invoke or subprocess.
* The portal never imports ``checks`` (checks import the portal, not the reverse).
* ``portal/vmm`` imports no Flask (it is plain code any process can use).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PORTAL = ROOT / "portal"
VMM = PORTAL / "vmm"

HOST_MODULES = {"libvirt", "libvirt_qemu", "fabric", "paramiko", "invoke", "subprocess"}
# Files outside portal/vmm allowed one of HOST_MODULES, each with the reason.
ALLOWED: dict[str, set[str]] = {
    # `corral up` starts and stops Corral's own processes (redis-server, worker, monitor, web server)
    # as its children; no host tool runs through it (libvirt's daemons start in portal/vmm/local.py).
    "portal/cli.py": {"subprocess"},
}


def imported(path: Path) -> set[str]:
    """Top-level names of every module the file imports (``import a.b``, ``from a.b import c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names.add(node.args[0].value.split(".")[0])
    return names


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "migrations" not in p.relative_to(ROOT).parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_parser_sees_every_form_of_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os.path\nimport libvirt as lv\nfrom fabric.connection import Connection\n"
                   "from . import sibling\nfrom .vmm import session\ndef f():\n    import subprocess\n"
                   "    return __import__('paramiko.client')\n")
    assert imported(src) == {"os", "libvirt", "fabric", "subprocess", "paramiko"}


def test_only_vmm_touches_hosts():
    offenders = []
    for path in _files(PORTAL) + _files(ROOT / "checks"):  # the Nagios checks go through portal/vmm too
        if VMM in path.parents:
            continue
        found = imported(path) & HOST_MODULES - ALLOWED.get(_rel(path), set())
        if found:
            offenders.append(f"{_rel(path)}: {', '.join(sorted(found))}")
    assert not offenders, "host access outside portal/vmm:\n" + "\n".join(offenders)


def test_the_portal_never_imports_checks():
    offenders = [_rel(p) for p in _files(PORTAL) if "checks" in imported(p)]
    assert not offenders, "portal modules importing checks: " + ", ".join(offenders)


def test_vmm_imports_no_flask():
    offenders = [_rel(p) for p in _files(VMM) if imported(p) & {"flask", "flask_sqlalchemy", "flask_login"}]
    assert not offenders, "portal/vmm modules importing Flask: " + ", ".join(offenders)


@pytest.mark.parametrize("rule", [test_only_vmm_touches_hosts, test_the_portal_never_imports_checks,
                                  test_vmm_imports_no_flask])
def test_the_rules_catch_a_violation(rule, monkeypatch, tmp_path):
    """Each rule fails on a tree that breaks it (a copy of the rule's view with one bad file)."""
    fake = tmp_path / "portal"
    (fake / "vmm").mkdir(parents=True)
    bad = {"test_only_vmm_touches_hosts": ("views.py", "import libvirt\n"),
           "test_the_portal_never_imports_checks": ("monitoring.py", "from checks.check_vmm_host import x\n"),
           "test_vmm_imports_no_flask": ("vmm/facts.py", "from flask import current_app\n")}[rule.__name__]
    (fake / bad[0]).write_text(bad[1])
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "ROOT", tmp_path)
    monkeypatch.setattr(here, "PORTAL", fake)
    monkeypatch.setattr(here, "VMM", fake / "vmm")
    with pytest.raises(AssertionError):
        rule()

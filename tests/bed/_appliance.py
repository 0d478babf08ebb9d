"""Import ``portal.vmm.appliance`` even where the portal's own deps are missing.

``portal/__init__.py`` imports Flask and SQLAlchemy; the bed only needs the
appliance builder, so when importing the package fails (a bare ``python3``
running ``python -m tests.bed``) the module file is loaded on its own.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType:
    try:
        from portal.vmm import appliance as mod  # noqa: PLC0415

        return mod
    except ImportError:
        pass
    name = "corral_bed_appliance"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[2] / "portal" / "vmm" / "appliance.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


appliance = _load()

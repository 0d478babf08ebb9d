"""Pytest fixtures for the bed.  Import them from a conftest.py:

    from tests.bed.fixtures import bed, bed_servers, appliance_image, domain_type  # noqa: F401

``bed`` (session): a :class:`~tests.bed.Bed` with ``$CORRAL_BED_SERVERS``
(default 2) clean servers up; taken down at the end of the session unless
``CORRAL_BED_KEEP=1``.  Tests are skipped when the machine cannot run the bed
(not root, or the packages of tests/bed/packages.txt missing).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._appliance import appliance
from .core import Bed, BedServer
from .guest import detect_domain_type

REQUIRED_TOOLS = ("ip", "nsenter", "unshare", "sshd", "libvirtd", "virsh",
                  "qemu-system-x86_64", "qemu-img", "mkfs.fat", "mcopy", "syslinux",
                  "sfdisk", "faketime", "openssl")


def bed_unavailable_reason() -> str | None:
    """Why the bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "the test bed needs root"
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t, path=path) is None]
    if missing:
        return f"missing {missing}: apt-get install $(cat tests/bed/packages.txt)"
    return None


# The same fixture function may be registered twice (tests/conftest.py and
# tests/bed/conftest.py both importing it): share one bed between them.
_active: list[Bed] = []

# One bed per machine: test sessions (and benchmarks run under
# `flock /tmp/corral-bed.lock`) that want it wait for each other here.
BED_LOCK = "/tmp/corral-bed.lock"


@pytest.fixture(scope="session")
def bed() -> Iterator[Bed]:
    reason = bed_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if _active:
        _active.append(_active[0])
        try:
            yield _active[0]
        finally:
            _active.pop()
        return
    lock = open(BED_LOCK, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        the_bed = Bed()
        n = int(os.environ.get("CORRAL_BED_SERVERS", "2"))
        the_bed.up(n=n, clean=True)
        _active.append(the_bed)
        try:
            yield the_bed
        finally:
            _active.pop()
            if os.environ.get("CORRAL_BED_KEEP") != "1":
                the_bed.down()
    finally:
        lock.close()


@pytest.fixture(scope="session")
def bed_servers(bed: Bed) -> list[BedServer]:
    return bed.servers()


@pytest.fixture(scope="session")
def appliance_image(bed: Bed) -> Path:
    """The cached appliance qcow2 (a base image: make linked clones of it)."""
    return Path(appliance.build_appliance(bed.appliance_cache))


@pytest.fixture(scope="session")
def appliance_iso(bed: Bed) -> Path:
    return Path(appliance.build_iso(bed.appliance_cache))


@pytest.fixture(scope="session")
def domain_type(bed: Bed) -> str:
    """``"kvm"`` where guests really run under KVM, else ``"qemu"`` (TCG)."""
    return detect_domain_type(bed.appliance_cache)

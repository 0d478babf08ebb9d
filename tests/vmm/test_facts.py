"""portal.vmm.facts: what a server has, measured the way its kernel reports it.

The bed servers are network namespaces on this machine, so their kernel is
this test's kernel: /proc/meminfo read here is what the server's reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from portal import servers
from portal.extensions import db
from portal.models import Server
from portal.vmm import facts
from portal.vmm.errors import MountpointMissing, VmmError
from tests.conftest import register_bed_server

MEMINFO = """MemTotal:       24684092 kB
MemFree:        23856976 kB
MemAvailable:   24200200 kB
Buffers:            4820 kB
Cached:           512132 kB
HugePages_Total:       0
"""


def test_memory_is_the_kernels_memtotal_and_memavailable():
    m = facts.memory_from(MEMINFO, libvirt_mb=24105)
    assert (m.total_mb, m.available_mb, m.note) == (24684092 // 1024, 24200200 // 1024, None)


def test_a_libvirt_figure_far_off_is_explained():
    """This machine's libvirt said 5,850 MB of a 24 GB machine; placement then refused VMs that fit."""
    m = facts.memory_from(MEMINFO, libvirt_mb=5850)
    assert m.total_mb == 24105
    assert m.note == ("libvirt reports 5,850 MB, the kernel (MemTotal in /proc/meminfo) 24,105 MB; "
                      "Corral uses the kernel's figure.")


def test_kernels_without_memavailable_count_caches_as_free():
    old = "MemTotal: 2048000 kB\nMemFree: 1024000 kB\nBuffers: 1024 kB\nCached: 100000 kB\n"
    assert facts.memory_from(old, 2000).available_mb == (1024000 + 1024 + 100000) // 1024


def test_meminfo_without_memtotal_is_an_error():
    with pytest.raises(VmmError, match="MemTotal"):
        facts.memory_from("MemFree: 1 kB\n", 1)


def _kernel_meminfo() -> dict[str, int]:
    return facts.parse_meminfo(Path("/proc/meminfo").read_text())


@pytest.fixture
def session(app, bed_servers):
    """A session to the first bed server the way Corral opens it (SSH, qemu+ssh)."""
    sid = register_bed_server(app, bed_servers[0])
    with app.app_context():
        session = servers.session_for(db.session.get(Server, sid))
    with session:
        yield session


@pytest.mark.bed
def test_server_memory_matches_proc_meminfo(session):
    found = facts.probe_facts(session)
    kernel = _kernel_meminfo()
    assert found.memory_mb == kernel["MemTotal"] // 1024
    # MemAvailable moves while other work runs: within 10 % of the machine.
    assert abs(found.free_memory_mb - kernel["MemAvailable"] // 1024) < found.memory_mb // 10
    libvirt_mb = session.libvirt().getInfo()[1]
    far_off = abs(libvirt_mb - found.memory_mb) > facts.MEMORY_TOLERANCE * found.memory_mb
    assert (found.memory_note is not None) == far_off, (libvirt_mb, found.memory_mb, found.memory_note)
    if far_off:
        assert f"libvirt reports {libvirt_mb:,} MB" in found.memory_note
    assert found.as_dict()["memory_note"] == found.memory_note  # travels with the facts to the review page


@pytest.mark.bed
def test_server_nics_disk_and_load(session, bed_servers):
    found = facts.probe_facts(session)
    assert found.nics == len(found.nic_names) >= 1 and "lo" not in found.nic_names
    assert found.hostname == bed_servers[0].name
    disk = facts.probe_disk(session, bed_servers[0].disk_dir)
    assert disk.writable and 0 <= disk.free_gb <= disk.size_gb
    load = facts.probe_load(session)
    assert load.cpus_online >= 1 and load.load1 >= 0
    with pytest.raises(MountpointMissing, match="does not exist"):
        facts.probe_disk(session, "/var/lib/corral/nowhere")

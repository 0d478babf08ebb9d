"""Power-user quotas hold under concurrent requests."""

from __future__ import annotations

import itertools
import threading

import pytest

from portal import quotas
from portal.extensions import db
from portal.models import VM, Role, VirtualDisk
from tests.conftest import make_user, make_vm

_vmids = itertools.count(5000)


def _create_vm_like_a_request(app, user_id: int, name: str, memory_mb: int, disk_gb: int, barrier, results):
    """What a create request does: reserve quota and add the VM in one transaction."""
    with app.app_context():
        barrier.wait()
        try:
            quotas.reserve(user_id, vms=1, memory_mb=memory_mb, disk_gb=disk_gb)
            vm = VM(vmid=next(_vmids), name=name, owner_id=user_id, memory_mb=memory_mb, vcpus=1, state="creating")
            db.session.add(vm)
            db.session.flush()
            db.session.add(VirtualDisk(vm_id=vm.id, position=0, size_gb=disk_gb))
            db.session.commit()
            results.append("ok")
        except quotas.QuotaExceeded as exc:
            db.session.rollback()
            results.append(str(exc))
        finally:
            db.session.remove()


@pytest.mark.parametrize("limit_kind", ["count", "memory", "disk"])
def test_parallel_creates_never_exceed_quota(app, limit_kind):
    limits = {"count": dict(max_vms=3, max_memory_mb=100000, max_disk_gb=100000),
              "memory": dict(max_vms=100, max_memory_mb=1536, max_disk_gb=100000),
              "disk": dict(max_vms=100, max_memory_mb=100000, max_disk_gb=30)}[limit_kind]
    with app.app_context():
        user_id = make_user("pow", Role.POWER, **limits).id
    n = 12
    barrier = threading.Barrier(n)
    results: list[str] = []
    threads = [threading.Thread(target=_create_vm_like_a_request,
                                args=(app, user_id, f"q{i}", 512, 10, barrier, results)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n
    assert results.count("ok") == 3  # 3 VMs, 3 x 512 MB = 1536 MB, 3 x 10 GB = 30 GB
    assert all("Quota exceeded for pow" in r for r in results if r != "ok")
    with app.app_context():
        used = quotas.usage(user_id)
        assert (used.vms, used.memory_mb, used.disk_gb) == (3, 1536, 30)


def test_quota_messages_name_the_limit(app):
    with app.app_context():
        user = make_user("pow", Role.POWER, max_vms=1, max_memory_mb=1024, max_disk_gb=10)
        make_vm(user, "a", memory_mb=512, disk_gb=5)
        with pytest.raises(quotas.QuotaExceeded, match=r"VMs 1 \+ 1 > 1"):
            quotas.reserve(user.id, vms=1, memory_mb=256, disk_gb=1)
        db.session.rollback()


def test_regular_users_cannot_reserve_and_managers_are_unlimited(app):
    with app.app_context():
        reg = make_user("reg")
        boss = make_user("boss", Role.MANAGER)
        with pytest.raises(quotas.QuotaExceeded, match="Regular users cannot create VMs"):
            quotas.reserve(reg.id, vms=1, memory_mb=1, disk_gb=1)
        db.session.rollback()
        quotas.reserve(boss.id, vms=1000, memory_mb=10**7, disk_gb=10**6)
        db.session.rollback()


def test_quota_lines_show_use_against_limit(app):
    with app.app_context():
        user = make_user("pow", Role.POWER, max_vms=4, max_memory_mb=2048, max_disk_gb=40)
        make_vm(user, "a", memory_mb=512, disk_gb=10)
        lines = {q.label: q for q in quotas.lines(user)}
        assert (lines["VMs"].used, lines["VMs"].limit, lines["VMs"].pct) == (1, 4, 25)
        assert (lines["Memory"].used, lines["Memory"].limit) == (512, 2048)
        assert (lines["Disk"].used, lines["Disk"].limit) == (10, 40)

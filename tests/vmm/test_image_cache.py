"""images.cached_copy / remove_cached: the clone bases and ISOs VMs on a server disk share.

Run through a local session (the same code runs over SSH): the cache is a
directory under tmp_path.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading

import pytest

from portal.vmm import images
from portal.vmm.session import LocalSession, Target


@pytest.fixture
def session():
    with LocalSession(Target("here", "127.0.0.1", transport="local")) as s:
        yield s


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "appliance.qcow2"
    path.write_bytes(os.urandom(3 << 20) * 8)  # 24 MiB: several copy chunks
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_copied_once_read_only_then_reused(session, source, tmp_path):
    base = tmp_path / "server" / "corral-bases" / "base.qcow2"
    seen: list[int] = []
    assert images.cached_copy(session, source, str(base), sha256=_sha(source),
                              progress=lambda n, _t: seen.append(n)) is True
    assert _sha(base) == _sha(source) and seen and seen[-1] == source.stat().st_size
    assert stat.S_IMODE(base.stat().st_mode) == 0o444
    assert images.cached_copy(session, source, str(base), sha256=_sha(source)) is False
    assert sorted(p.name for p in base.parent.iterdir()) == ["base.qcow2"]


def test_wrong_checksum_leaves_nothing(session, source, tmp_path):
    base = tmp_path / "server" / "base.qcow2"
    with pytest.raises(images.ImageError, match="checksum mismatch"):
        images.cached_copy(session, source, str(base), sha256="0" * 64)
    assert list(base.parent.iterdir()) == []


def test_two_jobs_caching_the_same_base_at_once_both_succeed(session, source, tmp_path):
    """Both copies are in flight together (held at a barrier in their progress callbacks).

    Before each copy had its own part file, the two wrote into one ``.part``
    and the second ``mv`` found it gone: one clone creation failed.
    """
    base = tmp_path / "server" / "base.qcow2"
    barrier = threading.Barrier(2, timeout=60)
    errors: list[BaseException] = []

    def progress(_n: int, _t: int, waited: list[bool]) -> None:
        if not waited:
            waited.append(True)
            barrier.wait()

    def copy() -> None:
        waited: list[bool] = []
        try:
            with LocalSession(Target("here", "127.0.0.1", transport="local")) as s:
                images.cached_copy(s, source, str(base), sha256=_sha(source),
                                   progress=lambda n, t: progress(n, t, waited))
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=copy) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert _sha(base) == _sha(source)
    assert sorted(p.name for p in base.parent.iterdir()) == ["base.qcow2"]


def test_remove_cached_takes_the_files_and_old_lock_files(session, tmp_path):
    kept, gone = tmp_path / "kept.qcow2", tmp_path / "gone.qcow2"
    for p in (kept, gone, tmp_path / "gone.qcow2.lock"):
        p.write_text("x")
    images.remove_cached(session, [str(gone), str(tmp_path / "never-there.iso")])
    images.remove_cached(session, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.qcow2"]

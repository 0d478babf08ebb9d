"""Verified file copies of portal.vmm.session: on this machine (kernel copy, hashed in parallel from
the page cache) and to a bed server through the ssh binary (hashed on the server where it landed).

Every copy here is real: real files, the real kernel calls, a real sshd. The only thing changed is
the chunk size (smaller, so that small files still take several chunks and an unaligned tail).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from portal.vmm import images, session
from portal.vmm.errors import VmmError
from portal.vmm.images import ImageError
from portal.vmm.session import LocalSession, SSHSession, Target

SIZE = 5 * (1 << 20) + 12345  # five chunks and a tail that is not page-aligned


class Cancelled(Exception):
    """What a job's progress callback raises when the user cancels."""


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(session, "COPY_CHUNK", 1 << 20)


def _random_file(path: Path, size: int = SIZE) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def source(tmp_path) -> tuple[Path, str]:
    """A file of random bytes and its sha256."""
    path = tmp_path / "src.img"
    return path, _random_file(path)


def _local() -> LocalSession:
    return LocalSession(Target("local", "127.0.0.1", transport="local"))


def _recorder() -> tuple[list[tuple[int, int]], session.Progress]:
    seen: list[tuple[int, int]] = []
    return seen, lambda done, total: seen.append((done, total))


def _cancel_at_first_report(done: int, total: int) -> None:
    raise Cancelled()


# --- this machine ------------------------------------------------------------------------------

def test_local_verified_copy_returns_the_sha256_of_the_copy(tmp_path, source):
    (src, sha), dst = source, tmp_path / "dst.img"
    seen, progress = _recorder()

    assert _local().put_verified(src, str(dst), progress) == sha

    assert dst.read_bytes() == src.read_bytes()
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (SIZE, SIZE)
    assert len(seen) == 6  # one report per chunk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.img", "src.img"]


def test_local_verified_copy_of_an_empty_file(tmp_path):
    src, dst = tmp_path / "empty", tmp_path / "copy"
    src.write_bytes(b"")
    assert _local().put_verified(src, str(dst)) == hashlib.sha256(b"").hexdigest()
    assert dst.read_bytes() == b""


def test_copy_across_filesystems_falls_back_to_sendfile(tmp_path):
    """copy_file_range refuses tmpfs -> this disk (EXDEV) on this kernel; sendfile copies instead."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    src = Path("/dev/shm") / f"corral-test-{os.getpid()}.img"
    try:
        sha = _random_file(src)
        assert _local().put_verified(src, str(tmp_path / "dst.img")) == sha
        assert (tmp_path / "dst.img").read_bytes() == src.read_bytes()
    finally:
        src.unlink(missing_ok=True)


def test_local_copy_in_refuses_a_copy_whose_sha256_differs(tmp_path):
    src = tmp_path / "src.img"
    sha = _random_file(src)
    with src.open("r+b") as fh:  # the file changed since its sha256 was recorded
        fh.seek(SIZE - 1)
        fh.write(bytes([src.read_bytes()[-1] ^ 1]))
    target = tmp_path / "disks" / "base.img"

    with pytest.raises(ImageError, match="checksum mismatch"):
        images.copy_in(_local(), src, str(target), sha256=sha)

    assert list(target.parent.iterdir()) == []  # neither the copy nor a part file


def test_local_cancel_removes_the_part_file(tmp_path):
    src = tmp_path / "src.img"
    sha = _random_file(src)
    target = tmp_path / "disks" / "base.img"

    with pytest.raises(Cancelled):
        images.copy_in(_local(), src, str(target), sha256=sha, progress=_cancel_at_first_report)

    assert list(target.parent.iterdir()) == []


def test_plain_local_copy_and_get(tmp_path):
    src = tmp_path / "src.img"
    _random_file(src)
    local = _local()
    local.put(src, str(tmp_path / "put.img"))
    local.get(str(tmp_path / "put.img"), tmp_path / "got.img")
    assert (tmp_path / "got.img").read_bytes() == src.read_bytes()


# --- a bed server over ssh ---------------------------------------------------------------------

DISKS = "/var/lib/corral/disk1/corral-test-copy"


@pytest.fixture
def remote(bed_servers):
    """A session to the first bed server that copies through the ssh binary, as Corral's targets do."""
    bs = bed_servers[0]
    target = Target(hostname=bs.name, address=bs.address, port=bs.ssh_port, host_key=bs.host_key_public,
                    key_file=bs.client_key, known_hosts=bs.known_hosts, ssh_command=bs.ssh_command,
                    libvirt_uri=bs.uri_tcp)
    with SSHSession(target) as s:
        s.run(["rm", "-rf", DISKS])
        s.run(["mkdir", "-p", DISKS])
        yield s, bs.host_path(DISKS)
        s.run(["rm", "-rf", DISKS])


@pytest.mark.bed
def test_remote_verified_copy_returns_the_sha256_the_server_computed(remote, source):
    s, folder = remote
    src, sha = source
    seen, progress = _recorder()

    assert s.put_verified(src, f"{DISKS}/copy.img", progress) == sha

    assert (folder / "copy.img").read_bytes() == src.read_bytes()
    assert seen[-1] == (SIZE, SIZE) and all(d <= SIZE for d, _ in seen)
    s.put(src, f"{DISKS}/plain.img")  # unverified: the same stream without the hash
    assert (folder / "plain.img").read_bytes() == src.read_bytes()


@pytest.mark.bed
def test_remote_copy_in_refuses_a_copy_whose_sha256_differs(remote, source):
    s, folder = remote

    with pytest.raises(ImageError, match="checksum mismatch"):
        images.copy_in(s, source[0], f"{DISKS}/base.img", sha256=hashlib.sha256(b"something else").hexdigest())

    assert list(folder.iterdir()) == []


@pytest.mark.bed
def test_remote_cancel_kills_ssh_and_leaves_no_file(remote, tmp_path, monkeypatch):
    """A cancel at the first progress report: ssh is killed, and the server's shell, finding its
    file shorter than announced, deletes it; copy_in removes its part file as well."""
    monkeypatch.setattr(session, "PROGRESS_INTERVAL", 0.001)  # report before ssh can have sent it all
    s, folder = remote
    src = tmp_path / "big.img"
    with src.open("wb") as fh:
        fh.truncate(256 << 20)
    children_before = _children()

    with pytest.raises(Cancelled):
        images.copy_in(s, src, f"{DISKS}/base.img", sha256=None, progress=_cancel_at_first_report)

    assert _children() == children_before  # the ssh child is gone (killed and reaped)
    deadline = time.monotonic() + 30  # the server's shell may still be finishing its short file
    while list(folder.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(folder.iterdir()) == []


@pytest.mark.bed
def test_remote_receiver_deletes_a_short_file(remote):
    """The server's side of every streamed copy deletes a file shorter than announced (what a
    cut stream leaves behind) and fails, whoever cleans up after it."""
    s, folder = remote
    r = s.run(["sh", "-c", session._RECEIVE_SH, "receive", f"{DISKS}/short.img", "11"], input="x" * 10,
              check=False)
    assert r.code == 75 and "short file" in r.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.bed
def test_remote_copy_to_a_missing_folder_fails_with_the_servers_message(remote, source):
    s, _ = remote
    with pytest.raises(VmmError, match="nonexistent|No such file"):
        s.put_verified(source[0], f"{DISKS}/no/such/dir/copy.img")


def _children() -> set[int]:
    """Process ids of this process's live children."""
    me = str(os.getpid())
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[1] == me and fields[0] != "Z":
                out.add(int(pid))
    return out

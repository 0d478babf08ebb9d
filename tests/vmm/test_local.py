"""This machine's libvirt daemons (portal/vmm/local.py): a virtlogd that died is started again.

A virtlogd that dies leaves its socket file behind; QEMU then cannot start ("Failed to connect socket
to '/run/libvirt/virtlogd-sock': Connection refused"). Seen for real on a machine where `corral up`
found the file and took it for a running virtlogd.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from portal.vmm import local


def test_a_socket_file_nobody_listens_on_is_not_a_daemon(tmp_path):
    path = tmp_path / "sock"
    assert not local.listening(path)  # no file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        assert not local.listening(path)  # bound, not listening: what a dead daemon leaves
        s.listen(1)
        assert local.listening(path)
    assert path.exists() and not local.listening(path)  # closed: the file stays, nobody answers


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v virtlogd || test -x /usr/sbin/virtlogd"],
                                   capture_output=True).returncode != 0, reason="virtlogd is not installed")
def test_ensure_virtlogd_leaves_one_answering(tmp_path):
    """The real system daemon (root, as the suite runs): whatever state it was in, it answers after."""
    local.ensure_virtlogd()
    assert local.listening(local.VIRTLOGD_SOCKET)
    local.ensure_virtlogd()  # idempotent: a running one is left alone
    pids = subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True, text=True).stdout.split()
    assert local.listening(local.VIRTLOGD_SOCKET) and len(pids) >= 1

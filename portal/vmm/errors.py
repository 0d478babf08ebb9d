"""The exceptions ``portal.vmm`` raises: each says what a manager can do about it."""

from __future__ import annotations


class VmmError(Exception):
    """Something on a VM server did not work."""


class Unreachable(VmmError):
    """The server did not answer (network, address, sshd down)."""


class AuthRefused(VmmError):
    """The server refused the password or Corral's key."""


class HostKeyMismatch(VmmError):
    """The server's SSH host key is not the one pinned when it was added."""

    def __init__(self, host: str, expected: str, got: str):
        self.expected, self.got = expected, got
        super().__init__(
            f"{host} presented SSH host key {got}, but Corral pinned {expected} when the server was added. "
            "Refusing to connect: if the server was reinstalled, delete and re-add it; otherwise investigate."
        )


class LibvirtUnavailable(VmmError):
    """libvirtd is not answering on the server."""


class MountpointMissing(VmmError):
    """A declared VM disk (mountpoint) does not exist or is not writable."""


class CommandFailed(VmmError):
    """A command on the server exited non-zero."""

    def __init__(self, host: str, argv: list[str], code: int, stderr: str):
        self.argv, self.code, self.stderr = argv, code, stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{host}: `{' '.join(argv)}` exited {code}: {tail}")


class CommandTimeout(VmmError):
    """A command on the server ran past its timeout (it was stopped)."""

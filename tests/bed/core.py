"""The multi-server libvirt test bed: real VM servers in namespaces on one machine.

Each server ``i`` (1..N) is:

* network namespace ``corral-bed-<i>``: a veth ``cbed<i>`` (root side) whose
  peer is enslaved to a bridge ``br0`` inside the namespace; ``br0`` holds
  ``10.77.0.(10+i)/24``.  The root side of every veth is enslaved to the root
  namespace bridge ``corralbr0`` (``10.77.0.1/24``).  No default route, no DNS:
  the subnet is internal to the machine.  Guests attached to ``br0`` in any
  server share this L2 segment (address them inside 10.77.0.0/24 with
  ``corral.ip=`` if needed).
* a mount + UTS namespace held open by a ``sleep infinity`` "holder" process
  (started with ``ip netns exec … unshare --mount --uts``): hostname
  ``bed<i>``, private ``/run``, and bind mounts of per-server directories of
  the state dir over ``/etc/libvirt``, ``/var/lib/libvirt``,
  ``/var/log/libvirt``, ``/var/cache/libvirt``, ``/var/lib/corral``,
  ``/etc/hosts``, ``/etc/hostname`` and ``/etc/shadow`` (and the shared
  directory over ``/srv/corral-shared`` with ``shared=True``).
* its own ``sshd`` (port 22 on the server address, host keys per server,
  root key auth through ``AuthorizedKeysFile`` (a per-server bed key file and
  root's own ``~/.ssh/authorized_keys``: ``/root`` is per server too),
  root password auth through the per-server ``/etc/shadow`` copy whose root
  hash is the bed password — the machine's real root password is untouched).
* its own ``libvirtd --listen`` (TCP, no auth, only on the server address;
  unix socket in its private ``/run``, reachable from the root namespace at
  ``<server dir>/run/libvirt/libvirt-sock``), own ``host_uuid``, qemu.conf as
  in DESIGN.md, and a ``dir`` storage pool ``default`` at
  ``/var/lib/libvirt/images``.

Everything lives in the state directory (default ``/tmp/corral-bed`` or
``$CORRAL_BED_DIR``); ``down()`` kills every process of the bed, deletes the
namespaces, veths and bridge, and removes the empty mountpoint directories it
had to create (``/var/lib/libvirt`` etc. when no libvirt package made them).
Keys, host keys, libvirt config and the capabilities cache stay in the state
dir for a fast warm ``up()``; ``down(purge=True)`` deletes the state dir too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path(os.environ.get("CORRAL_BED_DIR", "/tmp/corral-bed"))

BRIDGE = "corralbr0"
BRIDGE_ADDRESS = "10.77.0.1"
PREFIX_LEN = 24
NETNS_PREFIX = "corral-bed-"
VETH_PREFIX = "cbed"
GUEST_BRIDGE = "br0"  #: bridge inside every server namespace for guests
SSH_PORT = 22
LIBVIRT_TCP_PORT = 16509
SHARED_MOUNTPOINT = "/srv/corral-shared"
CORRAL_DIR = "/var/lib/corral"  #: per-server dir for Corral (VM disk mountpoints)
DISK_MOUNTPOINT = "/var/lib/corral/disk1"  #: per-server VM disk mountpoint dir
IMAGES_DIR = "/var/lib/libvirt/images"  #: target of the ``default`` pool

_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
}

# (host path under the server dir, mountpoint inside the server, is_file)
_BIND_DIRS: tuple[tuple[str, str], ...] = (
    ("etc-libvirt", "/etc/libvirt"),
    ("lib-libvirt", "/var/lib/libvirt"),
    ("log-libvirt", "/var/log/libvirt"),
    ("cache-libvirt", "/var/cache/libvirt"),
    ("corral", CORRAL_DIR),
    ("root-home", "/root"),  # root's own ~/.ssh/authorized_keys, where Corral installs its key
)
_BIND_FILES: tuple[tuple[str, str], ...] = (
    ("etc/hosts", "/etc/hosts"),
    ("etc/hostname", "/etc/hostname"),
    ("etc/shadow", "/etc/shadow"),
    ("etc/passwd", "/etc/passwd"),
    ("etc/group", "/etc/group"),
)


class BedError(RuntimeError):
    """The bed could not be brought into the requested state."""


def server_address(index: int) -> str:
    """Address of server *index* (1-based)."""
    if not 1 <= index <= 200:
        raise ValueError("server index must be within 1..200")
    return f"10.77.0.{10 + index}"


def _run(argv: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = 60,
         input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          input=input_text, env=_ENV, stdin=None if input_text is not None
                          else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise BedError(f"{shlex.join(args)} failed ({proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str,
              interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise BedError(f"timed out waiting for {what}")
        time.sleep(interval)


def _tcp_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def _kill_all(pids: Iterable[int], timeout: float = 5.0) -> None:
    pids = [p for p in pids if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _pid_alive(p)]
        if not pids:
            return


# --------------------------------------------------------------------------
# One server
# --------------------------------------------------------------------------


@dataclass
class BedServer:
    """Everything a test needs to reach one bed server (JSON-able via :meth:`to_dict`)."""

    index: int
    name: str
    address: str
    ssh_port: int
    netns: str
    state_dir: str
    client_key: str
    known_hosts: str
    ssh_config: str
    ssh_command: str
    host_key_fingerprint: str
    host_key_public: str
    root_password: str
    host_uuid: str
    uri_ssh: str
    uri_libssh: str
    uri_tcp: str
    uri_unix: str
    images_dir: str
    images_dir_host: str
    disk_dir: str
    disk_dir_host: str
    log_dir_host: str
    shared_dir: str | None
    shared_dir_host: str | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def qemu_log(self, domain: str) -> Path:
        """Host path of libvirt's per-domain log (``/var/log/libvirt/qemu/<name>.log``)."""
        return Path(self.log_dir_host) / "qemu" / f"{domain}.log"

    def host_path(self, path_in_server: str) -> Path:
        """Translate a path inside the server's bind mounts to the host path."""
        server_dir = Path(self.state_dir)
        for sub, mountpoint in _BIND_DIRS:
            if path_in_server == mountpoint or path_in_server.startswith(mountpoint + "/"):
                return server_dir / sub / path_in_server[len(mountpoint):].lstrip("/")
        if self.shared_dir_host and (path_in_server == SHARED_MOUNTPOINT
                                     or path_in_server.startswith(SHARED_MOUNTPOINT + "/")):
            return Path(self.shared_dir_host) / path_in_server[len(SHARED_MOUNTPOINT):].lstrip("/")
        if path_in_server == "/run" or path_in_server.startswith("/run/"):
            return server_dir / "run" / path_in_server[len("/run"):].lstrip("/")
        return Path(path_in_server)


# --------------------------------------------------------------------------
# The bed
# --------------------------------------------------------------------------


class Bed:
    """Create, inspect and tear down the bed.  All methods are idempotent."""

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else DEFAULT_STATE_DIR
        self.ssh_dir = self.state_dir / "ssh"
        self.servers_dir = self.state_dir / "servers"
        self.shared_dir = self.state_dir / "shared"
        self.cache_dir = self.state_dir / "cache"
        self.state_file = self.state_dir / "bed.json"

    # ---------------------------------------------------------------- paths
    def server_dir(self, i: int) -> Path:
        return self.servers_dir / f"bed{i}"

    @property
    def client_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.ssh_dir / "ssh_config"

    @property
    def ssh_wrapper(self) -> Path:
        """``ssh`` wrapper using the bed's config (libvirt's ``command=`` URI param)."""
        return self.ssh_dir / "ssh"

    @property
    def appliance_cache(self) -> Path:
        return self.cache_dir / "appliance"

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    # ---------------------------------------------------------------- public
    def up(self, n: int = 2, shared: bool = False, clean: bool = False) -> list[BedServer]:
        """Bring servers 1..*n* up (start what is missing); return their descriptions.

        Servers with a higher index that are up are taken down.  *clean* wipes
        each server's domains, images, logs and Corral dir first (keys, host
        keys and the capabilities cache are kept).
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        self._preflight()
        state = self._load_state()
        if state.get("shared") != shared and state.get("servers"):
            # The shared bind mount is set up when the namespace is created.
            self.down()
            state = {}
        created = list(state.get("created_dirs", []))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        self._ensure_client_key()
        created += self._ensure_mountpoints(shared)
        if not Path("/run/netns").exists():
            # `ip netns add` creates it and bind-mounts it onto itself; down() undoes both.
            created.append("/run/netns")
        state.update({"servers": n, "shared": shared, "created_dirs": sorted(set(created))})
        self._save_state(state)
        for extra in self._existing_indexes():
            if extra > n:
                self._down_server(extra)
        self._ensure_bridge()
        for i in range(1, n + 1):
            self._prepare_server(i, n, shared, clean)
        self._write_known_hosts(n)
        for i in range(1, n + 1):
            self._ensure_namespace(i, shared)
            self.start_sshd(i)
        # libvirtd: the first one probes QEMU (7-15 s once), the others reuse its cache.
        self._seed_caps_cache(1)
        self.start_libvirtd(1)
        # Probing is lazy: ask for capabilities now so the cache is filled.
        self.virsh(1, "capabilities", timeout=120)
        self._harvest_caps_cache(1)
        for i in range(2, n + 1):
            self._seed_caps_cache(i)
            self.start_libvirtd(i)
        for i in range(1, n + 1):
            self._ensure_pool(i)
        return self.servers()

    def down(self, purge: bool = False) -> None:
        """Stop everything of the bed; *purge* also deletes the state directory."""
        state = self._load_state()
        indexes = set(self._existing_indexes())
        for ns in _netns_list():
            if ns.startswith(NETNS_PREFIX) and ns[len(NETNS_PREFIX):].isdigit():
                indexes.add(int(ns[len(NETNS_PREFIX):]))
        for i in sorted(indexes):
            self._down_server(i)
        if _link_exists(BRIDGE):
            _run(["ip", "link", "del", BRIDGE], check=False)
        for d in sorted(state.get("created_dirs", []), key=len, reverse=True):
            if d == "/run/netns":
                _release_netns_dir()
                continue
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if state:
            state["created_dirs"] = []
            state["servers"] = 0
            if self.state_dir.is_dir():
                self._save_state(state)
        if purge and self.state_dir.is_dir():
            shutil.rmtree(self.state_dir)

    def servers(self) -> list[BedServer]:
        """Descriptions of the configured servers (whether up or not)."""
        state = self._load_state()
        n = int(state.get("servers", 0) or 0)
        return [self.server(i) for i in range(1, n + 1)]

    def server(self, i: int) -> BedServer:
        sdir = self.server_dir(i)
        addr = server_address(i)
        pub = (sdir / "ssh" / "ssh_host_ed25519_key.pub")
        fingerprint = ""
        public = ""
        if pub.is_file():
            public = " ".join(pub.read_text().split()[:2])
            fingerprint = _run(["ssh-keygen", "-l", "-E", "sha256", "-f", pub]).stdout.split()[1]
        state = self._load_state()
        shared = bool(state.get("shared"))
        # Plain qemu+ssh runs the ssh binary, which ignores known_hosts= and
        # (with no_verify=1) writes ~root/.ssh/known_hosts: the wrapper given as
        # command= makes it use the bed's ssh_config/known_hosts instead.
        # qemu+libssh honours keyfile= and known_hosts= itself.
        uri_ssh = (f"qemu+ssh://root@{addr}/system?keyfile={self.client_key}"
                   f"&known_hosts={self.known_hosts}&command={self.ssh_wrapper}&no_tty=1")
        return BedServer(
            index=i, name=f"bed{i}", address=addr, ssh_port=SSH_PORT,
            netns=f"{NETNS_PREFIX}{i}", state_dir=str(sdir),
            client_key=str(self.client_key), known_hosts=str(self.known_hosts),
            ssh_config=str(self.ssh_config), ssh_command=str(self.ssh_wrapper),
            host_key_fingerprint=fingerprint, host_key_public=public,
            root_password=self.root_password(i), host_uuid=self.host_uuid(i),
            uri_ssh=uri_ssh,
            uri_libssh=(f"qemu+libssh://root@{addr}/system?keyfile={self.client_key}"
                        f"&known_hosts={self.known_hosts}&sshauth=privkey"),
            uri_tcp=f"qemu+tcp://{addr}/system",
            uri_unix=f"qemu+unix:///system?socket={sdir}/run/libvirt/libvirt-sock",
            images_dir=IMAGES_DIR, images_dir_host=str(sdir / "lib-libvirt" / "images"),
            disk_dir=DISK_MOUNTPOINT, disk_dir_host=str(sdir / "corral" / "disk1"),
            log_dir_host=str(sdir / "log-libvirt"),
            shared_dir=SHARED_MOUNTPOINT if shared else None,
            shared_dir_host=str(self.shared_dir) if shared else None,
        )

    def status(self) -> dict[str, Any]:
        """What is running: per server holder/sshd/libvirtd pids and reachability."""
        state = self._load_state()
        out: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "bridge": _link_exists(BRIDGE),
            "shared": bool(state.get("shared")),
            "servers": {},
        }
        netns = set(_netns_list())
        configured = set(range(1, int(state.get("servers", 0) or 0) + 1))
        for i in sorted(configured | {int(ns[len(NETNS_PREFIX):])
                        for ns in netns if ns.startswith(NETNS_PREFIX)
                        and ns[len(NETNS_PREFIX):].isdigit()}):
            addr = server_address(i)
            out["servers"][f"bed{i}"] = {
                "address": addr,
                "netns": f"{NETNS_PREFIX}{i}" in netns,
                "holder_pid": self._holder_pid(i),
                "sshd_pid": self.sshd_pid(i),
                "libvirtd_pid": self.libvirtd_pid(i),
                "ssh_port_open": _tcp_open(addr, SSH_PORT) if f"{NETNS_PREFIX}{i}" in netns else False,
                "libvirt_port_open": (_tcp_open(addr, LIBVIRT_TCP_PORT)
                                      if f"{NETNS_PREFIX}{i}" in netns else False),
            }
        return out

    def root_password(self, i: int) -> str:
        """The bed's root password of server *i* (used only inside its namespace)."""
        return f"corral-bed-{i}"

    def host_uuid(self, i: int) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"corral-bed/{i}"))

    # ---------------------------------------------------------------- exec
    def nsenter_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        pid = self._holder_pid(i)
        if pid is None:
            raise BedError(f"bed{i} is not up")
        return ["nsenter", "-t", str(pid), "-n", "-m", "-u", "--", *argv]

    def exec(self, i: int, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
             input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside server *i*'s namespaces; returns the completed process."""
        return _run(self.nsenter_argv(i, list(argv)), check=check, timeout=timeout,
                    input_text=input_text)

    def virsh(self, i: int, *args: str, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``virsh`` against server *i* over its unix socket (from the root namespace)."""
        return _run(["virsh", "-q", "-c", self.server(i).uri_unix, *args], check=check,
                    timeout=timeout)

    def ssh_argv(self, i: int, argv: Sequence[str] = ()) -> list[str]:
        """``ssh`` argv that runs *argv* as root on server *i* with the bed key."""
        cmd = shlex.join(argv) if argv else ""
        return [str(self.ssh_wrapper), f"root@{server_address(i)}", *([cmd] if cmd else [])]

    # ---------------------------------------------------------------- daemons
    def sshd_pid(self, i: int) -> int | None:
        return _read_pid(self.server_dir(i) / "run" / "sshd.pid")

    def libvirtd_pid(self, i: int) -> int | None:
        return _read_pid(self.server_dir(i) / "run" / "libvirtd.pid")

    def start_sshd(self, i: int) -> None:
        if self.sshd_pid(i) is not None and _tcp_open(server_address(i), SSH_PORT):
            return
        cfg = self.server_dir(i) / "ssh" / "sshd_config"
        self.exec(i, ["/usr/sbin/sshd", "-f", str(cfg), "-E",
                      str(self.server_dir(i) / "ssh" / "sshd.log")])
        _wait_for(lambda: _tcp_open(server_address(i), SSH_PORT), 15, f"sshd on bed{i}")

    def stop_sshd(self, i: int) -> None:
        """Stop the listening sshd (existing sessions end too)."""
        pid = self.sshd_pid(i)
        if pid is not None:
            _kill_all([pid])
        # Session processes (children of the listener) share the netns.
        sessions = [p for p in _netns_pids(f"{NETNS_PREFIX}{i}") if _comm(p) == "sshd"]
        _kill_all(sessions)
        with contextlib.suppress(OSError):
            (self.server_dir(i) / "run" / "sshd.pid").unlink()

    def start_libvirtd(self, i: int) -> None:
        if self.libvirtd_pid(i) is not None and _tcp_open(server_address(i), LIBVIRT_TCP_PORT):
            return
        self.exec(i, ["/usr/sbin/libvirtd", "--daemon", "--listen",
                      "--pid-file", "/run/libvirtd.pid",
                      "--config", "/etc/libvirt/libvirtd.conf"])
        sock = self.server_dir(i) / "run" / "libvirt" / "libvirt-sock"
        _wait_for(lambda: sock.exists() and _tcp_open(server_address(i), LIBVIRT_TCP_PORT),
                  60, f"libvirtd on bed{i}")
        # The first API call waits for driver init (capabilities probe).
        self.virsh(i, "uri", timeout=120)

    def stop_libvirtd(self, i: int) -> None:
        """Stop libvirtd (guests keep running, as on a real server)."""
        pid = self.libvirtd_pid(i)
        if pid is not None:
            _kill_all([pid], timeout=15)
        with contextlib.suppress(OSError):
            (self.server_dir(i) / "run" / "libvirtd.pid").unlink()

    def kill_guests(self, i: int) -> None:
        """SIGKILL every QEMU of server *i* (a crash of the guests, not of libvirtd)."""
        _kill_all([p for p in _netns_pids(f"{NETNS_PREFIX}{i}")
                   if _comm(p).startswith("qemu")], timeout=0)

    def crash_server(self, i: int) -> None:
        """Simulate power loss: SIGKILL sshd, libvirtd and guests of server *i*.

        The namespace (and so its address) stays; :meth:`up` or
        :meth:`start_sshd`/:meth:`start_libvirtd` bring it back.
        """
        holder = self._holder_pid(i)
        _kill_all([p for p in _netns_pids(f"{NETNS_PREFIX}{i}") if p != holder], timeout=0)
        for name in ("sshd.pid", "libvirtd.pid"):
            with contextlib.suppress(OSError):
                (self.server_dir(i) / "run" / name).unlink()

    def set_link(self, i: int, up: bool) -> None:
        """Cut (``up=False``) or restore server *i*'s network link (a partition)."""
        _run(["ip", "link", "set", f"{VETH_PREFIX}{i}", "up" if up else "down"])

    # ---------------------------------------------------------------- internals
    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise BedError("the bed needs root (namespaces, bridges, daemons)")
        missing = [t for t in ("ip", "unshare", "nsenter", "sshd", "ssh", "ssh-keygen",
                               "libvirtd", "virsh", "qemu-system-x86_64", "qemu-img",
                               "openssl") if shutil.which(t, path=_ENV["PATH"]) is None]
        if missing:
            raise BedError(f"missing tools {missing}: apt-get install $(cat tests/bed/packages.txt)")

    def _existing_indexes(self) -> list[int]:
        if not self.servers_dir.is_dir():
            return []
        out = []
        for d in self.servers_dir.iterdir():
            if d.name.startswith("bed") and d.name[3:].isdigit():
                out.append(int(d.name[3:]))
        return sorted(out)

    def _holder_pid(self, i: int) -> int | None:
        pid = _read_pid(self.server_dir(i) / "holder.pid")
        if pid is None:
            return None
        # Guard against pid reuse: the holder must be in the server's netns.
        try:
            ns = os.readlink(f"/proc/{pid}/ns/net")
            ref = os.stat(f"/run/netns/{NETNS_PREFIX}{i}")
        except OSError:
            return None
        return pid if ns == f"net:[{ref.st_ino}]" else None

    def _ensure_client_key(self) -> None:
        self.ssh_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.ssh_dir, 0o700)
        if not self.client_key.is_file():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corral-bed",
                  "-f", self.client_key])
        self.ssh_config.write_text(
            "Host *\n"
            f"  IdentityFile {self.client_key}\n"
            "  IdentitiesOnly yes\n"
            "  User root\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  UpdateHostKeys no\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 5\n"
            "  LogLevel ERROR\n")
        self.ssh_wrapper.write_text(
            "#!/bin/sh\n# ssh with the Corral bed's key and known_hosts\n"
            f"exec ssh -F {shlex.quote(str(self.ssh_config))} \"$@\"\n")
        os.chmod(self.ssh_wrapper, 0o755)

    def _ensure_mountpoints(self, shared: bool) -> list[str]:
        created: list[str] = []
        targets = [m for _, m in _BIND_DIRS] + ([SHARED_MOUNTPOINT] if shared else [])
        for target in targets:
            missing: list[str] = []
            p = Path(target)
            while not p.exists():
                missing.append(str(p))
                p = p.parent
            if missing:
                Path(target).mkdir(parents=True, exist_ok=True)
                created += missing
        if shared:
            self.shared_dir.mkdir(parents=True, exist_ok=True)
        return created

    def _ensure_bridge(self) -> None:
        if not _link_exists(BRIDGE):
            _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        addrs = _run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE]).stdout
        if f"{BRIDGE_ADDRESS}/{PREFIX_LEN}" not in addrs:
            _run(["ip", "addr", "add", f"{BRIDGE_ADDRESS}/{PREFIX_LEN}", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])

    def _prepare_server(self, i: int, n: int, shared: bool, clean: bool) -> None:
        sdir = self.server_dir(i)
        addr = server_address(i)
        if clean and self._holder_pid(i) is not None:
            self._down_server(i)
        if clean:
            for sub in ("lib-libvirt", "log-libvirt", "corral", "root-home"):
                shutil.rmtree(sdir / sub, ignore_errors=True)
            for sub in ("qemu", "storage"):
                shutil.rmtree(sdir / "etc-libvirt" / sub, ignore_errors=True)
        for sub, _ in _BIND_DIRS:
            (sdir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("run", "etc", "ssh", "lib-libvirt/images", "corral/disk1", "log-libvirt/qemu",
                    "cache-libvirt/qemu/capabilities"):
            (sdir / sub).mkdir(parents=True, exist_ok=True)
        # Files bind-mounted over /etc: rewrite in place to keep the inode.
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        hosts += "".join(f"{server_address(k)}\tbed{k}\n" for k in range(1, n + 1))
        hosts += f"{BRIDGE_ADDRESS}\tcorral-bed-host\n"
        _write_in_place(sdir / "etc" / "hosts", hosts)
        _write_in_place(sdir / "etc" / "hostname", f"bed{i}\n")
        _write_in_place(sdir / "etc" / "shadow", self._shadow(i))
        passwd, group = _passwd_group()
        _write_in_place(sdir / "etc" / "passwd", passwd)
        _write_in_place(sdir / "etc" / "group", group)
        os.chmod(sdir / "etc" / "shadow", 0o640)
        # sshd
        key = sdir / "ssh" / "ssh_host_ed25519_key"
        if not key.is_file():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"bed{i}", "-f", key])
        shutil.copyfile(self.client_key.with_suffix(".pub"), sdir / "ssh" / "authorized_keys")
        (sdir / "ssh" / "sshd_config").write_text(_SSHD_CONFIG.format(
            addr=addr, port=SSH_PORT, key=key, authorized_keys=sdir / "ssh" / "authorized_keys"))
        # libvirt
        etc = sdir / "etc-libvirt"
        for f in ("libvirt.conf", "libvirt-admin.conf"):
            src = Path("/etc/libvirt") / f
            if src.is_file() and not (etc / f).exists() and not os.path.ismount("/etc/libvirt"):
                shutil.copyfile(src, etc / f)
        (etc / "libvirtd.conf").write_text(_LIBVIRTD_CONF.format(addr=addr,
                                                                 host_uuid=self.host_uuid(i)))
        (etc / "qemu.conf").write_text(_QEMU_CONF.format(addr=addr))
        # The pool definition written by libvirt persists across up/down.

    def _shadow(self, i: int) -> str:
        salt = f"corralbed{i}"
        digest = _run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                      input_text=self.root_password(i) + "\n").stdout.strip()
        lines = []
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields and fields[0] == "root":
                fields[1] = digest
                fields[2] = "19000"
                line = ":".join(fields)
            lines.append(line)
        return "\n".join(lines) + "\n"

    def _write_known_hosts(self, n: int) -> None:
        lines = []
        for i in range(1, n + 1):
            pub = (self.server_dir(i) / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()
            lines.append(f"{server_address(i)},bed{i} {pub[0]} {pub[1]}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def _ensure_namespace(self, i: int, shared: bool) -> None:
        ns = f"{NETNS_PREFIX}{i}"
        veth = f"{VETH_PREFIX}{i}"
        addr = server_address(i)
        if self._holder_pid(i) is not None:
            return
        if ns in _netns_list():
            # Leftover without holder: rebuild from scratch.
            self._down_server(i)
        sdir = self.server_dir(i)
        run = sdir / "run"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        nsip = ["ip", "-n", ns]
        _run([*nsip, "link", "set", "lo", "up"])
        _run([*nsip, "link", "add", GUEST_BRIDGE, "type", "bridge"])
        _run([*nsip, "link", "set", "eth0", "master", GUEST_BRIDGE, "up"])
        _run([*nsip, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", GUEST_BRIDGE])
        _run([*nsip, "link", "set", GUEST_BRIDGE, "up"])
        q = shlex.quote
        script = ["set -e", f"hostname bed{i}", f"mount --bind {q(str(run))} /run",
                  "mkdir -p /run/sshd /run/libvirt /run/lock /run/user"]
        for sub, mountpoint in _BIND_DIRS:
            script.append(f"mount --bind {q(str(sdir / sub))} {q(mountpoint)}")
        for sub, mountpoint in _BIND_FILES:
            script.append(f"mount --bind {q(str(sdir / sub))} {q(mountpoint)}")
        if shared:
            script.append(f"mount --bind {q(str(self.shared_dir))} {SHARED_MOUNTPOINT}")
        ready = sdir / "holder.pid"
        with contextlib.suppress(OSError):
            ready.unlink()
        script.append(f"echo $$ > {q(str(ready))}.tmp && mv {q(str(ready))}.tmp {q(str(ready))}")
        script.append("exec sleep infinity")
        log = open(sdir / "holder.log", "w")
        try:
            subprocess.run(["setsid", "-f", "ip", "netns", "exec", ns,
                            "unshare", "--mount", "--uts", "--propagation", "private", "--",
                            "/bin/sh", "-c", "\n".join(script)],
                           stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_ENV,
                           check=True)
        finally:
            log.close()
        try:
            _wait_for(lambda: self._holder_pid(i) is not None, 10, f"namespace of bed{i}")
        except BedError as exc:
            raise BedError(f"{exc}: {(sdir / 'holder.log').read_text().strip()}") from None

    def _caps_dir(self, i: int) -> Path:
        return self.server_dir(i) / "cache-libvirt" / "qemu" / "capabilities"

    def _harvest_caps_cache(self, i: int) -> None:
        src = self._caps_dir(i)
        dst = self.cache_dir / "qemu-capabilities"
        files = list(src.glob("*.xml"))
        if files:
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, dst / f.name)

    def _seed_caps_cache(self, i: int) -> None:
        src = self.cache_dir / "qemu-capabilities"
        dst = self._caps_dir(i)
        if src.is_dir() and not any(dst.glob("*.xml")):
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.glob("*.xml"):
                shutil.copy2(f, dst / f.name)

    def _ensure_pool(self, i: int) -> None:
        info = self.virsh(i, "pool-info", "default", check=False)
        if info.returncode != 0:
            self.virsh(i, "pool-define-as", "default", "dir", "--target", IMAGES_DIR)
            info = self.virsh(i, "pool-info", "default")
        if "running" not in info.stdout:
            self.virsh(i, "pool-start", "default")
        self.virsh(i, "pool-autostart", "default")

    def _down_server(self, i: int) -> None:
        ns = f"{NETNS_PREFIX}{i}"
        veth = f"{VETH_PREFIX}{i}"
        # libvirtd first, gently, so it does not log a storm about vanished guests.
        if self._holder_pid(i) is not None:
            self.stop_libvirtd(i)
        pids = set(_netns_pids(ns)) if ns in _netns_list() else set()
        holder = _read_pid(self.server_dir(i) / "holder.pid")
        if holder is not None and _in_netns(holder, ns):
            pids.add(holder)
        _kill_all(sorted(pids), timeout=3)
        if ns in _netns_list():
            _run(["ip", "netns", "del", ns], check=False)
        if _link_exists(veth):
            _run(["ip", "link", "del", veth], check=False)
        run = self.server_dir(i) / "run"
        if run.is_dir():
            shutil.rmtree(run, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.server_dir(i) / "holder.pid").unlink()


def _release_netns_dir() -> None:
    """Unmount and remove /run/netns if it is empty (created by the bed's ``ip netns add``)."""
    path = Path("/run/netns")
    with contextlib.suppress(OSError):
        if any(path.iterdir()):
            return
    for _ in range(8):
        # os.path.ismount cannot see a bind mount of a directory onto itself.
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        if not any(line.split()[4] == str(path) for line in mountinfo):
            break
        if _run(["umount", str(path)], check=False).returncode != 0:
            return
    with contextlib.suppress(OSError):
        path.rmdir()


def _in_netns(pid: int, ns: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
    except OSError:
        return False


def _passwd_group() -> tuple[str, str]:
    """Host /etc/passwd and /etc/group plus the ``libvirt-qemu`` user libvirtd needs.

    Debian's libvirtd resolves its compiled-in QEMU user before reading
    qemu.conf; without libvirt-daemon-system that user does not exist.  The bed
    adds it to per-server copies instead of changing the machine's files.
    """
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    names = {line.split(":")[0] for line in passwd.splitlines()}
    groups = {line.split(":")[0] for line in group.splitlines()}
    if not passwd.endswith("\n"):
        passwd += "\n"
    if not group.endswith("\n"):
        group += "\n"
    if "kvm" not in groups:
        group += "kvm:x:64054:\n"
    if "libvirt-qemu" not in groups:
        group += "libvirt-qemu:x:64055:\n"
    if "libvirt" not in groups:
        group += "libvirt:x:64056:\n"
    if "libvirt-qemu" not in names:
        passwd += "libvirt-qemu:x:64055:64055:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n"
    return passwd, group


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _write_in_place(path: Path, text: str) -> None:
    with open(path, "a+") as fh:
        fh.seek(0)
        if fh.read() == text:
            return
        fh.seek(0)
        fh.truncate()
        fh.write(text)


def bed_processes() -> list[int]:
    """PIDs of processes living in any bed namespace (for leak checks)."""
    pids: list[int] = []
    for ns in _netns_list():
        if ns.startswith(NETNS_PREFIX):
            pids += _netns_pids(ns)
    return pids


_SSHD_CONFIG = """# Corral test bed sshd (one per server namespace)
ListenAddress {addr}
Port {port}
HostKey {key}
PidFile /run/sshd.pid
AuthorizedKeysFile {authorized_keys} .ssh/authorized_keys
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM yes
StrictModes no
UseDNS no
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
"""

_LIBVIRTD_CONF = """# Corral test bed libvirtd
listen_tls = 0
listen_tcp = 1
listen_addr = "{addr}"
auth_tcp = "none"
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
host_uuid = "{host_uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

_QEMU_CONF = """# Corral test bed qemu.conf
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
migration_address = "{addr}"
migration_host = "{addr}"
vnc_listen = "0.0.0.0"
spice_listen = "0.0.0.0"
"""

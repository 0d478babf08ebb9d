"""The tiny test appliance: a bootable disk (and ISO) made from Debian packages.

The guest is Debian's ``linux-image-cloud-amd64`` kernel plus a busybox-static
initramfs whose ``/init`` (see :data:`INIT_SCRIPT`):

* loads the virtio modules (they are ``=m`` in that kernel) and the ACPI power
  button + evdev modules, copied from ``/lib/modules`` with their dependencies
  resolved through ``modules.dep``;
* reads ``corral.name=`` and ``corral.ip=`` settings from the kernel command
  line or from SMBIOS OEM strings (libvirt ``<sysinfo type='smbios'><oemStrings>
  <entry>corral.ip=10.77.0.101/24</entry></oemStrings>``);
* names itself from ``corral.name=NAME``, else the
  SMBIOS system serial (libvirt ``<sysinfo type='smbios'><system><entry
  name='serial'>NAME</entry>`` with ``<smbios mode='sysinfo'/>``), else
  ``corral-<first 8 hex digits of the SMBIOS UUID>`` (the libvirt domain UUID);
* brings ``eth0`` up (address only if ``corral.ip=ADDR/PREFIX`` is given, in
  which case it also serves ``http://ADDR/`` with busybox httpd);
* prints :data:`INFO_MARKER` and :data:`READY_MARKER` lines on the serial
  console (ttyS0), then every :data:`HEARTBEAT_INTERVAL_S` seconds writes
  ``CORRAL-HB <n> <name>`` into one sector of ``/dev/vda`` at byte offset
  :data:`HEARTBEAT_OFFSET` (``conv=fsync``: the write is flushed to the virtual
  disk) and *then* prints ``CORRAL-HB <n>`` on serial.  So every heartbeat
  seen on serial is durably on the disk: a data-loss check compares the last
  serial heartbeat with :func:`read_disk_heartbeat` of the (copied / failed
  over) disk.  After a reboot the counter continues from the disk's value;
* when the OEM strings carry ``corral.seed=cidata`` (a NoCloud seed CD-ROM is attached, see
  :mod:`portal.vmm.seed`): loads the IDE CD-ROM and ISO 9660 modules (:data:`SEED_MODULES`),
  mounts the CD and prints ``CORRAL-ATTR key=value`` for each ``corral_*`` attribute of its
  ``user-data`` (:data:`ATTR_MARKER`); without it nothing of this runs;
* runs an interactive busybox shell on ``ttyS0`` (respawned when it exits), so the
  web console's serial terminal answers typed commands;
* on an ACPI power-button press (``virsh shutdown``) finishes the current
  heartbeat, prints ``CORRAL-SHUTDOWN <name> <last n>``, syncs and powers off
  (the domain XML needs ``<features><acpi/></features>``).

The disk is built without loop devices or mounts (``sfdisk`` on a file,
``mkfs.fat -C``, ``mcopy``, ``syslinux --install`` on the partition image,
copied into place, ``qemu-img convert``) under ``faketime`` so that the same
inputs give the same bytes.  Results are cached by a fingerprint of all inputs.

Guests must use a virtio disk (``vda``) and virtio NIC: the cloud kernel has
no e1000/rtl8139 drivers, and only ``/dev/vda`` gets the disk heartbeat.  The
ISO is only read by the BIOS and ISOLINUX; once the kernel and initramfs are
loaded the guest needs nothing from it, so any CD-ROM bus works.

Command line: ``python -m portal.vmm.appliance [--cache DIR] [--iso]
[--detect]`` prints the built path (or the detected domain type).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "APPLIANCE_VERSION",
    "ATTR_MARKER",
    "DEFAULT_CACHE_DIR",
    "DISK_SIZE",
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_MARKER",
    "HEARTBEAT_OFFSET",
    "HEARTBEAT_SECTOR",
    "INFO_MARKER",
    "READY_MARKER",
    "SHUTDOWN_MARKER",
    "ApplianceError",
    "build_appliance",
    "build_iso",
    "parse_serial_log",
    "read_disk_heartbeat",
]

# --------------------------------------------------------------------------
# Public constants
# --------------------------------------------------------------------------

#: Bump to force a rebuild when the recipe changes in a way the fingerprint
#: cannot see (the fingerprint already covers this file's source).
APPLIANCE_VERSION = 1

#: Serial line printed once the guest is up: ``CORRAL-READY <name>``.
READY_MARKER = "CORRAL-READY"
#: Serial line printed just before READY: ``CORRAL-INFO name=.. uuid=.. mac=.. disk=.. start=..``.
INFO_MARKER = "CORRAL-INFO"
#: Serial heartbeat line ``CORRAL-HB <n>``; the same counter goes to the disk.
HEARTBEAT_MARKER = "CORRAL-HB"
#: Serial line printed when the ACPI power button was pressed.
SHUTDOWN_MARKER = "CORRAL-SHUTDOWN"
#: Serial line printed for each ``corral_*`` attribute found on a NoCloud seed CD-ROM: ``CORRAL-ATTR key=value``.
ATTR_MARKER = "CORRAL-ATTR"
#: Serial line printed when a seed CD-ROM was read: ``CORRAL-SEED /dev/srN``.
SEED_MARKER = "CORRAL-SEED"
#: Seconds between heartbeats (the guest sleeps this long between beats).
HEARTBEAT_INTERVAL_S = 0.1

#: Sector size used by the heartbeat write.
SECTOR_SIZE = 512
#: Sector of /dev/vda holding the heartbeat record.  It lies in the gap between
#: the MBR (sector 0) and the first partition (sector 2048), which no boot
#: code uses.  On a blank disk booted from the ISO the same sector is used.
HEARTBEAT_SECTOR = 1024
#: Byte offset of the heartbeat record (512 KiB).
HEARTBEAT_OFFSET = HEARTBEAT_SECTOR * SECTOR_SIZE

#: Virtual size of the appliance disk.
DISK_SIZE = 32 * 1024 * 1024
#: First sector of the FAT boot partition.
PARTITION_START_SECTOR = 2048

#: Default cache for built artefacts (used by the CLI).
DEFAULT_CACHE_DIR = Path(os.environ.get("CORRAL_APPLIANCE_CACHE", "/var/cache/corral-appliance"))

#: Frozen clock for reproducible FAT/ISO timestamps (libfaketime absolute form).
FAKETIME_STAMP = "2024-01-01 00:00:00"
SOURCE_DATE_EPOCH = 1704067200  # the same instant

#: Kernel modules the guest loads (dependencies are added from modules.dep).
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "button",
    "evdev",
)

#: Loaded only when the SMBIOS OEM string ``corral.seed=cidata`` says a seed CD-ROM is attached (IDE CD-ROM, ISO 9660).
SEED_MODULES: tuple[str, ...] = ("ata_piix", "sr_mod", "isofs")

KERNEL_CMDLINE = "console=ttyS0,115200 quiet loglevel=3"

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
SYSLINUX_BIOS_DIR = Path("/usr/lib/syslinux/modules/bios")
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")

# --------------------------------------------------------------------------
# The guest's /init
# --------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/busybox sh
# Corral test appliance init (generated by portal/vmm/appliance.py).
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /www
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

for m in $(cat /etc/corral/modules); do insmod "/lib/modules/$m" 2>/dev/null; done

name=""
ip=""
interval=@HEARTBEAT_INTERVAL_S@
seed=""
oem="$(cat /sys/firmware/dmi/entries/11-*/raw 2>/dev/null | strings -n 3 | grep '^corral\.')"
for arg in $(cat /proc/cmdline) $oem; do
  case "$arg" in
    corral.name=*) name="${arg#corral.name=}" ;;
    corral.ip=*) ip="${arg#corral.ip=}" ;;
    corral.interval=*) interval="${arg#corral.interval=}" ;;
    corral.seed=*) seed="${arg#corral.seed=}" ;;
  esac
done
uuid="$(cat /sys/class/dmi/id/product_uuid 2>/dev/null)"
if [ -z "$name" ]; then
  serial="$(cat /sys/class/dmi/id/product_serial 2>/dev/null | tr -cd 'A-Za-z0-9._-')"
  case "$serial" in
    ''|NotSpecified|None|Default*|0) ;;
    *) name="$serial" ;;
  esac
fi
[ -n "$name" ] || name="corral-${uuid%%-*}"
[ "$name" != "corral-" ] || name="corral"
hostname "$name"

i=0
while [ ! -b /dev/vda ] && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done

ip link set lo up
mac=""
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  mac="$(cat /sys/class/net/eth0/address)"
  if [ -n "$ip" ]; then
    ip addr add "$ip" dev eth0
    echo "$name" > /www/index.html
    httpd -p 80 -h /www
  fi
fi

disk=""
n=0
if [ -b /dev/vda ]; then
  disk=/dev/vda
  prev="$(dd if=/dev/vda bs=@SECTOR_SIZE@ skip=@HEARTBEAT_SECTOR@ count=1 2>/dev/null | head -c 64 | tr -d '\000' | head -n 1)"
  case "$prev" in
    "@HEARTBEAT_MARKER@ "*)
      prev="${prev#@HEARTBEAT_MARKER@ }"
      prev="${prev%% *}"
      case "$prev" in *[!0-9]*|'') ;; *) n=$prev ;; esac ;;
  esac
fi

for d in /sys/class/input/input*; do
  [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ] || continue
  for e in "$d"/event*; do
    [ -e "$e" ] || continue
    ev="/dev/input/${e##*/}"
    ( dd if="$ev" bs=24 count=1 >/dev/null 2>&1; : > /tmp/corral-shutdown ) &
  done
done

# A NoCloud seed CD-ROM (attached when the OEM strings say so): print its corral_* attributes.
if [ -n "$seed" ]; then
  for m in $(cat /etc/corral/seed-modules); do insmod "/lib/modules/$m" 2>/dev/null; done
  mkdir -p /mnt/seed
  i=0
  while [ -z "$(ls /dev/sr* 2>/dev/null)" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  for cd in /dev/sr*; do
    [ -b "$cd" ] || continue
    mount -t iso9660 -o ro "$cd" /mnt/seed 2>/dev/null || continue
    if [ -f /mnt/seed/user-data ]; then
      echo "@SEED_MARKER@ $cd"
      sed -n '/^    content: |$/,$p' /mnt/seed/user-data | sed '1d; s/^      //' > /tmp/corral-attrs
      keys="$(sed -n 's/^\(corral_[A-Za-z0-9_]*\)=.*/\1/p' /tmp/corral-attrs)"
      ( . /tmp/corral-attrs; for k in $keys; do eval "v=\"\$$k\""; echo "@ATTR_MARKER@ $k=$v"; done )
      umount /mnt/seed
      break
    fi
    umount /mnt/seed
  done
fi

echo "@INFO_MARKER@ name=$name uuid=$uuid mac=$mac disk=$disk start=$n"
echo "@READY_MARKER@ $name"
# An interactive shell on the serial console (the web console's terminal), respawned when it exits.
# Its prompt may precede a marker on the same serial line; parse_serial_log allows for that.
if [ -c /dev/ttyS0 ]; then
  ( while [ ! -e /tmp/corral-shutdown ]; do setsid -c sh </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 1; done ) &
fi
while [ ! -e /tmp/corral-shutdown ]; do
  n=$((n+1))
  if [ -n "$disk" ]; then
    printf '@HEARTBEAT_MARKER@ %d %s\n' "$n" "$name" | dd of="$disk" bs=@SECTOR_SIZE@ seek=@HEARTBEAT_SECTOR@ count=1 conv=sync,notrunc,fsync 2>/dev/null
  fi
  echo "@HEARTBEAT_MARKER@ $n"
  [ "$interval" = 0 ] || sleep "$interval"
done
echo "@SHUTDOWN_MARKER@ $name $n"
sync
poweroff -f
"""


def render_init_script() -> str:
    """Return :data:`INIT_SCRIPT` with the module constants filled in."""
    values = {
        "SECTOR_SIZE": str(SECTOR_SIZE),
        "HEARTBEAT_SECTOR": str(HEARTBEAT_SECTOR),
        "HEARTBEAT_MARKER": HEARTBEAT_MARKER,
        "SHUTDOWN_MARKER": SHUTDOWN_MARKER,
        "INFO_MARKER": INFO_MARKER,
        "READY_MARKER": READY_MARKER,
        "HEARTBEAT_INTERVAL_S": f"{HEARTBEAT_INTERVAL_S:g}",
        "ATTR_MARKER": ATTR_MARKER,
        "SEED_MARKER": SEED_MARKER,
    }
    text = INIT_SCRIPT
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


# --------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------


class ApplianceError(RuntimeError):
    """The appliance could not be built (missing package, tool failure)."""


def _run(argv: Sequence[str | os.PathLike[str]], *, env: dict[str, str] | None = None,
         input_text: str | None = None) -> str:
    args = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(args, env=env, input=input_text, capture_output=True,
                              text=True, check=False)
    except FileNotFoundError as exc:
        raise ApplianceError(f"{args[0]} not found (see tests/bed/packages.txt)") from exc
    if proc.returncode != 0:
        raise ApplianceError(f"{' '.join(args)} failed ({proc.returncode}): "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _faketime_env() -> dict[str, str]:
    env = dict(os.environ)
    env["SOURCE_DATE_EPOCH"] = str(SOURCE_DATE_EPOCH)
    env["TZ"] = "UTC"
    return env


def _faketime(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Wrap *argv* so it sees a frozen wall clock (``faketime -f``)."""
    if shutil.which("faketime") is None:
        raise ApplianceError("faketime not found (package faketime)")
    return ["faketime", "-f", FAKETIME_STAMP, *[os.fspath(a) for a in argv]]


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _version_key(text: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Host files the appliance is made from."""

    kernel: Path
    modules_dir: Path
    busybox: Path

    @property
    def release(self) -> str:
        return self.modules_dir.name


def find_inputs() -> Inputs:
    """Locate the newest installed cloud kernel, its modules and busybox."""
    candidates = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"),
                        key=lambda p: _version_key(p.name))
    for kernel in reversed(candidates):
        release = kernel.name[len("vmlinuz-"):]
        modules_dir = Path("/lib/modules") / release
        if (modules_dir / "modules.dep").is_file():
            break
    else:
        raise ApplianceError("no /boot/vmlinuz-*-cloud-amd64 with modules "
                             "(install linux-image-cloud-amd64)")
    for busybox in BUSYBOX_CANDIDATES:
        if busybox.is_file():
            break
    else:
        raise ApplianceError("busybox not found (install busybox-static)")
    return Inputs(kernel=kernel, modules_dir=modules_dir, busybox=busybox)


def resolve_modules(modules_dir: Path, names: Sequence[str] = GUEST_MODULES) -> list[str]:
    """Return module paths (relative to *modules_dir*) in load order."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        base = Path(mod).name.split(".ko")[0].replace("-", "_")
        by_name[base] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        # modules.dep lists the full (transitive) dependency set, deepest last.
        for dep in reversed(deps.get(mod, [])):
            visit(dep)
        order.append(mod)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            # Built into the kernel (=y): nothing to load.
            builtin = (modules_dir / "modules.builtin")
            if builtin.is_file() and any(
                    Path(entry).name.split(".ko")[0].replace("-", "_") == key
                    for entry in builtin.read_text().split()):
                continue
            raise ApplianceError(f"kernel module {name} not found in {modules_dir}")
        visit(by_name[key])
    return order


def _module_bytes(path: Path) -> bytes:
    """Read a module, decompressing ``.ko.xz`` / ``.ko.zst`` / ``.ko.gz``."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise ApplianceError(f"zstd -d {path} failed (install zstd)")
        return proc.stdout
    return data


def _plain_module_name(rel: str) -> str:
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", ".ko", Path(rel).name)


# --------------------------------------------------------------------------
# initramfs (newc cpio written here, deterministic)
# --------------------------------------------------------------------------


class _Cpio:
    """Minimal ``newc`` cpio writer with fixed owners and times."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
            len(encoded), 0))
        self._ino += 1
        self._buf.write(header.encode() + encoded)
        self._buf.write(b"\0" * (-(110 + len(encoded)) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def build_initramfs(inputs: Inputs) -> bytes:
    """Return the gzip-compressed initramfs for *inputs* (deterministic)."""
    cpio = _Cpio()
    for d in ("bin", "dev", "etc", "etc/corral", "lib", "lib/modules", "proc", "sys",
              "tmp", "sbin", "usr", "usr/bin", "usr/sbin", "www"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", inputs.busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    names: list[str] = []
    for rel in resolve_modules(inputs.modules_dir):
        plain = _plain_module_name(rel)
        cpio.file(f"lib/modules/{plain}", _module_bytes(inputs.modules_dir / rel))
        names.append(plain)
    cpio.file("etc/corral/modules", ("\n".join(names) + "\n").encode())
    seed_names: list[str] = []
    for rel in resolve_modules(inputs.modules_dir, SEED_MODULES):
        plain = _plain_module_name(rel)
        if plain not in names:
            cpio.file(f"lib/modules/{plain}", _module_bytes(inputs.modules_dir / rel))
            names.append(plain)
            seed_names.append(plain)
    cpio.file("etc/corral/seed-modules", ("\n".join(seed_names) + "\n").encode())
    cpio.file("etc/hostname", b"corral\n")
    cpio.file("init", render_init_script().encode(), 0o755)
    raw = cpio.finish()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return out.getvalue()


# --------------------------------------------------------------------------
# Fingerprint and cache
# --------------------------------------------------------------------------


def _fingerprint(inputs: Inputs, kind: str) -> str:
    h = hashlib.sha256()
    h.update(f"{kind}:{APPLIANCE_VERSION}:{KERNEL_CMDLINE}:{DISK_SIZE}\n".encode())
    h.update(Path(__file__).read_bytes())
    files = [inputs.kernel, inputs.busybox, inputs.modules_dir / "modules.dep"]
    files += [inputs.modules_dir / rel for rel in resolve_modules(inputs.modules_dir)]
    files += [inputs.modules_dir / rel for rel in resolve_modules(inputs.modules_dir, SEED_MODULES)]
    if kind == "disk":
        files += [SYSLINUX_MBR, SYSLINUX_BIOS_DIR / "ldlinux.c32"]
    else:
        files += [ISOLINUX_BIN, SYSLINUX_BIOS_DIR / "ldlinux.c32"]
    for f in files:
        h.update(f"{f}\n".encode())
        if f.is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _cached(cache_dir: Path, prefix: str, suffix: str, fingerprint: str,
            build: Callable[[Path], None]) -> Path:
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{prefix}-{fingerprint[:16]}{suffix}"
    if target.is_file():
        return target
    with _locked(cache_dir):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(prefix=f".{prefix}-", dir=cache_dir) as tmp:
            out = Path(tmp) / f"out{suffix}"
            build(out)
            os.chmod(out, 0o644)
            os.replace(out, target)
        (cache_dir / f"{prefix}{suffix}.json").write_text(json.dumps(
            {"path": str(target), "fingerprint": fingerprint}, indent=2) + "\n")
    return target


# --------------------------------------------------------------------------
# Disk
# --------------------------------------------------------------------------

_SYSLINUX_CFG = """DEFAULT corral
PROMPT 0
TIMEOUT 0
LABEL corral
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND {cmdline}
"""


def _build_disk(inputs: Inputs, out: Path) -> None:
    work = out.parent
    initrd = work / "initrd.gz"
    initrd.write_bytes(build_initramfs(inputs))
    cfg = work / "syslinux.cfg"
    cfg.write_text(_SYSLINUX_CFG.format(cmdline=KERNEL_CMDLINE))

    part_sectors = DISK_SIZE // SECTOR_SIZE - PARTITION_START_SECTOR
    part = work / "part.img"
    env = _faketime_env()
    _run(_faketime(["mkfs.fat", "--invariant", "-i", "434f5252", "-n", "CORRAL",
                    "-C", part, str(part_sectors * SECTOR_SIZE // 1024)]), env=env)
    mtools_env = dict(env, MTOOLS_SKIP_CHECK="1")
    for src, dst in ((inputs.kernel, "vmlinuz"), (initrd, "initrd.gz"), (cfg, "syslinux.cfg")):
        _run(_faketime(["mcopy", "-o", "-i", part, src, f"::/{dst}"]), env=mtools_env)
    _run(_faketime(["syslinux", "--install", part]), env=mtools_env)

    disk = work / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate(DISK_SIZE)
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", disk],
         input_text=(f"label: dos\nlabel-id: 0x434f5252\n"
                     f"start={PARTITION_START_SECTOR}, type=6, bootable\n"))
    mbr = SYSLINUX_MBR.read_bytes()[:440]
    with open(disk, "r+b") as fh:
        fh.seek(0)
        fh.write(mbr)
        fh.seek(PARTITION_START_SECTOR * SECTOR_SIZE)
        with open(part, "rb") as src_fh:
            shutil.copyfileobj(src_fh, fh, 1 << 20)
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, out])


def build_appliance(cache_dir: Path) -> Path:
    """Return the cached appliance qcow2 in *cache_dir*, building it if needed.

    The file name carries a fingerprint of every input (kernel, modules,
    busybox, syslinux, this module's source): a changed input builds a new
    file; an unchanged one is reused.  The result is written to a temporary
    file in *cache_dir* and renamed into place, under a lock.
    """
    inputs = find_inputs()
    fp = _fingerprint(inputs, "disk")
    return _cached(Path(cache_dir), "appliance", ".qcow2", fp,
                   lambda out: _build_disk(inputs, out))


# --------------------------------------------------------------------------
# ISO
# --------------------------------------------------------------------------


def _build_iso(inputs: Inputs, out: Path) -> None:
    tree = out.parent / "iso"
    (tree / "isolinux").mkdir(parents=True)
    shutil.copyfile(ISOLINUX_BIN, tree / "isolinux" / "isolinux.bin")
    shutil.copyfile(SYSLINUX_BIOS_DIR / "ldlinux.c32", tree / "isolinux" / "ldlinux.c32")
    (tree / "isolinux" / "isolinux.cfg").write_text(_SYSLINUX_CFG.format(cmdline=KERNEL_CMDLINE))
    shutil.copyfile(inputs.kernel, tree / "vmlinuz")
    (tree / "initrd.gz").write_bytes(build_initramfs(inputs))
    for p in sorted(tree.rglob("*")):
        os.utime(p, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    os.utime(tree, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    _run(_faketime(["xorriso", "-as", "mkisofs", "-quiet", "-o", out,
                    "-V", "CORRAL", "-J", "-R",
                    "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
                    "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
                    tree]), env=_faketime_env())


def build_iso(cache_dir: Path) -> Path:
    """Return a cached bootable ISO (isolinux) booting the same kernel/initramfs."""
    inputs = find_inputs()
    fp = _fingerprint(inputs, "iso")
    return _cached(Path(cache_dir), "appliance", ".iso", fp,
                   lambda out: _build_iso(inputs, out))


# --------------------------------------------------------------------------
# Reading what the guest wrote
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SerialState:
    """What a serial log says about one boot of the appliance."""

    ready: bool
    name: str | None
    heartbeats: list[int]
    shutdown: bool

    @property
    def last_heartbeat(self) -> int | None:
        return self.heartbeats[-1] if self.heartbeats else None


#: The serial shell's prompt (``/ # ``, ``~ # ``) and terminal queries (``ESC[6n``), written
#: before the next line's marker.
_SHELL_PROMPT = re.compile(r"^(?:\S* # )+")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def parse_serial_log(text: str) -> SerialState:
    """Parse a serial console log (all boots in it; READY/name from the last).

    Only complete lines count: a log cut mid-line (a migration's switchover,
    a crash) must not turn ``CORRAL-HB 64`` into heartbeat 6.
    """
    ready = False
    name: str | None = None
    beats: list[int] = []
    shutdown = False
    lines = text.split("\n")[:-1]  # the part after the last newline is incomplete
    for line in lines:
        line = _SHELL_PROMPT.sub("", _ANSI.sub("", line).strip("\r\x00 "))
        if line.startswith(READY_MARKER + " "):
            ready = True
            name = line[len(READY_MARKER) + 1:].strip()
        elif line.startswith(HEARTBEAT_MARKER + " "):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                beats.append(int(parts[1]))
        elif line.startswith(SHUTDOWN_MARKER):
            shutdown = True
    return SerialState(ready=ready, name=name, heartbeats=beats, shutdown=shutdown)


def _parse_heartbeat_record(data: bytes) -> int | None:
    text = data.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    parts = text.split()
    if len(parts) >= 2 and parts[0] == HEARTBEAT_MARKER and parts[1].isdigit():
        return int(parts[1])
    return None


def read_disk_heartbeat(image: Path, fmt: str | None = None) -> int | None:
    """Return the heartbeat counter stored in *image* (qcow2 or raw), or None.

    Works on an image a running QEMU holds open (``qemu-io -U``, read-only).
    """
    image = Path(image)
    if fmt is None:
        with open(image, "rb") as fh:
            fmt = "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"
    if fmt == "raw":
        with open(image, "rb") as fh:
            fh.seek(HEARTBEAT_OFFSET)
            return _parse_heartbeat_record(fh.read(SECTOR_SIZE))
    out = _run(["qemu-io", "-U", "-r", "-f", fmt, "-c",
                f"read -v {HEARTBEAT_OFFSET} {SECTOR_SIZE}", image])
    data = bytearray()
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2}\s)+)", line)
        if m:
            data.extend(bytes.fromhex(m.group(1).replace(" ", "")))
    return _parse_heartbeat_record(bytes(data))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal.vmm.appliance",
                                     description="Build the Corral test appliance.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"cache directory (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--iso", action="store_true", help="build the ISO instead of the disk")
    parser.add_argument("--detect", action="store_true",
                        help="print the usable libvirt domain type (kvm or qemu)")
    args = parser.parse_args(argv)
    try:
        if args.detect:
            from .detect import local_domain_type  # noqa: PLC0415 (detect imports this module)

            print(local_domain_type(args.cache))
        elif args.iso:
            print(build_iso(args.cache))
        else:
            print(build_appliance(args.cache))
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Typed SQLAlchemy 2 models for the whole of Corral.

Constraints live in the database (unique names and MACs, foreign keys, check
constraints on enumerations), not only in forms. Schema changes go through
Alembic migrations in ``portal/migrations``.
"""

from __future__ import annotations

import enum
import json
from datetime import datetime, timezone

from flask_login import UserMixin
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from .extensions import db


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops tzinfo)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def _values(enum_cls: type[enum.Enum]) -> str:
    return ", ".join(f"'{m.value}'" for m in enum_cls)


def enum_check(column: str, enum_cls: type[enum.Enum], name: str) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({_values(enum_cls)})", name=name)


class Role(str, enum.Enum):
    MANAGER = "manager"
    POWER = "power"
    REGULAR = "regular"

    @property
    def label(self) -> str:
        return {"manager": "Manager", "power": "Power user", "regular": "Regular user"}[self.value]


class ServerStatus(str, enum.Enum):
    UP = "up"
    DOWN = "down"
    MARKED_DOWN = "marked_down"

    @property
    def label(self) -> str:
        return {"up": "up", "down": "down", "marked_down": "marked down"}[self.value]


class VMState(str, enum.Enum):
    CREATING = "creating"
    PARTIAL = "partial"  # creation failed or was interrupted
    OFF = "off"
    RUNNING = "running"
    PAUSED = "paused"
    SAVED = "saved"
    CRASHED = "crashed"
    MIGRATING = "migrating"
    DELETING = "deleting"
    UNKNOWN = "unknown"

    @property
    def label(self) -> str:
        return "partially created" if self is VMState.PARTIAL else self.value


class ApplianceState(str, enum.Enum):
    IMPORTING = "importing"  # rows exist only inside the transaction that adds the appliance
    READY = "ready"
    FAILED = "failed"


class BackupMode(str, enum.Enum):
    NONE = "none"
    LIVESYNC = "livesync"
    LIVESYNC_FAILOVER = "livesync_failover"


class DiskBus(str, enum.Enum):
    IDE = "ide"
    SCSI = "scsi"
    VIRTIO = "virtio"


class NetworkKind(str, enum.Enum):
    BRIDGED = "bridged"
    NAT = "nat"
    ISOLATED = "isolated"


class TaskState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


ACTIVE_TASK_STATES = (TaskState.QUEUED.value, TaskState.RUNNING.value)


class User(UserMixin, db.Model):
    __tablename__ = "users"
    __table_args__ = (enum_check("role", Role, "role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(254))
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default=Role.REGULAR.value)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    max_vms: Mapped[int] = mapped_column(Integer, default=0)
    max_memory_mb: Mapped[int] = mapped_column(Integer, default=0)
    max_disk_gb: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped on password change so other sessions of the user are logged out;
    # also locked by quota reservations to serialise them per user.
    session_version: Mapped[int] = mapped_column(Integer, default=1)
    quota_serial: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    vms: Mapped[list[VM]] = relationship(back_populates="owner")

    @property
    def role_enum(self) -> Role:
        return Role(self.role)

    @property
    def is_manager(self) -> bool:
        return self.role == Role.MANAGER.value

    @property
    def is_power(self) -> bool:
        return self.role == Role.POWER.value

    @property
    def is_active(self) -> bool:  # flask-login: disabled users cannot log in
        return not self.disabled

    def get_id(self) -> str:
        return f"{self.id}:{self.session_version}"

    def __repr__(self) -> str:
        return f"<User {self.username} {self.role}>"


class Server(db.Model):
    """A physical VM server running libvirt."""

    __tablename__ = "servers"
    __table_args__ = (
        enum_check("status", ServerStatus, "status"),
        CheckConstraint("transport IN ('ssh', 'local', 'test')", name="transport"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), unique=True)
    address: Mapped[str] = mapped_column(String(255))
    transport: Mapped[str] = mapped_column(String(8), default="ssh")
    ssh_port: Mapped[int] = mapped_column(Integer, default=22)
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    cores_per_cpu: Mapped[int] = mapped_column(Integer, default=0)
    hyperthreading: Mapped[bool] = mapped_column(Boolean, default=False)
    memory_mb: Mapped[int] = mapped_column(Integer, default=0)
    free_memory_mb: Mapped[int | None] = mapped_column(Integer)
    nics: Mapped[int] = mapped_column(Integer, default=0)
    # JSON list of the server's interfaces (NICs and bridges) from its facts; None: not probed yet
    interfaces_json: Mapped[str | None] = mapped_column(Text)
    mhz: Mapped[int] = mapped_column(Integer, default=0)
    hypervisor_vendor: Mapped[str | None] = mapped_column(String(64))
    hypervisor_type: Mapped[str | None] = mapped_column(String(64))
    hypervisor_version: Mapped[str | None] = mapped_column(String(64))
    domain_type: Mapped[str] = mapped_column(String(8), default="qemu")  # kvm or qemu (TCG)
    host_key_fingerprint: Mapped[str | None] = mapped_column(String(128))
    host_key: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=ServerStatus.UP.value, index=True)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Domains libvirt reports on this server, refreshed by the poll and the
    # monitor: JSON list of {"name", "uuid", "state"}.
    domains_json: Mapped[str | None] = mapped_column(Text)
    load1: Mapped[float | None] = mapped_column(Float)
    # Since when the server's load is over a rebalancing threshold (portal.rebalance; None: under).
    over_threshold_since: Mapped[datetime | None] = mapped_column(UTCDateTime)

    disks: Mapped[list[ServerDisk]] = relationship(
        back_populates="server", cascade="all, delete-orphan", order_by="ServerDisk.id"
    )
    vms: Mapped[list[VM]] = relationship(back_populates="server", foreign_keys="VM.server_id")

    @property
    def status_enum(self) -> ServerStatus:
        return ServerStatus(self.status)

    @property
    def domains(self) -> list[dict]:
        return json.loads(self.domains_json) if self.domains_json else []

    def __repr__(self) -> str:
        return f"<Server {self.hostname} {self.status}>"


class ServerDisk(db.Model):
    """A mountpoint on a VM server where VM disk images live."""

    __tablename__ = "server_disks"
    __table_args__ = (UniqueConstraint("server_id", "mountpoint", name="uq_server_disks_mount"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    server_id: Mapped[int] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"), index=True)
    mountpoint: Mapped[str] = mapped_column(String(255))
    size_gb: Mapped[int] = mapped_column(Integer, default=0)
    free_gb: Mapped[int | None] = mapped_column(Integer)
    # Disks with the same group are one storage seen by several servers (same
    # mountpoint), set only after Corral verified it with a marker file.
    shared_group: Mapped[str | None] = mapped_column(String(64), index=True)

    server: Mapped[Server] = relationship(back_populates="disks")


class ServerSample(db.Model):
    """Memory and disk use of a server at one time, for the graphs.

    ``resolution`` is the span one row stands for, in seconds: raw polls are
    0; older rows are merged into 300-second and then 3600-second averages.
    """

    __tablename__ = "server_samples"
    __table_args__ = (Index("ix_server_samples_server_res_at", "server_id", "resolution", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    server_id: Mapped[int] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolution: Mapped[int] = mapped_column(Integer, default=0)
    mem_used_mb: Mapped[int] = mapped_column(Integer)
    mem_total_mb: Mapped[int] = mapped_column(Integer)
    disk_used_gb: Mapped[int] = mapped_column(Integer)
    disk_total_gb: Mapped[int] = mapped_column(Integer)


class CheckResult(db.Model):
    """The latest result of one Nagios-style check for one server (or Corral itself)."""

    __tablename__ = "check_results"
    __table_args__ = (
        UniqueConstraint("server_id", "check", name="uq_check_results_server_check"),
        CheckConstraint("state IN ('ok', 'warning', 'critical', 'unknown')", name="state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    server_id: Mapped[int | None] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"))
    check: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(8))
    summary: Mapped[str] = mapped_column(Text)
    perfdata: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Network(db.Model):
    """A virtual network: bridged onto a host bridge, NAT, or isolated; optional VLAN."""

    __tablename__ = "networks"
    __table_args__ = (enum_check("kind", NetworkKind, "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default=NetworkKind.BRIDGED.value)
    bridge: Mapped[str | None] = mapped_column(String(32))
    vlan: Mapped[int | None] = mapped_column(Integer, unique=True)
    cidr: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(Text)
    # the servers' NIC a bridged network (or a VLAN across servers) rides on; see portal/networks.py
    uplink: Mapped[str | None] = mapped_column(String(15))
    dhcp_start: Mapped[str | None] = mapped_column(String(45))
    dhcp_end: Mapped[str | None] = mapped_column(String(45))

    reservations: Mapped[list[NetworkReservation]] = relationship(
        back_populates="network", cascade="all, delete-orphan", order_by="NetworkReservation.ip")


class NetworkReservation(db.Model):
    """A MAC -> IP reservation on a network (Eucalyptus' STATIC mode)."""

    __tablename__ = "network_reservations"
    __table_args__ = (UniqueConstraint("network_id", "mac", name="uq_reservations_mac"),
                      UniqueConstraint("network_id", "ip", name="uq_reservations_ip"))

    id: Mapped[int] = mapped_column(primary_key=True)
    network_id: Mapped[int] = mapped_column(ForeignKey("networks.id", ondelete="CASCADE"), index=True)
    mac: Mapped[str] = mapped_column(String(17))
    ip: Mapped[str] = mapped_column(String(45))

    network: Mapped[Network] = relationship(back_populates="reservations")


class Appliance(db.Model):
    """A virtual appliance in the library: one to four disks plus sizing hints."""

    __tablename__ = "appliances"
    __table_args__ = (
        CheckConstraint("state IN ('importing', 'ready', 'failed')", name="state"),
        CheckConstraint("min_memory_mb <= max_memory_mb", name="memory_range"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    min_memory_mb: Mapped[int] = mapped_column(Integer, default=128)
    max_memory_mb: Mapped[int] = mapped_column(Integer, default=4096)
    vcpus: Mapped[int] = mapped_column(Integer, default=1)
    os_hint: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16), default="upload")
    state: Mapped[str] = mapped_column(String(16), default=ApplianceState.IMPORTING.value)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # VMs from it each need a serial key from the pool (portal/license_keys.py)
    license_required: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # the OS type its attributes come from (Rocks' os attributes; see portal/attributes.py)
    os_type: Mapped[str | None] = mapped_column(String(32))
    # its guests run cloud-init: VMs from it get a NoCloud seed CD-ROM (portal/vmm/seed.py)
    cloud_init: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")

    disks: Mapped[list[ApplianceDisk]] = relationship(
        back_populates="appliance", cascade="all, delete-orphan", order_by="ApplianceDisk.position"
    )

    @property
    def ready(self) -> bool:
        return self.state == ApplianceState.READY.value

    @property
    def size_bytes(self) -> int:
        return sum(d.file_size_bytes or 0 for d in self.disks)


class LicenseKey(db.Model):
    """A serial key for an appliance that needs one; held by at most one VM (see portal/license_keys.py)."""

    __tablename__ = "license_keys"
    __table_args__ = (UniqueConstraint("appliance_id", "key", name="uq_license_keys_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    appliance_id: Mapped[int] = mapped_column(ForeignKey("appliances.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(255))
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vms.id", ondelete="SET NULL"), unique=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    appliance: Mapped[Appliance] = relationship()
    vm: Mapped[VM | None] = relationship()


class Attribute(db.Model):
    """A key/value attribute at one scope: global, appliance, OS type or VM (see portal/attributes.py).

    ``target`` names the scope's object ("" for global, the appliance or VM id, the OS type) so
    a key is unique per scope; appliance_id/vm_id carry the cascade when that object goes."""

    __tablename__ = "attributes"
    __table_args__ = (
        CheckConstraint("scope IN ('global', 'appliance', 'os', 'vm')", name="scope"),
        UniqueConstraint("scope", "target", "key", name="uq_attributes_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(32), default="")
    appliance_id: Mapped[int | None] = mapped_column(ForeignKey("appliances.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ApplianceDisk(db.Model):
    __tablename__ = "appliance_disks"
    __table_args__ = (UniqueConstraint("appliance_id", "position", name="uq_appliance_disks_pos"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    appliance_id: Mapped[int] = mapped_column(ForeignKey("appliances.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(String(1024))
    format: Mapped[str] = mapped_column(String(16), default="qcow2")
    compression: Mapped[str | None] = mapped_column(String(8))  # gz, xz, zst
    virtual_size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    file_size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))

    appliance: Mapped[Appliance] = relationship(back_populates="disks")


class IsoImage(db.Model):
    __tablename__ = "iso_images"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VM(db.Model):
    __tablename__ = "vms"
    __table_args__ = (
        enum_check("state", VMState, "state"),
        enum_check("backup_mode", BackupMode, "backup_mode"),
        CheckConstraint("length(name) BETWEEN 1 AND 8", name="name_length"),
        CheckConstraint("memory_mb > 0 AND vcpus > 0", name="sizing"),
        Index("ix_vms_owner_state", "owner_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    vmid: Mapped[int] = mapped_column(Integer, unique=True)  # cluster-wide number
    name: Mapped[str] = mapped_column(String(8), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    memory_mb: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer, default=1)
    server_id: Mapped[int | None] = mapped_column(ForeignKey("servers.id", ondelete="RESTRICT"), index=True)
    disk_id: Mapped[int | None] = mapped_column(ForeignKey("server_disks.id", ondelete="RESTRICT"))
    backup_server_id: Mapped[int | None] = mapped_column(
        ForeignKey("servers.id", ondelete="RESTRICT"), index=True
    )
    backup_mode: Mapped[str] = mapped_column(String(24), default=BackupMode.NONE.value)
    # The ServerDisk on backup_server where the LiveSync copy lives.
    backup_disk_id: Mapped[int | None] = mapped_column(ForeignKey("server_disks.id", ondelete="RESTRICT"))
    is_clone: Mapped[bool] = mapped_column(Boolean, default=False)
    usb_tablet: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default=VMState.CREATING.value, index=True)
    appliance_id: Mapped[int | None] = mapped_column(ForeignKey("appliances.id", ondelete="SET NULL"))
    iso_id: Mapped[int | None] = mapped_column(ForeignKey("iso_images.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    state_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    owner: Mapped[User] = relationship(back_populates="vms")
    server: Mapped[Server | None] = relationship(back_populates="vms", foreign_keys=[server_id])
    backup_server: Mapped[Server | None] = relationship(foreign_keys=[backup_server_id])
    disk: Mapped[ServerDisk | None] = relationship(foreign_keys=[disk_id])
    backup_disk: Mapped[ServerDisk | None] = relationship(foreign_keys=[backup_disk_id])
    livesync: Mapped[LiveSync | None] = relationship(back_populates="vm", cascade="all, delete-orphan",
                                                     passive_deletes=True)
    appliance: Mapped[Appliance | None] = relationship()
    iso: Mapped[IsoImage | None] = relationship()
    vdisks: Mapped[list[VirtualDisk]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="VirtualDisk.position"
    )
    nics: Mapped[list[NIC]] = relationship(
        back_populates="vm", cascade="all, delete-orphan", order_by="NIC.position"
    )

    @property
    def state_enum(self) -> VMState:
        return VMState(self.state)

    @property
    def disk_gb(self) -> int:
        return sum(d.size_gb for d in self.vdisks)

    def __repr__(self) -> str:
        return f"<VM {self.name} #{self.vmid} {self.state}>"


class LiveSyncState(str, enum.Enum):
    UNPROTECTED = "unprotected"
    SYNCING = "syncing"
    IN_SYNC = "in_sync"
    BROKEN = "broken"


class LiveSync(db.Model):
    """The LiveSync state of one protected VM: a synchronous copy of its disks on ``vm.backup_server``.

    The copy always flows from ``vm.server`` (where the VM runs or would run)
    to ``vm.backup_server``. ``home_server_id`` is the VM's designated primary;
    after a failover ``vm.server_id != home_server_id`` (running on its backup).
    ``epoch`` is a fencing generation, bumped on every failover and every
    change of the copy's direction. Only a copy whose row is ``in_sync`` may
    ever be started.
    """

    __tablename__ = "livesync"
    __table_args__ = (enum_check("state", LiveSyncState, "state"),)

    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=LiveSyncState.UNPROTECTED.value)
    progress_pct: Mapped[int] = mapped_column(Integer, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    broken_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    broken_reason: Mapped[str | None] = mapped_column(Text)
    home_server_id: Mapped[int | None] = mapped_column(ForeignKey("servers.id", ondelete="RESTRICT"), index=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    export_port: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    vm: Mapped[VM] = relationship(back_populates="livesync")
    home_server: Mapped[Server | None] = relationship(foreign_keys=[home_server_id])

    @property
    def state_enum(self) -> LiveSyncState:
        return LiveSyncState(self.state)


class VirtualDisk(db.Model):
    __tablename__ = "virtual_disks"
    __table_args__ = (
        UniqueConstraint("vm_id", "position", name="uq_virtual_disks_pos"),
        enum_check("bus", DiskBus, "bus"),
        CheckConstraint("size_gb > 0", name="size"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    size_gb: Mapped[int] = mapped_column(Integer)
    bus: Mapped[str] = mapped_column(String(8), default=DiskBus.VIRTIO.value)
    format: Mapped[str] = mapped_column(String(8), default="qcow2")
    path: Mapped[str | None] = mapped_column(String(1024))
    backing_path: Mapped[str | None] = mapped_column(String(1024))

    vm: Mapped[VM] = relationship(back_populates="vdisks")


class NIC(db.Model):
    __tablename__ = "nics"
    __table_args__ = (UniqueConstraint("vm_id", "position", name="uq_nics_pos"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    network_id: Mapped[int | None] = mapped_column(ForeignKey("networks.id", ondelete="RESTRICT"))
    model: Mapped[str] = mapped_column(String(16), default="virtio")

    vm: Mapped[VM] = relationship(back_populates="nics")
    network: Mapped[Network | None] = relationship()


class VirtualCluster(db.Model):
    """A Rocks-style virtual cluster: a frontend VM plus compute VMs on a private network on its own VLAN
    (see portal/clusters.py). Its VMs are ordinary VMs; membership says which role each plays."""

    __tablename__ = "virtual_clusters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)  # the frontend's FQDN
    public_ip: Mapped[str] = mapped_column(String(45), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    vlan: Mapped[int] = mapped_column(Integer, unique=True)
    network_id: Mapped[int | None] = mapped_column(ForeignKey("networks.id", ondelete="SET NULL"))
    appliance_id: Mapped[int | None] = mapped_column(ForeignKey("appliances.id", ondelete="SET NULL"))
    compute_memory_mb: Mapped[int] = mapped_column(Integer)
    compute_vcpus: Mapped[int] = mapped_column(Integer, default=1)
    compute_disk_gb: Mapped[int] = mapped_column(Integer)
    clone: Mapped[bool] = mapped_column(Boolean, default=True)
    server_ids: Mapped[str] = mapped_column(String(255), default="")  # the chosen servers, "1,2"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    owner: Mapped[User] = relationship()
    network: Mapped[Network | None] = relationship()
    appliance: Mapped[Appliance | None] = relationship()
    members: Mapped[list[ClusterMember]] = relationship(
        back_populates="cluster", cascade="all, delete-orphan",
        order_by=lambda: [ClusterMember.role.desc(), ClusterMember.index])


class ClusterMember(db.Model):
    """A VM's place in a virtual cluster: the frontend (index 0) or compute number *index*."""

    __tablename__ = "cluster_members"
    __table_args__ = (CheckConstraint("role IN ('frontend', 'compute')", name="role"),
                      UniqueConstraint("cluster_id", "role", "index", name="uq_cluster_members_slot"))

    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("virtual_clusters.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(8))
    index: Mapped[int] = mapped_column(Integer, default=0)

    cluster: Mapped[VirtualCluster] = relationship(back_populates="members")
    vm: Mapped[VM] = relationship()


class Task(db.Model):
    """A background operation; outlives Redis."""

    __tablename__ = "tasks"
    __table_args__ = (
        enum_check("state", TaskState, "state"),
        Index("ix_tasks_requester_created", "requester_id", "created_at"),
        Index("ix_tasks_state_created", "state", "created_at"),
        Index("ix_tasks_target", "target_type", "target_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(48))
    title: Mapped[str] = mapped_column(String(200))
    target_type: Mapped[str | None] = mapped_column(String(24))
    target_id: Mapped[int | None] = mapped_column(Integer)
    requester_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    state: Mapped[str] = mapped_column(String(16), default=TaskState.QUEUED.value)
    step: Mapped[str | None] = mapped_column(String(200))
    pct: Mapped[int] = mapped_column(Integer, default=0)
    bytes_done: Mapped[int | None] = mapped_column(BigInteger)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)
    eta_seconds: Mapped[int | None] = mapped_column(Integer)
    log: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[str | None] = mapped_column(Text)  # e.g. a path or a link target
    job_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    # Set while queued/running; unique so a double click maps to one task.
    active_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    requester: Mapped[User | None] = relationship()

    @property
    def state_enum(self) -> TaskState:
        return TaskState(self.state)

    @property
    def finished(self) -> bool:
        return self.state_enum.finished

    @property
    def log_lines(self) -> list[str]:
        return [line for line in (self.log or "").splitlines() if line]


class ActionLog(db.Model):
    __tablename__ = "action_log"
    __table_args__ = (Index("ix_action_log_user_at", "user_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    action: Mapped[str] = mapped_column(String(48))
    target_type: Mapped[str | None] = mapped_column(String(24))
    target_id: Mapped[int | None] = mapped_column(Integer)
    target_label: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[str | None] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(String(64))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"))

    user: Mapped[User | None] = relationship()


class BackupKind(str, enum.Enum):
    FULL = "full"
    INCREMENTAL = "incremental"  # a qcow2 overlay holding what changed since its parent


class BackupState(str, enum.Enum):
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


class Backup(db.Model):
    """A copy of every disk of a VM at one time, in a backup store on a server disk.

    An incremental backup's files are qcow2 overlays whose backing files are
    its parent's: reading one gives the whole disk. Deleting a backup deletes
    the backups built on it (``parent_id`` cascades); deleting the VM deletes
    all of its backups (rows cascade, the delete job removes the files).
    """

    __tablename__ = "backups"
    __table_args__ = (
        enum_check("kind", BackupKind, "kind"),
        enum_check("state", BackupState, "state"),
        Index("ix_backups_vm_created", "vm_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"))
    server_id: Mapped[int] = mapped_column(ForeignKey("servers.id", ondelete="CASCADE"), index=True)
    disk_id: Mapped[int] = mapped_column(ForeignKey("server_disks.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))  # the backup's directory on the server
    kind: Mapped[str] = mapped_column(String(16), default=BackupKind.FULL.value)
    live: Mapped[bool] = mapped_column(Boolean, default=True)  # taken while the VM ran (else a copy while off)
    scheduled: Mapped[bool] = mapped_column(Boolean, default=False)  # made by a BackupSchedule (pruned by it)
    checkpoint: Mapped[str | None] = mapped_column(String(64))  # libvirt checkpoint the next incremental starts from
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("backups.id", ondelete="CASCADE"), index=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default=BackupState.CREATING.value)
    error: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    vm: Mapped[VM] = relationship()
    server: Mapped[Server] = relationship()
    disk: Mapped[ServerDisk] = relationship()
    parent: Mapped[Backup | None] = relationship(remote_side=[id])
    files: Mapped[list[BackupFile]] = relationship(back_populates="backup", cascade="all, delete-orphan",
                                                   passive_deletes=True, order_by="BackupFile.position")

    @property
    def kind_enum(self) -> BackupKind:
        return BackupKind(self.kind)

    @property
    def state_enum(self) -> BackupState:
        return BackupState(self.state)


class BackupFile(db.Model):
    """One disk of a backup: the file, its size and sha256 as computed on the server."""

    __tablename__ = "backup_files"
    __table_args__ = (UniqueConstraint("backup_id", "position", name="uq_backup_files_pos"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    backup_id: Mapped[int] = mapped_column(ForeignKey("backups.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)  # the VirtualDisk's position
    target: Mapped[str] = mapped_column(String(16))  # guest device, e.g. vda
    path: Mapped[str] = mapped_column(String(1024))
    virtual_size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))

    backup: Mapped[Backup] = relationship(back_populates="files")


class BackupPeriod(str, enum.Enum):
    DAILY = "daily"
    WEEKLY = "weekly"


class BackupSchedule(db.Model):
    """A VM's regular backups: daily or weekly at an hour (UTC), keeping the newest ``keep`` scheduled ones.

    The periodic poll submits a backup task when ``next_run_at`` has passed
    (and moves ``next_run_at`` on, whether or not the VM could be backed up).
    """

    __tablename__ = "backup_schedules"
    __table_args__ = (
        enum_check("period", BackupPeriod, "period"),
        CheckConstraint("keep BETWEEN 1 AND 100", name="keep_range"),
        CheckConstraint("hour BETWEEN 0 AND 23", name="hour_range"),
    )

    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), default=BackupPeriod.DAILY.value)
    hour: Mapped[int] = mapped_column(Integer, default=2)
    weekday: Mapped[int] = mapped_column(Integer, default=6)  # 0 Monday .. 6 Sunday, for weekly
    keep: Mapped[int] = mapped_column(Integer, default=7)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    last_task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"))
    last_note: Mapped[str | None] = mapped_column(Text)  # why the last due run did not start, if it did not

    vm: Mapped[VM] = relationship()


class VMStateInterval(db.Model):
    """One span of a VM's life with everything it is charged for held constant (``portal.metering``).

    Recorded by a session hook whenever a VM's state, size, owner, LiveSync or
    backups change; the open span has no ``ended_at``. Rows keep the VM's and
    owner's names and ids without foreign keys, so they outlive both.
    """

    __tablename__ = "vm_state_intervals"
    __table_args__ = (Index("ix_vm_state_intervals_vm_end", "vm_id", "ended_at"),
                      Index("ix_vm_state_intervals_span", "started_at", "ended_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(Integer)
    vm_name: Mapped[str] = mapped_column(String(8))
    owner_id: Mapped[int] = mapped_column(Integer, index=True)
    owner_name: Mapped[str] = mapped_column(String(64))
    appliance_id: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    running: Mapped[bool] = mapped_column(Boolean, default=False)
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    livesync: Mapped[bool] = mapped_column(Boolean, default=False)
    backup_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class UsageRecord(db.Model):
    """What one VM used in one hour (UTC), in unit-seconds; built from ``VMStateInterval`` rows."""

    __tablename__ = "usage_records"
    __table_args__ = (UniqueConstraint("vm_id", "hour", "owner_id", "appliance_id", name="uq_usage_vm_hour"),
                      Index("ix_usage_owner_hour", "owner_id", "hour"))

    id: Mapped[int] = mapped_column(primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    vm_id: Mapped[int] = mapped_column(Integer)
    vm_name: Mapped[str] = mapped_column(String(8))
    owner_id: Mapped[int] = mapped_column(Integer)
    owner_name: Mapped[str] = mapped_column(String(64))
    appliance_id: Mapped[int | None] = mapped_column(Integer)
    defined_seconds: Mapped[int] = mapped_column(Integer, default=0)
    running_seconds: Mapped[int] = mapped_column(Integer, default=0)
    vcpu_seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_mb_seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_gb_seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    livesync_seconds: Mapped[int] = mapped_column(Integer, default=0)
    backup_byte_seconds: Mapped[int] = mapped_column(BigInteger, default=0)


class MeteringCursor(db.Model):
    """The end of the last hour turned into usage records (one row)."""

    __tablename__ = "metering_cursor"

    id: Mapped[int] = mapped_column(primary_key=True)
    until: Mapped[datetime] = mapped_column(UTCDateTime)


class PriceSheet(db.Model):
    """Prices per unit-hour, in millionths of the currency unit, in force from ``effective_from`` (UTC).

    A sheet with an appliance applies to VMs made from it; otherwise to all
    VMs. For each hour the newest sheet in force wins (an appliance's own
    sheet before the general one).
    """

    __tablename__ = "price_sheets"
    __table_args__ = (UniqueConstraint("effective_from", "appliance_id", name="uq_price_sheets_from_appliance"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    appliance_id: Mapped[int | None] = mapped_column(ForeignKey("appliances.id", ondelete="CASCADE"))
    vcpu_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_gb_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_gb_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    running_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    defined_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    livesync_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    backup_gb_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    appliance: Mapped[Appliance | None] = relationship()


offering_users = db.Table(
    "offering_users",
    db.Column("offering_id", ForeignKey("offerings.id", ondelete="CASCADE"), primary_key=True),
    db.Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)


class Offering(db.Model):
    """A service in the catalog: an appliance at a size with a backup plan and a list price (``portal.offerings``).

    ``order_roles`` (comma-separated roles) and ``order_users`` say who may
    order it; ordering opens the create form bounded by the offering.
    """

    __tablename__ = "offerings"
    __table_args__ = (
        CheckConstraint("backup IN ('none', 'daily', 'weekly', 'livesync', 'livesync_failover')", name="backup"),
        CheckConstraint("memory_mb > 0 AND vcpus > 0", name="sizing"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    appliance_id: Mapped[int] = mapped_column(ForeignKey("appliances.id", ondelete="CASCADE"), index=True)
    memory_mb: Mapped[int] = mapped_column(Integer)
    vcpus: Mapped[int] = mapped_column(Integer, default=1)
    backup: Mapped[str] = mapped_column(String(8), default="none")
    monthly_price: Mapped[int] = mapped_column(BigInteger, default=0)  # millionths of the currency unit
    order_roles: Mapped[str] = mapped_column(String(32), default="power,manager")
    published: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    appliance: Mapped[Appliance] = relationship()
    order_users: Mapped[list[User]] = relationship(secondary=offering_users, order_by="User.username")


class ApiToken(db.Model):
    """A personal API token (``portal.api_tokens``): only its SHA-256 is stored; the secret is shown once.

    ``scope`` is ``read`` (GET only) or ``write``; a token acts as its user,
    with that user's permissions, until it expires or is revoked.
    """

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint("scope IN ('read', 'write')", name="scope"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))  # the secret's first characters, to recognise it
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(8), default="read")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship()

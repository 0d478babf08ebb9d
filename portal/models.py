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
    state: Mapped[str] = mapped_column(String(16), default="importing")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    disks: Mapped[list[ApplianceDisk]] = relationship(
        back_populates="appliance", cascade="all, delete-orphan", order_by="ApplianceDisk.position"
    )

    @property
    def size_bytes(self) -> int:
        return sum(d.file_size_bytes or 0 for d in self.disks)


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
    disk: Mapped[ServerDisk | None] = relationship()
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

"""The data model: desired state of the cloud, what reconcilers observed, jobs and events.

States follow CloudStack so operators recognise them (see DESIGN.md, "Domain words").
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from backend.router.rule_types import RuleType


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp in the database is UTC."""
    return datetime.now(UTC)


class VMState(enum.StrEnum):
    """Life cycle of a system VM or guest VM, as CloudStack names it."""

    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    MIGRATING = "Migrating"
    STOPPED = "Stopped"
    DESTROYED = "Destroyed"
    EXPUNGING = "Expunging"
    ERROR = "Error"
    UNKNOWN = "Unknown"


class SystemVMType(enum.StrEnum):
    SSVM = "ssvm"
    CPVM = "cpvm"
    ROUTER = "router"


class HostState(enum.StrEnum):
    UP = "Up"
    DOWN = "Down"
    ALERT = "Alert"
    DISCONNECTED = "Disconnected"
    MAINTENANCE = "Maintenance"


class ZoneState(enum.StrEnum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"


class NetworkState(enum.StrEnum):
    ALLOCATED = "Allocated"
    IMPLEMENTED = "Implemented"
    SHUTDOWN = "Shutdown"
    DESTROYED = "Destroyed"


class NicRole(enum.StrEnum):
    CONTROL = "control"
    MANAGEMENT = "management"
    PUBLIC = "public"
    STORAGE = "storage"
    GUEST = "guest"


class TemplateState(enum.StrEnum):
    """Template transfer states, CloudStack's names (downloads and their upload twins)."""

    NOT_DOWNLOADED = "NOT_DOWNLOADED"
    DOWNLOAD_IN_PROGRESS = "DOWNLOAD_IN_PROGRESS"
    DOWNLOADED = "DOWNLOADED"
    DOWNLOAD_ERROR = "DOWNLOAD_ERROR"
    ABANDONED = "ABANDONED"
    NOT_UPLOADED = "NOT_UPLOADED"
    UPLOAD_IN_PROGRESS = "UPLOAD_IN_PROGRESS"
    UPLOADED = "UPLOADED"
    UPLOAD_ERROR = "UPLOAD_ERROR"


class TemplateFormat(enum.StrEnum):
    QCOW2 = "QCOW2"
    RAW = "RAW"
    ISO = "ISO"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def _enum_values(e: type[enum.StrEnum]) -> str:
    return ", ".join(f"'{m.value}'" for m in e)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Timestamped:
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Zone(Timestamped, Base):
    __tablename__ = "zones"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=ZoneState.ENABLED.value)
    dns: Mapped[str] = mapped_column(String(64), default="")
    # Lab zones may fetch templates from loopback URLs; real zones refuse local addresses.
    allow_local_urls: Mapped[bool] = mapped_column(Boolean, default=False)
    is_lab: Mapped[bool] = mapped_column(Boolean, default=False)

    pods: Mapped[list[Pod]] = relationship(back_populates="zone", cascade="all, delete-orphan")
    hosts: Mapped[list[Host]] = relationship(back_populates="zone", cascade="all, delete-orphan")
    __table_args__ = (CheckConstraint(f"state IN ({_enum_values(ZoneState)})", name="zone_state"),)


class Pod(Timestamped, Base):
    __tablename__ = "pods"
    id: Mapped[int] = mapped_column(primary_key=True)
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    zone: Mapped[Zone] = relationship(back_populates="pods")
    __table_args__ = (UniqueConstraint("zone_id", "name"),)


class Host(Timestamped, Base):
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(primary_key=True)
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"), index=True)
    pod_id: Mapped[int | None] = mapped_column(ForeignKey("pods.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(64), unique=True)
    uri: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16), default=HostState.UP.value)
    # Address VNC servers of this host's domains listen on.
    vnc_listen: Mapped[str] = mapped_column(String(64), default="127.0.0.1")
    # Which back end plays the guests of this host: local | netns | vm.
    backend: Mapped[str] = mapped_column(String(16), default="vm")
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    zone: Mapped[Zone] = relationship(back_populates="hosts")
    __table_args__ = (CheckConstraint(f"state IN ({_enum_values(HostState)})", name="host_state"),)


class PrimaryStorage(Timestamped, Base):
    __tablename__ = "primary_storage"
    id: Mapped[int] = mapped_column(primary_key=True)
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    pool_name: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))


class TemplateCopy(Timestamped, Base):
    """A template copied to a host's primary storage pool (once; guest VMs then use it)."""

    __tablename__ = "template_copies"
    id: Mapped[int] = mapped_column(primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id", ondelete="CASCADE"))
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    pool_name: Mapped[str] = mapped_column(String(64))
    volume: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(Integer, default=0)
    # copied: the bytes are in the pool; recorded: a lab test host, nothing was copied
    state: Mapped[str] = mapped_column(String(16))
    __table_args__ = (UniqueConstraint("template_id", "host_id", name="one_copy_per_host"),)


class ImageStore(Timestamped, Base):
    """Secondary storage of a zone: templates, ISOs, snapshots live under `path`."""

    __tablename__ = "image_stores"
    id: Mapped[int] = mapped_column(primary_key=True)
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(1024))


class IpRange(Base):
    """A pool of addresses one purpose draws from (control, management, public, storage, guest)."""

    __tablename__ = "ip_ranges"
    id: Mapped[int] = mapped_column(primary_key=True)
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"), index=True)
    pod_id: Mapped[int | None] = mapped_column(ForeignKey("pods.id", ondelete="CASCADE"))
    network_id: Mapped[int | None] = mapped_column(
        ForeignKey("guest_networks.id", ondelete="CASCADE")
    )
    purpose: Mapped[str] = mapped_column(String(16))
    cidr: Mapped[str] = mapped_column(String(64))
    start_ip: Mapped[str] = mapped_column(String(64))
    end_ip: Mapped[str] = mapped_column(String(64))
    gateway: Mapped[str] = mapped_column(String(64), default="")
    __table_args__ = (
        CheckConstraint(f"purpose IN ({_enum_values(NicRole)})", name="range_purpose"),
    )


class IpAddress(Base):
    """One allocated address. The unique constraint is what makes double allocation impossible."""

    __tablename__ = "ip_addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    range_id: Mapped[int] = mapped_column(ForeignKey("ip_ranges.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(64))
    # Integer form of the address, so the allocator can find the lowest free one with SQL.
    address_int: Mapped[int] = mapped_column(Integer)
    holder: Mapped[str] = mapped_column(String(128))
    allocated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (
        UniqueConstraint("range_id", "address", name="one_holder_per_address"),
        Index("ix_ip_range_int", "range_id", "address_int"),
    )


class Template(Timestamped, Base):
    __tablename__ = "templates"
    id: Mapped[int] = mapped_column(primary_key=True)
    zone_id: Mapped[int | None] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    account: Mapped[str] = mapped_column(String(64), default="system")
    format: Mapped[str] = mapped_column(String(8), default=TemplateFormat.QCOW2.value)
    url: Mapped[str] = mapped_column(Text, default="")
    checksum: Mapped[str] = mapped_column(String(160), default="")
    state: Mapped[str] = mapped_column(String(24), default=TemplateState.NOT_DOWNLOADED.value)
    size: Mapped[int] = mapped_column(Integer, default=0)
    virtual_size: Mapped[int] = mapped_column(Integer, default=0)
    is_system: Mapped[bool] = mapped_column(Boolean, default=False)
    install_path: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (
        UniqueConstraint("zone_id", "name"),
        CheckConstraint(f"state IN ({_enum_values(TemplateState)})", name="template_state"),
        CheckConstraint(f"format IN ({_enum_values(TemplateFormat)})", name="template_format"),
    )


class TemplateTransfer(Timestamped, Base):
    __tablename__ = "template_transfers"
    id: Mapped[int] = mapped_column(primary_key=True)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id", ondelete="CASCADE"))
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"))
    ssvm_id: Mapped[int | None] = mapped_column(ForeignKey("system_vms.id", ondelete="SET NULL"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    direction: Mapped[str] = mapped_column(String(8), default="download")
    state: Mapped[str] = mapped_column(String(24), default=TemplateState.NOT_DOWNLOADED.value)
    bytes_done: Mapped[int] = mapped_column(Integer, default=0)
    bytes_total: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")


class GuestNetwork(Timestamped, Base):
    __tablename__ = "guest_networks"
    id: Mapped[int] = mapped_column(primary_key=True)
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    cidr: Mapped[str] = mapped_column(String(64))
    gateway: Mapped[str] = mapped_column(String(64))
    vlan: Mapped[int | None] = mapped_column(Integer)
    source_nat_ip: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default=NetworkState.ALLOCATED.value)
    # Last time a guest VM of this network was seen running (router idle shutdown).
    last_active_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    default_egress: Mapped[str] = mapped_column(String(8), default="allow")
    # The router bundle last applied (and confirmed): its version, digest and JSON, and the
    # digest the router reported of what is live when last asked.
    router_version: Mapped[int] = mapped_column(Integer, default=0)
    router_digest: Mapped[str] = mapped_column(String(64), default="")
    router_bundle: Mapped[str] = mapped_column(Text, default="")
    router_live_digest: Mapped[str] = mapped_column(String(64), default="")
    router_expected_live: Mapped[str] = mapped_column(String(64), default="")
    __table_args__ = (
        CheckConstraint(f"state IN ({_enum_values(NetworkState)})", name="network_state"),
    )


class SystemVM(Timestamped, Base):
    __tablename__ = "system_vms"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(8))
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"), index=True)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"))
    template_id: Mapped[int | None] = mapped_column(ForeignKey("templates.id", ondelete="SET NULL"))
    network_id: Mapped[int | None] = mapped_column(
        ForeignKey("guest_networks.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[str] = mapped_column(String(16), default=VMState.STARTING.value)
    boot_args: Mapped[dict[str, Any]] = mapped_column(default=dict)
    host_key_private: Mapped[str] = mapped_column(Text)
    host_key_public: Mapped[str] = mapped_column(Text)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str] = mapped_column(Text, default="")
    nics: Mapped[list[Nic]] = relationship(
        back_populates="system_vm", cascade="all, delete-orphan", order_by="Nic.device_id"
    )
    __table_args__ = (
        CheckConstraint(f"type IN ({_enum_values(SystemVMType)})", name="systemvm_type"),
        CheckConstraint(f"state IN ({_enum_values(VMState)})", name="systemvm_state"),
    )


class GuestVM(Timestamped, Base):
    __tablename__ = "guest_vms"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    zone_id: Mapped[int] = mapped_column(ForeignKey("zones.id", ondelete="CASCADE"), index=True)
    network_id: Mapped[int] = mapped_column(
        ForeignKey("guest_networks.id", ondelete="CASCADE"), index=True
    )
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id", ondelete="SET NULL"))
    template_id: Mapped[int | None] = mapped_column(ForeignKey("templates.id", ondelete="SET NULL"))
    state: Mapped[str] = mapped_column(String(16), default=VMState.STOPPED.value)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # its root disk on primary storage (a copy-on-write volume over the template), if any
    disk_path: Mapped[str] = mapped_column(Text, default="")
    nics: Mapped[list[Nic]] = relationship(
        back_populates="guest_vm", cascade="all, delete-orphan", order_by="Nic.device_id"
    )
    __table_args__ = (CheckConstraint(f"state IN ({_enum_values(VMState)})", name="guestvm_state"),)


class Nic(Base):
    __tablename__ = "nics"
    id: Mapped[int] = mapped_column(primary_key=True)
    system_vm_id: Mapped[int | None] = mapped_column(
        ForeignKey("system_vms.id", ondelete="CASCADE"), index=True
    )
    guest_vm_id: Mapped[int | None] = mapped_column(
        ForeignKey("guest_vms.id", ondelete="CASCADE"), index=True
    )
    device_id: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    ip: Mapped[str] = mapped_column(String(64), default="")
    netmask: Mapped[str] = mapped_column(String(64), default="")
    gateway: Mapped[str] = mapped_column(String(64), default="")
    network_id: Mapped[int | None] = mapped_column(
        ForeignKey("guest_networks.id", ondelete="SET NULL")
    )
    ip_address_id: Mapped[int | None] = mapped_column(
        ForeignKey("ip_addresses.id", ondelete="SET NULL")
    )
    system_vm: Mapped[SystemVM | None] = relationship(back_populates="nics")
    guest_vm: Mapped[GuestVM | None] = relationship(back_populates="nics")
    __table_args__ = (
        CheckConstraint(f"role IN ({_enum_values(NicRole)})", name="nic_role"),
        CheckConstraint(
            "(system_vm_id IS NULL) <> (guest_vm_id IS NULL)", name="nic_has_one_owner"
        ),
    )


class RouterRule(Timestamped, Base):
    __tablename__ = "router_rules"
    id: Mapped[int] = mapped_column(primary_key=True)
    network_id: Mapped[int] = mapped_column(
        ForeignKey("guest_networks.id", ondelete="CASCADE"), index=True
    )
    type: Mapped[str] = mapped_column(String(24))
    fields: Mapped[dict[str, Any]] = mapped_column(default=dict)
    __table_args__ = (CheckConstraint(f"type IN ({_enum_values(RuleType)})", name="rule_type"),)


class VpnUser(Timestamped, Base):
    __tablename__ = "vpn_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    network_id: Mapped[int] = mapped_column(
        ForeignKey("guest_networks.id", ondelete="CASCADE"), index=True
    )
    username: Mapped[str] = mapped_column(String(64))
    password: Mapped[str] = mapped_column(String(128))
    __table_args__ = (UniqueConstraint("network_id", "username"),)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32), default="")
    target_id: Mapped[int | None] = mapped_column(Integer)
    target_name: Mapped[str] = mapped_column(String(128), default="")
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value, index=True)
    progress: Mapped[float] = mapped_column(default=0.0)
    bytes_done: Mapped[int] = mapped_column(Integer, default=0)
    bytes_total: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    __table_args__ = (CheckConstraint(f"state IN ({_enum_values(JobState)})", name="job_state"),)


class Event(Base):
    """A state change: which entity, which id, which fields changed to what."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    entity: Mapped[str] = mapped_column(String(32), index=True)
    entity_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128), default="")
    fields: Mapped[dict[str, Any]] = mapped_column(default=dict)

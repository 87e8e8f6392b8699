"""Values that cross the EngineAPI seam: plain, typed, JSON-ready (no database, no drivers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

FINISHED_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class EventRecord:
    """One state change: `kind` is created | updated | deleted; `fields` holds the new values."""

    id: int
    ts: str
    entity: str
    entity_id: int
    kind: str
    name: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class JobInfo:
    """A job as clients see it."""

    id: int
    kind: str
    target_type: str
    target_id: int | None
    target_name: str
    state: str
    progress: float
    bytes_done: int
    bytes_total: int
    message: str
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_JOB_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


class HostNode(TypedDict):
    id: int
    name: str
    state: str
    uri: str


class SystemVMNode(TypedDict):
    id: int
    name: str
    type: str
    state: str
    host: str | None
    control_ip: str | None


class RouterNode(TypedDict):
    id: int
    name: str
    state: str
    drift: bool  # what the router last reported live differs from what was applied


class GuestVMNode(TypedDict):
    id: int
    name: str
    state: str
    ip: str | None


class NetworkNode(TypedDict):
    id: int
    name: str
    cidr: str
    router: RouterNode | None
    vms: list[GuestVMNode]


class ZoneNode(TypedDict):
    id: int
    name: str
    state: str
    hosts: list[HostNode]
    system_vms: list[SystemVMNode]
    networks: list[NetworkNode]


class StatusTree(TypedDict):
    zones: list[ZoneNode]

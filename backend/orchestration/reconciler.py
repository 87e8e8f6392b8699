"""Reconcilers: converge every zone to its required system VMs and every network's router to its use.

Event-driven (libvirt lifecycle events, host failures and operator destroys poke it) with a
periodic safety scan. Idempotent: a pass that finds nothing to do does nothing. It never acts on a
VM an operator action holds (that VM's lock) or on one in a transitional state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.db.models import (
    GuestNetwork,
    GuestVM,
    Host,
    HostState,
    SystemVM,
    SystemVMType,
    TemplateState,
    TemplateTransfer,
    VMState,
    Zone,
    ZoneState,
)
from backend.db.worker import command
from backend.errors import SysvmError

if TYPE_CHECKING:
    from backend.engine.core import Engine

log = logging.getLogger(__name__)

RESTARTABLE = {VMState.STOPPED, VMState.ERROR, VMState.UNKNOWN}
UP = {VMState.RUNNING, VMState.STARTING, VMState.MIGRATING}
ZoneView = tuple[int, dict[SystemVMType, list[SystemVM]]]
"""A zone's transfers in progress and its system VMs (not destroyed) by type."""


def required_cpvms(sessions: int, capacity: int, standby: int) -> int:
    """CloudStack's rule: enough proxies for the sessions plus `standby` free ones, at least 1."""
    return max(1, math.ceil((sessions + standby) / capacity))


def required_ssvms(transfers: int, capacity: int) -> int:
    """One secondary storage VM per `capacity` concurrent transfers, at least 1."""
    return max(1, math.ceil(transfers / capacity))


def _transfers(s: Session, zone_id: int | None) -> dict[int, int]:
    """Every enabled zone's (or only `zone_id`'s) transfers in progress, by zone id."""
    zones = select(Zone.id).where(Zone.state == ZoneState.ENABLED.value)
    if zone_id is not None:
        zones = zones.where(Zone.id == zone_id)
    out = dict.fromkeys(s.scalars(zones), 0)
    in_progress = [TemplateState.DOWNLOAD_IN_PROGRESS.value, TemplateState.UPLOAD_IN_PROGRESS.value]
    counts = s.execute(
        select(TemplateTransfer.zone_id, func.count())
        .where(TemplateTransfer.state.in_(in_progress), TemplateTransfer.zone_id.in_(out))
        .group_by(TemplateTransfer.zone_id)
    )
    out.update((z, int(n)) for z, n in counts)
    return out


_ZONE_VMS = (
    SystemVM.type.in_([SystemVMType.SSVM.value, SystemVMType.CPVM.value]),
    SystemVM.state != VMState.DESTROYED.value,
)


@command
def _zone_state(s: Session, *, zone_id: int) -> ZoneView | None:
    """The zone's transfers in progress and system VMs; None if it is not enabled (or gone)."""
    transfers = _transfers(s, zone_id)
    if zone_id not in transfers:
        return None
    out: ZoneView = (transfers[zone_id], {})
    vms = s.scalars(
        select(SystemVM).where(SystemVM.zone_id == zone_id, *_ZONE_VMS).order_by(SystemVM.id)
    )
    for vm in vms:
        out[1].setdefault(SystemVMType(vm.type), []).append(vm)
    return out


@command
def _zones_load(s: Session) -> dict[int, tuple[int, dict[SystemVMType, list[str]]]]:
    """Every enabled zone's transfers in progress and its system VMs' states by type: what a
    pass needs to find the zones with work (plain values: a hundred ORM objects took ~4 ms of
    the loop to unpickle)."""
    out: dict[int, tuple[int, dict[SystemVMType, list[str]]]] = {
        z: (n, {}) for z, n in _transfers(s, None).items()
    }
    rows = s.execute(
        select(SystemVM.zone_id, SystemVM.type, SystemVM.state)
        .where(SystemVM.zone_id.in_(out), *_ZONE_VMS)
        .order_by(SystemVM.id)
    )
    for zone_id, vm_type, state in rows:
        out[zone_id][1].setdefault(SystemVMType(vm_type), []).append(state)
    return out


class _RouterView(NamedTuple):
    id: int
    name: str
    state: str
    started_at: datetime | None


@command
def _routers_state(
    s: Session,
) -> tuple[list[tuple[int, datetime | None]], set[int], dict[int | None, _RouterView]]:
    """Every network (id, last VM activity), those with a VM up, and their routers (plain
    values: two hundred ORM objects took ~7 ms of the loop to unpickle)."""
    nets = [(i, t) for i, t in s.execute(select(GuestNetwork.id, GuestNetwork.last_active_at))]
    active = set(
        s.scalars(
            select(GuestVM.network_id)
            .where(GuestVM.state.in_([VMState.RUNNING.value, VMState.STARTING.value]))
            .distinct()
        ).all()
    )
    routers = {
        r.network_id: _RouterView(r.id, r.name, r.state, r.started_at)
        for r in s.execute(
            select(
                SystemVM.network_id, SystemVM.id, SystemVM.name, SystemVM.state, SystemVM.started_at
            ).where(
                SystemVM.type == SystemVMType.ROUTER.value,
                SystemVM.state != VMState.DESTROYED.value,
            )
        )
    }
    return nets, active, routers


def _has_work(states: list[str], wanted: int) -> bool:
    """Whether `_converge` would act on VMs in these states: one missing, or more running
    than wanted."""
    up = sum(VMState(state) in UP for state in states)
    running = sum(state == VMState.RUNNING.value for state in states)
    return up < wanted or running > wanted


def _utc(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class Reconciler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._zone_locks: dict[int, asyncio.Lock] = {}
        # vm id -> (failures, not before monotonic time): backoff for VMs that fail to start
        self._backoff: dict[int, tuple[int, float]] = {}
        self._surplus_since: dict[tuple[int, str], float] = {}
        self.passes = 0
        self.console_sessions: dict[int, int] = {}  # zone id -> sessions (console proxy issue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """Something changed: run a pass now rather than at the next safety scan."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), float(self.engine.config["reconcile.interval"])
                )
            self._wake.clear()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile pass failed; the next pass retries")

    async def reconcile_once(self) -> None:
        """One pass: every enabled zone's system VMs and transfers are read in one go; only a
        zone with something to do (a VM missing, or more running than needed) is reconciled, on
        fresh rows, under its lock. A pass over a quiet cloud costs one trip to the database."""
        zones = await self.engine.db.run_read(_zones_load)
        limit = asyncio.Semaphore(16)

        async def one(zone_id: int) -> None:
            async with limit:
                await self.reconcile_zone(zone_id)

        busy = []
        for zone_id, (transfers, states) in zones.items():
            wanted = self._wanted(zone_id, transfers)
            if any(_has_work(states.get(t, []), n) for t, n in wanted.items()):
                busy.append(one(zone_id))
            else:
                for t in wanted:
                    self._surplus_since.pop((zone_id, t.value), None)
        await asyncio.gather(*busy)
        await self.reconcile_routers()
        self.passes += 1

    def _wanted(self, zone_id: int, transfers: int) -> dict[SystemVMType, int]:
        cfg = self.engine.config
        return {
            SystemVMType.SSVM: required_ssvms(transfers, int(cfg["ssvm.capacity"])),
            SystemVMType.CPVM: required_cpvms(
                self.console_sessions.get(zone_id, 0),
                int(cfg["cpvm.capacity"]),
                int(cfg["cpvm.standby"]),
            ),
        }

    async def reconcile_zone(self, zone_id: int) -> None:
        """Bring an enabled zone to the system VMs its load needs (a disabled one is left)."""
        async with self._zone_locks.setdefault(zone_id, asyncio.Lock()):
            state = await self.engine.db.run_read(functools.partial(_zone_state, zone_id=zone_id))
            if state is None:
                return  # disabled or gone: nothing is started there
            transfers, vms = state
            wanted = self._wanted(zone_id, transfers)
            await asyncio.gather(
                *(self._converge(zone_id, t, n, vms.get(t, [])) for t, n in wanted.items())
            )

    async def _converge(
        self, zone_id: int, vm_type: SystemVMType, wanted: int, vms: list[SystemVM]
    ) -> None:
        up = [v for v in vms if VMState(v.state) in UP]
        down = [v for v in vms if VMState(v.state) in RESTARTABLE]
        missing = wanted - len(up)
        work = []
        for vm in down[: max(missing, 0)]:
            work.append(self._revive(vm))
        for _ in range(max(0, missing - len(down))):
            work.append(self._create(zone_id, vm_type))
        if work:
            await asyncio.gather(*work)
        await self._scale_down(zone_id, vm_type, wanted, vms)

    async def _revive(self, vm: SystemVM) -> None:
        """Start a stopped VM again; one whose host is gone moves to another Up host."""
        svc = self.engine.system_vms
        if svc.lock(vm.id).locked():
            return
        failures, not_before = self._backoff.get(vm.id, (0, 0.0))
        if time.monotonic() < not_before:
            return
        host_id = None
        async with self.engine.db.read() as s:
            host = await s.get(Host, vm.host_id) if vm.host_id else None
            if host is None or host.state != HostState.UP.value:
                try:
                    host_id = (await svc._pick_host(s, vm.zone_id)).id
                except SysvmError as exc:
                    log.warning("cannot place %s: %s", vm.name, exc)
                    return
        try:
            log.info("reconciler: starting %s (%s)", vm.name, vm.state)
            await svc.start(vm.id, host_id=host_id)
            self._backoff.pop(vm.id, None)
        except SysvmError as exc:
            failures += 1
            self._backoff[vm.id] = (failures, time.monotonic() + min(2**failures, 60))
            log.warning("reconciler: %s did not start (%d): %s", vm.name, failures, exc)
            if failures >= 3:
                log.warning("reconciler: giving up on %s; destroying it for a fresh one", vm.name)
                with contextlib.suppress(SysvmError):
                    await svc.destroy(vm.id)
                self._backoff.pop(vm.id, None)

    async def _create(self, zone_id: int, vm_type: SystemVMType) -> None:
        svc = self.engine.system_vms
        try:
            vm_id = await svc.create(zone_id, vm_type)
            log.info("reconciler: created system VM %d (%s) in zone %d", vm_id, vm_type, zone_id)
            await svc.start(vm_id)
        except SysvmError as exc:
            log.warning("reconciler: could not bring up a %s in zone %d: %s", vm_type, zone_id, exc)

    async def _scale_down(
        self, zone_id: int, vm_type: SystemVMType, wanted: int, vms: list[SystemVM]
    ) -> None:
        """Unlike CloudStack, give back system VMs the load no longer needs, after a while."""
        running = sorted(
            (v for v in vms if v.state == VMState.RUNNING.value), key=lambda v: v.id, reverse=True
        )
        key = (zone_id, vm_type.value)
        if len(running) <= wanted:
            self._surplus_since.pop(key, None)
            return
        since = self._surplus_since.setdefault(key, time.monotonic())
        if time.monotonic() - since < float(self.engine.config["systemvm.scale_down_after"]):
            return
        for vm in running[: len(running) - wanted]:
            if not self.engine.system_vms.lock(vm.id).locked():
                log.info("reconciler: scaling down, destroying %s", vm.name)
                with contextlib.suppress(SysvmError):
                    await self.engine.system_vms.destroy(vm.id)
        self._surplus_since.pop(key, None)

    async def reconcile_routers(self) -> None:
        """A network with running VMs has a running router; an idle one's router stops after
        `network.gc.wait` seconds."""
        gc_wait = float(self.engine.config["network.gc.wait"])
        now = datetime.now(UTC)

        nets, active, routers = await self.engine.db.run_read(_routers_state)
        work = []
        for net_id, last_active_at in nets:
            router = routers.get(net_id)
            if net_id in active:
                if router is None or VMState(router.state) in RESTARTABLE:
                    work.append(self._router_up(net_id))
            elif router is not None and router.state == VMState.RUNNING.value:
                # idle since the last VM activity, or since the router started if more recent
                marks = [_utc(t) for t in (last_active_at, router.started_at) if t is not None]
                if not marks or (now - max(marks)).total_seconds() >= gc_wait:
                    work.append(self._router_idle(router))
        if work:
            await asyncio.gather(*work)

    async def _router_up(self, network_id: int) -> None:
        try:
            await self.engine.system_vms.ensure_router(network_id)
        except SysvmError as exc:
            log.warning("reconciler: router of network %d did not come up: %s", network_id, exc)

    async def _router_idle(self, router: _RouterView) -> None:
        if self.engine.system_vms.lock(router.id).locked():
            return
        log.info("reconciler: %s idle for network.gc.wait; stopping it", router.name)
        try:
            await self.engine.system_vms.stop(router.id)
        except SysvmError as exc:
            log.warning("reconciler: could not stop idle router %s: %s", router.name, exc)

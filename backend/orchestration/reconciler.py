"""Reconcilers: converge every zone to its required system VMs and every network's router to its use.

Event-driven (libvirt lifecycle events, host failures and operator destroys poke it) with a
periodic safety scan. Idempotent: a pass that finds nothing to do does nothing. It never acts on a
VM an operator action holds (that VM's lock) or on one in a transitional state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select

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
from backend.errors import SysvmError

if TYPE_CHECKING:
    from backend.engine.core import Engine

log = logging.getLogger(__name__)

RESTARTABLE = {VMState.STOPPED, VMState.ERROR, VMState.UNKNOWN}


@dataclass(frozen=True)
class ZoneLoad:
    console_sessions: int = 0
    active_transfers: int = 0


def required_cpvms(sessions: int, capacity: int, standby: int) -> int:
    """CloudStack's rule: enough proxies for the sessions plus `standby` free ones, at least 1."""
    return max(1, math.ceil((sessions + standby) / capacity))


def required_ssvms(transfers: int, capacity: int) -> int:
    """One secondary storage VM per `capacity` concurrent transfers, at least 1."""
    return max(1, math.ceil(transfers / capacity))


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
        async with self.engine.db.read() as s:
            zone_ids = list(
                (
                    await s.scalars(select(Zone.id).where(Zone.state == ZoneState.ENABLED.value))
                ).all()
            )
        limit = asyncio.Semaphore(16)

        async def one(zone_id: int) -> None:
            async with limit:
                await self.reconcile_zone(zone_id)

        await asyncio.gather(*(one(z) for z in zone_ids))
        await self.reconcile_routers()
        self.passes += 1

    async def _load(self, zone_id: int) -> ZoneLoad:
        async with self.engine.db.read() as s:
            transfers = await s.scalar(
                select(func.count())
                .select_from(TemplateTransfer)
                .where(
                    TemplateTransfer.zone_id == zone_id,
                    TemplateTransfer.state.in_(
                        [
                            TemplateState.DOWNLOAD_IN_PROGRESS.value,
                            TemplateState.UPLOAD_IN_PROGRESS.value,
                        ]
                    ),
                )
            )
        return ZoneLoad(self.console_sessions.get(zone_id, 0), int(transfers or 0))

    async def reconcile_zone(self, zone_id: int) -> None:
        async with self._zone_locks.setdefault(zone_id, asyncio.Lock()):
            load = await self._load(zone_id)
            cfg = self.engine.config
            wanted = {
                SystemVMType.SSVM: required_ssvms(load.active_transfers, int(cfg["ssvm.capacity"])),
                SystemVMType.CPVM: required_cpvms(
                    load.console_sessions, int(cfg["cpvm.capacity"]), int(cfg["cpvm.standby"])
                ),
            }
            await asyncio.gather(*(self._converge(zone_id, t, n) for t, n in wanted.items()))

    async def _converge(self, zone_id: int, vm_type: SystemVMType, wanted: int) -> None:
        svc = self.engine.system_vms
        vms = await svc.running_in_zone(zone_id, vm_type)
        up = [
            v
            for v in vms
            if VMState(v.state) in {VMState.RUNNING, VMState.STARTING, VMState.MIGRATING}
        ]
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
        async with self.engine.db.read() as s:
            nets = (await s.scalars(select(GuestNetwork))).all()
            active = set(
                (
                    await s.scalars(
                        select(GuestVM.network_id)
                        .where(GuestVM.state.in_([VMState.RUNNING.value, VMState.STARTING.value]))
                        .distinct()
                    )
                ).all()
            )
            routers = {
                r.network_id: r
                for r in (
                    await s.scalars(
                        select(SystemVM).where(
                            SystemVM.type == SystemVMType.ROUTER.value,
                            SystemVM.state != VMState.DESTROYED.value,
                        )
                    )
                ).all()
            }
        work = []
        for net in nets:
            router = routers.get(net.id)
            if net.id in active:
                if router is None or VMState(router.state) in RESTARTABLE:
                    work.append(self._router_up(net.id))
            elif router is not None and router.state == VMState.RUNNING.value:
                # idle since the last VM activity, or since the router started if more recent
                marks = [_utc(t) for t in (net.last_active_at, router.started_at) if t is not None]
                if not marks or (now - max(marks)).total_seconds() >= gc_wait:
                    work.append(self._router_idle(router))
        if work:
            await asyncio.gather(*work)

    async def _router_up(self, network_id: int) -> None:
        try:
            await self.engine.system_vms.ensure_router(network_id)
        except SysvmError as exc:
            log.warning("reconciler: router of network %d did not come up: %s", network_id, exc)

    async def _router_idle(self, router: SystemVM) -> None:
        if self.engine.system_vms.lock(router.id).locked():
            return
        log.info("reconciler: %s idle for network.gc.wait; stopping it", router.name)
        try:
            await self.engine.system_vms.stop(router.id)
        except SysvmError as exc:
            log.warning("reconciler: could not stop idle router %s: %s", router.name, exc)

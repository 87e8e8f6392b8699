"""Host health: a host that stops answering goes Alert and its VMs Unknown; when it answers again
it goes Up, and copies of system VMs that were recreated elsewhere meanwhile are removed from it,
so no system VM ever runs twice."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from backend.db.models import GuestVM, Host, HostState, SystemVM, VMState, utcnow
from backend.db.worker import command
from backend.errors import SysvmError

if TYPE_CHECKING:
    from backend.engine.core import Engine

log = logging.getLogger(__name__)

# Consecutive unanswered health checks before a host goes Alert (one slow answer is not a failure).
MISSES_BEFORE_ALERT = 2
LIVE = {VMState.RUNNING.value, VMState.STARTING.value, VMState.STOPPING.value}


class HostView(NamedTuple):
    """What a check needs of a host (plain values: they cross from the database's worker
    process cheaply, an ORM object costs ~25 us to unpickle)."""

    id: int
    name: str
    state: str


@command
def _to_check(s: Session, ids: set[int]) -> list[HostView]:
    """The hosts among `ids` not in maintenance: one query per round, not one per host."""
    rows = s.execute(
        select(Host.id, Host.name, Host.state).where(
            Host.id.in_(ids), Host.state != HostState.MAINTENANCE.value
        )
    )
    return [HostView(*r) for r in rows]


def _here_or_named(
    model: type[SystemVM] | type[GuestVM], host_id: int, names: Iterable[str]
) -> ColumnElement[bool]:
    """VMs named like a domain of the host, or recorded on it while it was away."""
    return or_(
        model.name.in_(list(names)),
        and_(model.host_id == host_id, model.state == VMState.UNKNOWN.value),
    )


class HostMonitor:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._task: asyncio.Task[None] | None = None
        self._checking: set[int] = set()
        self._checks: set[asyncio.Task[None]] = set()  # pending ones, cancelled on stop
        self._misses: dict[int, int] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="host-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # a check may still wait for its turn in the round: it must not run on a stopped engine
        checks = list(self._checks)
        for t in checks:
            t.cancel()
        await asyncio.gather(*checks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(float(self.engine.config["host.ping_interval"]))
            known = self.engine.hypervisors.known - self._checking
            if not known:
                continue
            hosts = await self.engine.db.run_read(functools.partial(_to_check, ids=known))
            # One task per host: a host that hangs never delays the checks of the others. The
            # checks are spread over the round: a hundred hosts are not all asked at once.
            spacing = float(self.engine.config["host.ping_interval"]) / max(len(hosts), 1)
            for i, host in enumerate(hosts):
                self._checking.add(host.id)
                check = asyncio.create_task(
                    self._check_one(host, i * spacing), name=f"ping-host-{host.id}"
                )
                self._checks.add(check)
                check.add_done_callback(self._checks.discard)

    async def _check_one(self, host: HostView, delay: float = 0.0) -> None:
        try:
            await asyncio.sleep(delay)
            await self.check(host)
        except Exception:
            log.exception("health check of host %s failed", host.name)
        finally:
            self._checking.discard(host.id)

    async def check(self, host: HostView) -> None:
        """Ping the host; a change of answer (lost, back) is acted on."""
        try:
            conn = self.engine.hypervisors.get(host.id)
            await conn.ping(timeout=float(self.engine.config["host.ping_timeout"]))
        except SysvmError as exc:
            misses = self._misses.get(host.id, 0) + 1
            self._misses[host.id] = misses
            if host.state == HostState.UP.value and misses >= MISSES_BEFORE_ALERT:
                await self.host_lost(host, str(exc))
            return
        self._misses.pop(host.id, None)
        if host.state != HostState.UP.value:
            await self.host_back(host)

    async def host_lost(self, host: HostView, reason: str) -> None:
        """Alert the host; its VMs are Unknown until it answers again or they move elsewhere."""
        log.warning("host %s lost: %s", host.name, reason)

        async def work(s: AsyncSession) -> tuple[list[SystemVM], list[GuestVM]]:
            row = await s.get(Host, host.id)
            assert row is not None
            row.state = HostState.ALERT.value
            row.last_error = reason
            svms = list(
                (
                    await s.scalars(
                        select(SystemVM).where(
                            SystemVM.host_id == host.id, SystemVM.state.in_(LIVE)
                        )
                    )
                ).all()
            )
            gvms = list(
                (
                    await s.scalars(
                        select(GuestVM).where(GuestVM.host_id == host.id, GuestVM.state.in_(LIVE))
                    )
                ).all()
            )
            for svm in svms:
                svm.state = VMState.UNKNOWN.value
            for gvm in gvms:
                gvm.state = VMState.UNKNOWN.value
            return svms, gvms

        svms, gvms = await self.engine.db.write(work)
        bus = self.engine.bus
        bus.publish(
            "host", host.id, "updated", host.name, state=HostState.ALERT.value, last_error=reason
        )
        for vm in svms:
            # Its control path is gone with the host: the engine can no longer reach the guest.
            await self.engine.guests.halt(vm)
            bus.publish(
                "system_vm",
                vm.id,
                "updated",
                vm.name,
                state=VMState.UNKNOWN.value,
                type=vm.type,
                zone_id=vm.zone_id,
            )
        for g in gvms:
            bus.publish(
                "guest_vm",
                g.id,
                "updated",
                g.name,
                state=VMState.UNKNOWN.value,
                network_id=g.network_id,
            )
        self.engine.reconciler.poke()

    async def host_back(self, host: HostView) -> None:
        """Up again: remove duplicates of VMs that moved away, re-observe the VMs still here."""
        log.info("host %s answers again", host.name)
        conn = self.engine.hypervisors.get(host.id)
        try:
            domains = await conn.domain_states()
        except SysvmError as exc:
            log.warning("host %s: cannot list domains after recovery: %s", host.name, exc)
            return
        async with self.engine.db.read() as s:
            svms = {
                v.name: v
                for v in (
                    await s.scalars(
                        select(SystemVM).where(_here_or_named(SystemVM, host.id, domains))
                    )
                ).all()
            }
            gvms = {
                v.name: v
                for v in (
                    await s.scalars(
                        select(GuestVM).where(_here_or_named(GuestVM, host.id, domains))
                    )
                ).all()
            }
        for name in domains:
            vm: SystemVM | GuestVM | None = svms.get(name) or gvms.get(name)
            if vm is None:
                continue
            moved = vm.host_id != host.id or vm.state in (
                VMState.DESTROYED.value,
                VMState.EXPUNGING.value,
            )
            if moved:
                log.warning(
                    "%s also runs on %s (moved or destroyed meanwhile): removing that copy",
                    name,
                    host.name,
                )
                await conn.destroy(name, undefine=True)

        async def work(s: AsyncSession) -> None:
            row = await s.get(Host, host.id)
            assert row is not None
            row.state = HostState.UP.value
            row.last_error = ""
            row.last_seen_at = utcnow()

        await self.engine.db.write(work)
        self.engine.bus.publish(
            "host", host.id, "updated", host.name, state=HostState.UP.value, last_error=""
        )
        # VMs still assigned here and Unknown: running domains come back, the others are Stopped.
        for name, svm in svms.items():
            if svm.host_id == host.id and svm.state == VMState.UNKNOWN.value:
                if domains.get(name) == "running":
                    await self.engine.system_vms.boot_guest(svm)
                    await self.engine.system_vms.set_state(svm, VMState.RUNNING)
                else:
                    await self.engine.system_vms.set_state(svm, VMState.STOPPED)
        for name, gvm in gvms.items():
            if gvm.host_id == host.id and gvm.state == VMState.UNKNOWN.value:
                running = domains.get(name) == "running"
                await self.engine.guest_vms.set_state(
                    gvm, VMState.RUNNING if running else VMState.STOPPED
                )
        self.engine.reconciler.poke()

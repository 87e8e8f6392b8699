"""The engine: owns the database, libvirt connections, guests, jobs and the event bus.

`Engine` is the in-process implementation of `EngineAPI`; the daemon serves the same object
over websockets. One engine runs per SYSVM_HOME (see `backend.engine.daemon`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import libvirt
from sqlalchemy import select

from backend import __version__
from backend.api.types import EventRecord, JobInfo, StatusTree
from backend.config import Config
from backend.db.database import Database
from backend.db.models import GuestVM, SystemVM, VMState
from backend.engine.events import EventBus
from backend.engine.jobs import JobKind, JobRunner
from backend.errors import ReadOnly
from backend.hypervisor.pool import HypervisorPool
from backend.lab.cloud import LabCloud
from backend.lab.local_guests import LocalGuests
from backend.services.status import status_tree
from backend.services.system_vms import GuestVMService, SystemVMService
from backend.transport.ssh import SystemVMTransport, generate_keypair, load_client_key

log = logging.getLogger(__name__)

# Lifecycle events that mean "the domain is no longer running".
_DOWN_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED,
}


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.home = config.home
        self.read_only = bool(config["read_only"])
        self.db = Database(self.home / "sysvm.db")
        self.bus = EventBus(self.db)
        self.runner = JobRunner(
            self.db, self.bus, progress_interval=float(config["job.progress_interval"])
        )
        self.hypervisors = HypervisorPool(on_lifecycle=self._on_lifecycle)
        self.system_vms = SystemVMService(self)
        self.guest_vms = GuestVMService(self)
        self.lab = LabCloud(self)
        self.agent_timeout = 30.0
        self.schema = ""
        self._started_at = time.monotonic()
        self._background: set[asyncio.Task[Any]] = set()
        self.stopped = asyncio.Event()
        self.shutdown_requested = asyncio.Event()

    @property
    def key_path(self) -> Any:
        return self.home / "ssh" / "id_ed25519"

    async def start(self) -> None:
        """Open the database (migrating it), load keys, reattach hosts, recover interrupted jobs."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.home / "ssh").mkdir(exist_ok=True, mode=0o700)
        await asyncio.to_thread(generate_keypair, self.key_path)
        client_key = await asyncio.to_thread(load_client_key, self.key_path)
        public = self.key_path.with_suffix(".pub").read_text()
        self.transport = SystemVMTransport(
            client_key, connect_timeout=float(self.config["engine.connect_timeout"])
        )
        self.guests = LocalGuests(public, boot_delay=float(self.config["lab.boot_delay"]))
        self.schema = await self.db.open()
        await self.bus.start()
        self.runner.register(JobKind("lab.up", self.lab.up, resumable=True))
        self.runner.register(JobKind("lab.down", self.lab.down, resumable=True))
        await self.lab.attach_hosts()
        await self.runner.recover()
        self._started_at = time.monotonic()
        log.info("engine started on %s (schema %s)", self.home, self.schema)

    async def stop(self) -> None:
        await self.runner.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.guests.stop_all()
        await self.transport.close()
        await self.hypervisors.close()
        await self.bus.stop()
        await self.db.close()
        self.stopped.set()
        log.info("engine stopped")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- libvirt lifecycle: record what was observed -------------------------------------------

    def _on_lifecycle(self, host_id: int, name: str, event: int, detail: int) -> None:
        if event in _DOWN_EVENTS:
            self._spawn(self._observed_down(name, event), f"observe-{name}")

    async def _observed_down(self, name: str, event: int) -> None:
        """A domain stopped behind the engine's back (not during our own stop): record it."""
        async with self.db.read() as s:
            svm = (await s.scalars(select(SystemVM).where(SystemVM.name == name))).first()
            gvm = (await s.scalars(select(GuestVM).where(GuestVM.name == name))).first()
        why = "undefined" if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED else "stopped"
        if svm is not None and svm.state == VMState.RUNNING.value:
            await self.guests.halt(svm)
            await self.system_vms.set_state(
                svm, VMState.STOPPED, last_error=f"domain {why} outside the engine"
            )
        elif gvm is not None and gvm.state == VMState.RUNNING.value:
            await self.guest_vms._set_state(gvm, VMState.STOPPED)

    # -- EngineAPI ---------------------------------------------------------------------------

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnly(f"{what} refused: the engine is read-only (setting read_only)")

    async def engine_info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "home": str(self.home),
            "schema": self.schema,
            "uptime": round(time.monotonic() - self._started_at, 1),
            "read_only": self.read_only,
        }

    async def status(self) -> StatusTree:
        async with self.db.read() as s:
            return await status_tree(s)

    async def config_show(self) -> list[dict[str, Any]]:
        return self.config.describe()

    async def lab_up(
        self,
        zones: int | None = None,
        hosts: int | None = None,
        networks: int | None = None,
        vms: int | None = None,
    ) -> JobInfo:
        self._writable("lab up")
        params = {
            "zones": self.config["lab.zones"] if zones is None else zones,
            "hosts": self.config["lab.hosts"] if hosts is None else hosts,
            "networks": self.config["lab.networks"] if networks is None else networks,
            "vms": self.config["lab.vms"] if vms is None else vms,
        }
        LabCloud.validate(**params)
        return await self.runner.submit("lab.up", params, target_type="lab", target_name="lab")

    async def lab_down(self) -> JobInfo:
        self._writable("lab down")
        return await self.runner.submit("lab.down", {}, target_type="lab", target_name="lab")

    async def jobs(self, limit: int = 100, state: str | None = None) -> list[JobInfo]:
        return await self.runner.list(limit=limit, state=state)

    async def job(self, job_id: int) -> JobInfo:
        return await self.runner.get(job_id)

    async def wait_job(self, job_id: int, timeout: float | None = None) -> JobInfo:
        return await self.runner.wait(job_id, timeout)

    async def cancel_job(self, job_id: int) -> JobInfo:
        self._writable("cancel job")
        return await self.runner.cancel(job_id)

    async def events(
        self, since_id: int = 0, limit: int = 200, entity: str | None = None
    ) -> list[EventRecord]:
        return await self.bus.recent(since_id=since_id, limit=limit, entity=entity)

    async def subscribe(self, entities: Iterable[str] | None = None) -> AsyncIterator[EventRecord]:
        sub = self.bus.subscribe(entities)
        try:
            async for event in sub:
                yield event
        finally:
            sub.close()

    async def shutdown(self) -> None:
        self.shutdown_requested.set()

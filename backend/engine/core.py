"""The engine: owns the database, libvirt connections, guests, jobs and the event bus.

`Engine` is the in-process implementation of `EngineAPI`; the daemon serves the same object
over websockets. One engine runs per SYSVM_HOME (see `backend.engine.daemon`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import libvirt
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend import __version__
from backend.api.types import EventRecord, JobInfo, StatusTree
from backend.config import Config
from backend.db.database import Database
from backend.db.models import (
    GuestNetwork,
    GuestVM,
    Host,
    HostState,
    SystemVM,
    Template,
    VMState,
    Zone,
)
from backend.engine.events import EventBus
from backend.engine.jobs import JobContext, JobKind, JobRunner
from backend.errors import (
    Conflict,
    EngineUnavailable,
    InvalidInput,
    NotFound,
    ReadOnly,
    SysvmError,
    TransportError,
)
from backend.heap import HeapSettler
from backend.hypervisor.connection import HostConnection
from backend.hypervisor.pool import HypervisorPool
from backend.lab.cloud import LAB_HOST_BACKENDS, LabCloud
from backend.lab.local_guests import LocalGuests
from backend.lab.netns import problem as netns_problem
from backend.lab.netns_guests import NetnsGuests
from backend.orchestration.host_monitor import HostMonitor
from backend.orchestration.reconciler import Reconciler
from backend.services.guest_vms import GuestVMService
from backend.services.names import check_name
from backend.services.routers import RouterService
from backend.services.status import status_tree, system_vm_details
from backend.services.system_vms import SystemVMService
from backend.storage.primary import PrimaryStorageCopies
from backend.storage.transfers import TemplateTransfers
from backend.transport.ssh import SystemVMTransport, generate_keypair, load_client_key

log = logging.getLogger(__name__)

HOST_URI_SCHEMES = ("qemu", "qemu+ssh", "qemu+tcp", "qemu+tls", "test")
SYSTEM_VM_ACTIONS = ("start", "stop", "reboot", "destroy", "migrate")
GUEST_VM_ACTIONS = ("start", "stop", "destroy")

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
        self.heap = HeapSettler()
        self.runner = JobRunner(
            self.db,
            self.bus,
            progress_interval=float(config["job.progress_interval"]),
            on_idle=self.heap.settle_if_grown,
        )
        self.hypervisors = HypervisorPool(on_lifecycle=self._on_lifecycle)
        self.system_vms = SystemVMService(self)
        self.guest_vms = GuestVMService(self)
        self.lab = LabCloud(self)
        self.templates = TemplateTransfers(self)
        self.routers = RouterService(self)
        self.primary = PrimaryStorageCopies(self)
        self.reconciler = Reconciler(self)
        self.host_monitor = HostMonitor(self)
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
        self.transport = SystemVMTransport(
            client_key, connect_timeout=float(self.config["engine.connect_timeout"])
        )
        self._spawn(self._start_transport(), "ssh-worker-start")
        local = LocalGuests(
            self.key_path.with_suffix(".pub"),
            boot_delay=float(self.config["lab.boot_delay"]),
            log_file=self.home / "lab-guests.log",
        )
        # Routers of `netns` lab hosts run in namespaces; every other guest on `local`.
        self.guests = NetnsGuests(
            local, self.db, self.home / "lab" / "netns", self.key_path.with_suffix(".pub")
        )
        self.schema = await self.db.open()
        await self.bus.start()
        for kind in self._job_kinds():
            self.runner.register(kind)
        await self._settle_interrupted_vms()
        await self.lab.attach_hosts()
        await self.runner.recover()
        self.reconciler.start()
        self.host_monitor.start()
        self.reconciler.poke()
        self._started_at = time.monotonic()
        # Everything loaded so far (modules, mappers, config) lives as long as the engine: keep
        # it out of the cyclic collector's full scans, each one a loop stall.
        self.heap.start()
        log.info("engine started on %s (schema %s)", self.home, self.schema)

    async def stop(self) -> None:
        """Stop everything the engine runs (idempotent)."""
        if self.stopped.is_set():
            return
        await self.host_monitor.stop()
        await self.reconciler.stop()
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

    async def _start_transport(self) -> None:
        """Start the SSH worker while the engine starts, so the first command does not wait."""
        try:
            await self.transport.start()
        except TransportError as exc:
            log.warning("%s; the next SSH command tries again", exc)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- libvirt lifecycle: record what was observed -------------------------------------------

    async def _settle_interrupted_vms(self) -> None:
        """VMs a killed engine left half way (Starting, Stopping, Migrating) are Stopped: no
        action of this engine is working on them, so the reconciler (or a job resumed) may
        start them again. Expunging VMs stay for their resumed destroy job."""
        half_way = [VMState.STARTING.value, VMState.STOPPING.value, VMState.MIGRATING.value]

        async def work(s: AsyncSession) -> list[tuple[str, int, str, str]]:
            changed = []
            for svm in (
                await s.scalars(select(SystemVM).where(SystemVM.state.in_(half_way)))
            ).all():
                changed.append(("system_vm", svm.id, svm.name, svm.state))
                svm.last_error = f"the engine stopped while this VM was {svm.state}"
                svm.state = VMState.STOPPED.value
            for gvm in (await s.scalars(select(GuestVM).where(GuestVM.state.in_(half_way)))).all():
                changed.append(("guest_vm", gvm.id, gvm.name, gvm.state))
                gvm.state = VMState.STOPPED.value
            return changed

        for entity, vm_id, name, was in await self.db.write(work):
            log.info("%s was %s when the engine stopped; now Stopped", name, was)
            self.bus.publish(entity, vm_id, "updated", name, state=VMState.STOPPED.value)

    def _on_lifecycle(self, host_id: int, name: str, event: int, detail: int) -> None:
        if event in _DOWN_EVENTS:
            self._spawn(self._observed_down(host_id, name, event), f"observe-{name}")

    async def _observed_down(self, host_id: int, name: str, event: int) -> None:
        """A domain stopped behind the engine's back (a crash, `virsh destroy`, an undefine):
        record it and let the reconciler heal. Our own stops and moves are in a transitional
        state or on another host by then, and are ignored."""
        async with self.db.read() as s:
            svm = (await s.scalars(select(SystemVM).where(SystemVM.name == name))).first()
            gvm = (await s.scalars(select(GuestVM).where(GuestVM.name == name))).first()
        why = "undefined" if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED else "stopped"
        if svm is not None and svm.host_id == host_id and svm.state == VMState.RUNNING.value:
            lock = self.system_vms.lock(svm.id)
            if lock.locked():
                return  # an action is working on it (or this crash is being recorded)
            async with lock:
                svm, _host = await self.system_vms._load(svm.id)
                if svm.host_id != host_id or svm.state != VMState.RUNNING.value:
                    return
                log.warning("%s: domain %s outside the engine", name, why)
                await self.guests.halt(svm)
                await self.system_vms.set_state(
                    svm, VMState.STOPPED, last_error=f"domain {why} outside the engine"
                )
            self.reconciler.poke()
        elif gvm is not None and gvm.host_id == host_id and gvm.state == VMState.RUNNING.value:
            if not self.guest_vms.lock(gvm.id).locked():
                await self.guest_vms.set_state(gvm, VMState.STOPPED)

    def _job_kinds(self) -> list[JobKind]:
        """Every kind of job this engine runs, and whether an interrupted one may run again."""
        svm, gvm = self.system_vms, self.guest_vms

        async def by_name(ctx: JobContext) -> int:
            return await svm.id_by_name(ctx.params["name"])

        async def start(ctx: JobContext) -> dict[str, Any]:
            await svm.start(await by_name(ctx))
            return {}

        async def stop(ctx: JobContext) -> dict[str, Any]:
            await svm.stop(await by_name(ctx), force=bool(ctx.params.get("force")))
            vm_type = ctx.params.get("type")
            note = (
                "the zone reconciler starts it again while the zone is Enabled"
                if vm_type in ("ssvm", "cpvm")
                else ""
            )
            return {"note": note} if note else {}

        async def reboot(ctx: JobContext) -> dict[str, Any]:
            await svm.reboot(await by_name(ctx))
            return {}

        async def destroy(ctx: JobContext) -> dict[str, Any]:
            await svm.destroy(await by_name(ctx))
            self.reconciler.poke()
            return {}

        async def migrate(ctx: JobContext) -> dict[str, Any]:
            host_id = await self._host_id(ctx.params["host"]) if ctx.params.get("host") else None
            return {"host": await svm.migrate(await by_name(ctx), host_id)}

        def copy_progress(ctx: JobContext) -> Any:
            async def report(pct: float, message: str, done: int, total: int) -> None:
                await ctx.progress(
                    pct, message=message, bytes_done=done or None, bytes_total=total or None
                )

            return report

        async def vm_deploy(ctx: JobContext) -> dict[str, Any]:
            net_id = await self._network_id(ctx.params["network"])
            vm_id = await gvm.deploy(net_id, ctx.params["name"], ctx.params.get("template_id"))
            await ctx.progress(10, message="recorded; starting (its router first)")
            await gvm.start(vm_id, copy_progress(ctx))
            return {"id": vm_id}

        async def vm_action(ctx: JobContext) -> dict[str, Any]:
            vm_id = await gvm.id_by_name(ctx.params["name"])
            action = ctx.params["action"]
            if action == "start":
                await gvm.start(vm_id, copy_progress(ctx))
            elif action == "stop":
                await gvm.stop(vm_id, force=bool(ctx.params.get("force")))
            else:
                await gvm.destroy(vm_id)
            return {}

        async def router_apply(ctx: JobContext) -> dict[str, Any]:
            async def report(pct: float, message: str) -> None:
                await ctx.progress(pct, message=message, force=True)

            window = float(ctx.params["confirm_timeout"])
            answer = await self.routers.apply(
                ctx.params["network"], confirm_timeout=window, progress=report
            )
            how = "confirmed over a new connection" if window > 0 else "not confirmed"
            ctx.done_message = f"version {answer['version']} applied and {how}"
            return answer

        async def restart_network(ctx: JobContext) -> dict[str, Any]:
            return await self._restart_network(ctx)

        not_again = "an interrupted {} is not repeated blindly; check the VM and run it again"
        return [
            JobKind("lab.up", self.lab.up, resumable=True),
            JobKind("lab.down", self.lab.down, resumable=True),
            JobKind("systemvm.start", start, resumable=True),
            JobKind("systemvm.stop", stop, resumable=True),
            JobKind("systemvm.reboot", reboot, False, not_again.format("reboot")),
            JobKind("systemvm.destroy", destroy, resumable=True),
            JobKind("systemvm.migrate", migrate, False, not_again.format("migration")),
            JobKind("vm.deploy", vm_deploy, resumable=True),
            JobKind("vm.start", vm_action, resumable=True),
            JobKind("vm.stop", vm_action, resumable=True),
            JobKind("vm.destroy", vm_action, resumable=True),
            JobKind("network.restart", restart_network, False, not_again.format("restart")),
            # the agent resumes a download from its part file; an upload starts over
            JobKind(
                "router.apply",
                router_apply,
                False,
                "the router keeps the new rules or rolls back by itself; "
                "`sysvm router check` shows which, then apply again",
            ),
            JobKind("template.download", self.templates.run, resumable=True),
            JobKind("template.upload", self.templates.run, resumable=True),
            JobKind("template.delete", self.templates.delete, resumable=True),
        ]

    async def _restart_network(self, ctx: JobContext) -> dict[str, Any]:
        """Restart a network's router; with cleanup, destroy it and bring up a new one."""
        net_id = await self._network_id(ctx.params["name"])
        async with self.db.read() as s:
            router = (
                await s.scalars(
                    select(SystemVM).where(
                        SystemVM.network_id == net_id, SystemVM.state != VMState.DESTROYED.value
                    )
                )
            ).first()
        old = router.name if router else None
        if router is not None and ctx.params.get("cleanup"):
            await ctx.progress(10, message=f"destroying {router.name}", force=True)
            await self.system_vms.destroy(router.id)
        elif router is not None and router.state == VMState.RUNNING.value:
            await ctx.progress(10, message=f"rebooting {router.name}", force=True)
            await self.system_vms.reboot(router.id)
        await ctx.progress(50, message="bringing the router up", force=True)
        new_id = await self.system_vms.ensure_router(net_id)
        async with self.db.read() as s:
            new = await s.get(SystemVM, new_id)
        return {"old_router": old, "router": new.name if new else None}

    async def _host_id(self, name: str) -> int:
        async with self.db.read() as s:
            host_id = await s.scalar(select(Host.id).where(Host.name == name))
        if host_id is None:
            raise NotFound(f"no host named {name!r}; `sysvm status` lists them")
        return int(host_id)

    async def _network_id(self, name: str) -> int:
        async with self.db.read() as s:
            net_id = await s.scalar(select(GuestNetwork.id).where(GuestNetwork.name == name))
        if net_id is None:
            raise NotFound(f"no network named {name!r}; `sysvm status` lists them")
        return int(net_id)

    # -- EngineAPI ---------------------------------------------------------------------------

    def _writable(self, what: str) -> None:
        self._live()
        if self.read_only:
            raise ReadOnly(f"{what} refused: the engine is read-only (setting read_only)")

    def _live(self) -> None:
        if self.stopped.is_set():
            raise EngineUnavailable("the engine has stopped")

    async def engine_info(self) -> dict[str, Any]:
        self._live()
        return {
            "pid": os.getpid(),
            "version": __version__,
            "home": str(self.home),
            "schema": self.schema,
            "uptime": round(time.monotonic() - self._started_at, 1),
            "read_only": self.read_only,
        }

    async def status(self) -> StatusTree:
        self._live()
        return await self.db.run_read(status_tree)

    async def config_show(self) -> list[dict[str, Any]]:
        return self.config.describe()

    async def lab_up(
        self,
        zones: int | None = None,
        hosts: int | None = None,
        networks: int | None = None,
        vms: int | None = None,
        backend: str = "local",
    ) -> JobInfo:
        self._writable("lab up")
        params: dict[str, Any] = {
            "zones": self.config["lab.zones"] if zones is None else zones,
            "hosts": self.config["lab.hosts"] if hosts is None else hosts,
            "networks": self.config["lab.networks"] if networks is None else networks,
            "vms": self.config["lab.vms"] if vms is None else vms,
            "backend": backend,
        }
        LabCloud.validate(**params)
        if backend == "netns" and (problem := netns_problem()):
            raise SysvmError(problem)
        return await self.runner.submit("lab.up", params, target_type="lab", target_name="lab")

    async def lab_down(self) -> JobInfo:
        self._writable("lab down")
        return await self.runner.submit("lab.down", {}, target_type="lab", target_name="lab")

    async def jobs(self, limit: int = 100, state: str | None = None) -> list[JobInfo]:
        self._live()
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
        self._live()
        sub = self.bus.subscribe(entities)
        try:
            async for event in sub:
                yield event
        finally:
            sub.close()

    async def system_vms_list(self, zone: str | None = None) -> list[dict[str, Any]]:
        self._live()
        return await self.db.run_read(functools.partial(system_vm_details, zone=zone))

    async def system_vm(self, name: str) -> dict[str, Any]:
        found = await self.db.run_read(functools.partial(system_vm_details, name=name))
        if not found:
            raise NotFound(f"no system VM named {name!r}; `sysvm systemvm list` shows them")
        return found[0]

    async def console(self, name: str) -> dict[str, Any]:
        from backend.services.console import console_of

        return await console_of(self, name)

    async def system_vm_action(
        self, name: str, action: str, host: str | None = None, force: bool = False
    ) -> JobInfo:
        self._writable(f"{action} {name}")
        if action not in SYSTEM_VM_ACTIONS:
            raise InvalidInput(
                "action", f"must be one of {', '.join(SYSTEM_VM_ACTIONS)}, got {action!r}"
            )
        if host is not None and action != "migrate":
            raise InvalidInput("host", "only migrate takes a target host")
        vm = await self.system_vm(name)  # NotFound before a job is made
        if host is not None:
            await self._host_id(host)
        params: dict[str, Any] = {"name": name, "type": vm["type"]}
        if host is not None:
            params["host"] = host
        if force:
            params["force"] = True
        return await self.runner.submit(
            f"systemvm.{action}",
            params,
            target_type="system_vm",
            target_id=vm["id"],
            target_name=name,
        )

    async def guest_vm_deploy(
        self, network: str, name: str, template: str | None = None
    ) -> JobInfo:
        self._writable(f"deploy {name}")
        check_name("name", name)
        net_id = await self._network_id(network)
        template_id = None
        if template is not None:
            async with self.db.read() as s:
                zone_id = await s.scalar(
                    select(GuestNetwork.zone_id).where(GuestNetwork.id == net_id)
                )
                template_id = await s.scalar(
                    select(Template.id).where(
                        Template.zone_id == zone_id, Template.name == template
                    )
                )
            if template_id is None:
                raise InvalidInput(
                    "template", f"no template named {template!r} in the network's zone"
                )
        async with self.db.read() as s:
            if await s.scalar(select(GuestVM.id).where(GuestVM.name == name)) is not None:
                raise Conflict(f"a guest VM named {name!r} already exists")
        return await self.runner.submit(
            "vm.deploy",
            {"network": network, "name": name, "template_id": template_id},
            target_type="guest_vm",
            target_name=name,
        )

    async def guest_vm_action(self, name: str, action: str, force: bool = False) -> JobInfo:
        self._writable(f"{action} {name}")
        if action not in GUEST_VM_ACTIONS:
            raise InvalidInput(
                "action", f"must be one of {', '.join(GUEST_VM_ACTIONS)}, got {action!r}"
            )
        vm_id = await self.guest_vms.id_by_name(name)
        return await self.runner.submit(
            f"vm.{action}",
            {"name": name, "action": action, "force": force},
            target_type="guest_vm",
            target_id=vm_id,
            target_name=name,
        )

    async def network_restart(self, name: str, cleanup: bool = False) -> JobInfo:
        self._writable(f"restart {name}")
        net_id = await self._network_id(name)
        return await self.runner.submit(
            "network.restart",
            {"name": name, "cleanup": cleanup},
            target_type="network",
            target_id=net_id,
            target_name=name,
        )

    async def templates_list(self, zone: str | None = None) -> list[dict[str, Any]]:
        self._live()
        return await self.templates.list(zone)

    async def template_register(
        self, zone: str, name: str, url: str, format: str, checksum: str | None = None
    ) -> JobInfo:
        self._writable(f"register template {name}")
        template_id, kind = await self.templates.register(
            zone, name, url=url, fmt=format, checksum=checksum
        )
        return await self.runner.submit(
            kind,
            {"template_id": template_id, "direction": "download"},
            target_type="template",
            target_id=template_id,
            target_name=name,
        )

    async def template_upload(
        self, zone: str, name: str, path: str, format: str, checksum: str | None = None
    ) -> JobInfo:
        self._writable(f"upload template {name}")
        template_id, kind = await self.templates.register(
            zone, name, path=path, fmt=format, checksum=checksum
        )
        return await self.runner.submit(
            kind,
            {"template_id": template_id, "direction": "upload", "path": path},
            target_type="template",
            target_id=template_id,
            target_name=name,
        )

    async def template_delete(self, zone: str, name: str) -> JobInfo:
        self._writable(f"delete template {name}")
        template_id = await self.templates.id_of(zone, name)
        return await self.runner.submit(
            "template.delete",
            {"template_id": template_id},
            target_type="template",
            target_id=template_id,
            target_name=name,
        )

    async def router_show(self, network: str) -> dict[str, Any]:
        self._live()
        return await self.routers.show(network)

    async def router_diff(self, network: str) -> dict[str, Any]:
        self._live()
        return await self.routers.diff(network)

    async def router_apply(self, network: str, confirm_timeout: float = 30.0) -> JobInfo:
        self._writable(f"apply the rules of {network}")
        if not 0 <= confirm_timeout <= 3600:
            raise InvalidInput("confirm_timeout", "must be between 0 and 3600 seconds")
        await self.routers.require(network)  # NotFound before a job is made
        return await self.runner.submit(
            "router.apply",
            {"network": network, "confirm_timeout": confirm_timeout},
            target_type="network",
            target_name=network,
        )

    async def router_check(self, network: str) -> dict[str, Any]:
        self._live()
        return await self.routers.check(network)

    async def router_rule_add(
        self, network: str, type: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        self._writable(f"add a rule to {network}")
        return await self.routers.add_rule(network, type, fields)

    async def router_rule_replace(
        self, network: str, rule_id: int, type: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        self._writable(f"change rule {rule_id} of {network}")
        return await self.routers.replace_rule(network, rule_id, type, fields)

    async def router_rule_delete(self, network: str, rule_id: int) -> dict[str, Any]:
        self._writable(f"delete rule {rule_id} of {network}")
        return await self.routers.delete_rule(network, rule_id)

    async def host_add(self, zone: str, name: str, uri: str) -> dict[str, Any]:
        """Add a libvirt host to a zone; it must answer before anything is stored."""
        self._writable(f"add host {name}")
        check_name("name", name)
        scheme = uri.split(":", 1)[0] if ":" in uri else ""
        if scheme not in HOST_URI_SCHEMES:
            raise InvalidInput(
                "uri", f"must be a libvirt URI ({', '.join(HOST_URI_SCHEMES)}), got {uri[:80]!r}"
            )
        async with self.db.read() as s:
            zone_row = (await s.scalars(select(Zone).where(Zone.name == zone))).first()
            if zone_row is None:
                raise NotFound(f"no zone named {zone!r}")
            if await s.scalar(select(Host.id).where(Host.name == name)) is not None:
                raise Conflict(f"a host named {name!r} already exists")
        probe = HostConnection(0, name, uri)
        try:
            await probe.ping(timeout=float(self.config["host.ping_timeout"]))
        finally:
            await probe.close()

        async def work(s: AsyncSession) -> int:
            host = Host(
                zone_id=zone_row.id,
                name=name,
                uri=uri,
                backend="local" if scheme == "test" else "vm",
                state=HostState.UP.value,
            )
            s.add(host)
            await s.flush()
            return host.id

        host_id = await self.db.write(work)
        self.hypervisors.add(host_id, name, uri)
        self.bus.publish(
            "host", host_id, "created", name, state=HostState.UP.value, zone_id=zone_row.id, uri=uri
        )
        self.reconciler.poke()
        return {"id": host_id, "name": name, "zone": zone, "uri": uri, "state": HostState.UP.value}

    async def lab_crash(self, vm: str, undefine: bool = False) -> dict[str, Any]:
        """Fault injection: destroy (or undefine) a lab VM's domain directly on its host's
        libvirt connection, bypassing every engine service, as `virsh destroy` would."""
        self._writable(f"crash {vm}")
        async with self.db.read() as s:
            row = (await s.scalars(select(SystemVM).where(SystemVM.name == vm))).first() or (
                await s.scalars(select(GuestVM).where(GuestVM.name == vm))
            ).first()
            host = await s.get(Host, row.host_id) if row is not None and row.host_id else None
        if row is None or host is None:
            raise NotFound(f"no VM named {vm!r} on a host")
        if host.backend not in LAB_HOST_BACKENDS:
            raise Conflict(f"{vm} is on {host.name}, not a lab host; use virsh there")
        await self.hypervisors.get(host.id).destroy(vm, undefine=undefine)
        return {"vm": vm, "host": host.name, "undefined": undefine}

    async def lab_host(self, host: str, up: bool) -> dict[str, Any]:
        """Fault injection: make a lab host's libvirt connection fail (`up=False`) or recover."""
        self._writable(f"host-{'up' if up else 'down'} {host}")
        host_id = await self._host_id(host)
        async with self.db.read() as s:
            row = await s.get(Host, host_id)
        if row is None or row.backend not in LAB_HOST_BACKENDS:
            raise Conflict(f"{host} is not a lab host")
        conn = self.hypervisors.get(host_id)
        conn.simulated_outage = "" if up else "host does not answer (lab host-down)"
        return {"host": host, "reachable": up}

    async def shutdown(self) -> None:
        self.shutdown_requested.set()

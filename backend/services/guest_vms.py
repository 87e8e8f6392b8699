"""Guest VMs (instances): deploy on a network, start (its router first), stop, destroy."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from backend.db import ip_allocator
from backend.db.models import GuestNetwork, GuestVM, Host, Nic, NicRole, Template, VMState, utcnow
from backend.errors import Conflict, NotFound, SysvmError
from backend.hypervisor.domain_xml import DomainSpec, NicSpec, build_domain_xml
from backend.services.system_vms import (
    BRIDGES,
    _netmask,
    _range,
    _require,
    mac_for,
)
from backend.storage.primary import COPIED, Progress

if TYPE_CHECKING:
    from backend.engine.core import Engine


class GuestVMService:
    """The one code path that changes guest VMs; actions on one VM are serialized."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._locks: dict[int, asyncio.Lock] = {}

    def lock(self, vm_id: int) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def id_by_name(self, name: str) -> int:
        async with self.engine.db.read() as s:
            vm_id = await s.scalar(select(GuestVM.id).where(GuestVM.name == name))
        if vm_id is None:
            raise NotFound(f"no guest VM named {name!r}; `sysvm status` lists them")
        return int(vm_id)

    async def deploy(self, network_id: int, name: str, template_id: int | None = None) -> int:
        async def work(s: AsyncSession) -> tuple[int, str, str | None, int]:
            net = await s.get(GuestNetwork, network_id)
            if net is None:
                raise NotFound(f"network {network_id} does not exist")
            existing = (await s.scalars(select(GuestVM).where(GuestVM.name == name))).first()
            if existing is not None:
                return existing.id, existing.state, None, net.zone_id
            host = await self.engine.system_vms._pick_host(s, net.zone_id)
            vm = GuestVM(
                name=name,
                zone_id=net.zone_id,
                network_id=net.id,
                host_id=host.id,
                template_id=template_id,
                state=VMState.STOPPED.value,
                uuid=str(uuid.uuid4()),
            )
            s.add(vm)
            await s.flush()
            rng = await _range(s, net.zone_id, NicRole.GUEST, net.id)
            addr = await ip_allocator.allocate(s, rng, f"{name}/eth0")
            s.add(
                Nic(
                    guest_vm_id=vm.id,
                    device_id=0,
                    role=NicRole.GUEST.value,
                    mac=mac_for(NicRole.GUEST, addr.address, 0x800000 | vm.id, 0),
                    ip=addr.address,
                    netmask=_netmask(net.cidr),
                    gateway=net.gateway,
                    network_id=net.id,
                    ip_address_id=addr.id,
                )
            )
            return vm.id, vm.state, addr.address, net.zone_id

        vm_id, state, ip, zone_id = await self.engine.db.write(work)
        if ip is not None:  # newly made (deploy is idempotent by name)
            self.engine.bus.publish(
                "guest_vm",
                vm_id,
                "created",
                name,
                state=state,
                ip=ip,
                network_id=network_id,
                zone_id=zone_id,
            )
        return vm_id

    async def _load(self, vm_id: int) -> tuple[GuestVM, Host | None]:
        async with self.engine.db.read() as s:
            vm = (
                await s.scalars(
                    select(GuestVM).where(GuestVM.id == vm_id).options(selectinload(GuestVM.nics))
                )
            ).first()
            if vm is None:
                raise NotFound(f"guest VM {vm_id} does not exist")
            host = await s.get(Host, vm.host_id) if vm.host_id else None
            return vm, host

    async def start(self, vm_id: int, progress: Progress | None = None) -> None:
        """Start the VM; its network's router is created or started first, and on its first
        start its template is copied to the host's primary storage (`progress` reports it)."""
        async with self.lock(vm_id):
            vm, host = await self._load(vm_id)
            if vm.state == VMState.RUNNING.value:
                return
            _require(vm, "start", {VMState.STOPPED, VMState.ERROR, VMState.UNKNOWN})
            if host is None:
                raise Conflict(f"{vm.name} has no host")
            await self.engine.system_vms.ensure_router(vm.network_id)
            await self.set_state(vm, VMState.STARTING)
            try:
                if vm.template_id is not None and not vm.disk_path:
                    await self._root_disk(vm, host, progress)
                await self.engine.hypervisors.get(host.id).define_and_start(
                    vm.name, self.domain_xml(vm, host)
                )
            except SysvmError:
                await self.set_state(vm, VMState.ERROR)
                raise
            await self.set_state(vm, VMState.RUNNING, started_at=utcnow())

    async def _root_disk(self, vm: GuestVM, host: Host, progress: Progress | None) -> None:
        assert vm.template_id is not None
        copy = await self.engine.primary.ensure(vm.template_id, host, progress)
        if copy["state"] != COPIED:
            return  # a lab test host: the copy is recorded only, the domain has no disk
        async with self.engine.db.read() as s:
            t = await s.get(Template, vm.template_id)
        assert t is not None
        if t.format == "ISO":
            return
        path = await self.engine.primary.root_disk(host, copy["path"], t.format, vm.name)

        async def work(s: AsyncSession) -> None:
            row = await s.get(GuestVM, vm.id)
            assert row is not None
            row.disk_path = path

        await self.engine.db.write(work)
        vm.disk_path = path

    async def stop(self, vm_id: int, *, force: bool = False) -> None:
        async with self.lock(vm_id):
            vm, host = await self._load(vm_id)
            if vm.state == VMState.STOPPED.value:
                return
            _require(vm, "stop", {VMState.RUNNING, VMState.ERROR, VMState.UNKNOWN})
            await self.set_state(vm, VMState.STOPPING)
            if host is not None:
                timeout = 0.0 if force else float(self.engine.config["systemvm.stop_timeout"])
                await self.engine.hypervisors.get(host.id).shutdown(vm.name, timeout=timeout)
            await self.set_state(vm, VMState.STOPPED)

    async def destroy(self, vm_id: int) -> None:
        async with self.lock(vm_id):
            vm, host = await self._load(vm_id)
            if vm.state == VMState.DESTROYED.value:
                raise Conflict(f"{vm.name} is already Destroyed")
            await self.set_state(vm, VMState.EXPUNGING)
            if host is not None:
                await self.engine.hypervisors.get(host.id).destroy(vm.name, undefine=True)

            async def release(s: AsyncSession) -> None:
                for nic in (await s.scalars(select(Nic).where(Nic.guest_vm_id == vm.id))).all():
                    await ip_allocator.release(s, nic.ip_address_id)
                    await s.delete(nic)

            await self.engine.db.write(release)
            await self.set_state(vm, VMState.DESTROYED)

    def domain_xml(self, vm: GuestVM, host: Host, *, runstate: int | None = None) -> str:
        spec = DomainSpec(
            name=vm.name,
            uuid=vm.uuid,
            domain_type="test" if host.uri.startswith("test:") else "kvm",
            memory_mib=512,
            vcpus=1,
            nics=[NicSpec(n.role, n.mac, BRIDGES[NicRole.GUEST]) for n in vm.nics],
            vnc_listen=host.vnc_listen,
            disk_path=vm.disk_path,
        )
        return build_domain_xml(spec, runstate=runstate)

    async def set_state(self, vm: GuestVM, state: VMState, **extra: Any) -> None:
        async def work(s: AsyncSession) -> None:
            row = await s.get(GuestVM, vm.id)
            assert row is not None
            row.state = state.value
            for k, v in extra.items():
                setattr(row, k, v)
            if state in (VMState.STARTING, VMState.RUNNING, VMState.STOPPING, VMState.STOPPED):
                # the network was in use until now: its router's idle clock starts here
                net = await s.get(GuestNetwork, vm.network_id)
                if net is not None:
                    net.last_active_at = utcnow()

        await self.engine.db.write(work)
        vm.state = state.value
        self.engine.bus.publish(
            "guest_vm", vm.id, "updated", vm.name, state=state.value, network_id=vm.network_id
        )

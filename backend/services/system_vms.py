"""System VM provisioning: the DB record, its NICs and addresses, the domain, the boot, the agent.

This is the one code path that creates and starts SSVMs, CPVMs and routers; the lab and the
reconcilers both call it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import ip_allocator
from backend.db.models import (
    GuestNetwork,
    GuestVM,
    Host,
    HostState,
    IpRange,
    Nic,
    NicRole,
    Pod,
    SystemVM,
    SystemVMType,
    Template,
    VMState,
    Zone,
    utcnow,
)
from backend.errors import Conflict, NotFound, SysvmError
from backend.hypervisor.domain_xml import DomainSpec, NicSpec, build_domain_xml
from backend.transport.ssh import new_host_key

if TYPE_CHECKING:
    from backend.engine.core import Engine

log = logging.getLogger(__name__)

# NIC layout per type, in device order (eth0, eth1, ...), as CloudStack lays them out.
NIC_ROLES: dict[SystemVMType, list[NicRole]] = {
    SystemVMType.SSVM: [NicRole.CONTROL, NicRole.MANAGEMENT, NicRole.PUBLIC, NicRole.STORAGE],
    SystemVMType.CPVM: [NicRole.CONTROL, NicRole.MANAGEMENT, NicRole.PUBLIC],
    SystemVMType.ROUTER: [NicRole.CONTROL, NicRole.GUEST, NicRole.PUBLIC],
}
NAME_PREFIX = {SystemVMType.SSVM: "s", SystemVMType.CPVM: "v", SystemVMType.ROUTER: "r"}
BOOT_TYPE = {
    SystemVMType.SSVM: "secstorage",
    SystemVMType.CPVM: "consoleproxy",
    SystemVMType.ROUTER: "router",
}
BRIDGES = {
    NicRole.CONTROL: "cloud0",
    NicRole.MANAGEMENT: "cloudbr0",
    NicRole.PUBLIC: "cloudbr1",
    NicRole.STORAGE: "cloudbr2",
    NicRole.GUEST: "cloudbr3",
}
MEMORY_MIB = {SystemVMType.SSVM: 1024, SystemVMType.CPVM: 1024, SystemVMType.ROUTER: 512}


def mac_for(role: NicRole, ip: str, vm_id: int, device: int) -> str:
    """A stable MAC: 0e prefix for control (link-local), 1e/06 for others, from the VM id."""
    prefix = {NicRole.CONTROL: 0x0E, NicRole.PUBLIC: 0x1E}.get(role, 0x06)
    b = ((vm_id & 0xFFFFFF) << 8 | device).to_bytes(4, "big")
    kind = 0x00 if role == NicRole.CONTROL else 0x01
    return ":".join(f"{x:02x}" for x in (prefix, kind, *b))


async def _range(
    s: AsyncSession, zone_id: int, role: NicRole, network_id: int | None = None
) -> IpRange:
    q = select(IpRange).where(IpRange.zone_id == zone_id, IpRange.purpose == role.value)
    if network_id is not None:
        q = q.where(IpRange.network_id == network_id)
    rng = (await s.scalars(q.limit(1))).first()
    if rng is None:
        raise Conflict(f"zone {zone_id} has no {role.value} IP range; add one first")
    return rng


def _netmask(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr, strict=False).netmask)


class SystemVMService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._locks: dict[int, asyncio.Lock] = {}

    def lock(self, vm_id: int) -> asyncio.Lock:
        """Actions on one VM are serialized through its lock."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def create(
        self, zone_id: int, vm_type: SystemVMType, *, network_id: int | None = None
    ) -> int:
        """Record a new system VM with its NICs, addresses, host key and boot args (Stopped)."""
        private_key, public_key = await asyncio.to_thread(new_host_key)

        async def work(s: AsyncSession) -> tuple[int, str, str]:
            zone = await s.get(Zone, zone_id)
            if zone is None:
                raise NotFound(f"zone {zone_id} does not exist")
            host = await self._pick_host(s, zone_id)
            template = (
                await s.scalars(
                    select(Template).where(Template.zone_id == zone_id, Template.is_system)
                )
            ).first()
            vm = SystemVM(
                name=f"pending-{uuid.uuid4()}",
                type=vm_type.value,
                zone_id=zone_id,
                host_id=host.id,
                template_id=template.id if template else None,
                network_id=network_id,
                state=VMState.STOPPED.value,
                host_key_private=private_key,
                host_key_public=public_key,
                uuid=str(uuid.uuid4()),
            )
            s.add(vm)
            await s.flush()
            vm.name = f"{NAME_PREFIX[vm_type]}-{vm.id}-VM"
            network = await s.get(GuestNetwork, network_id) if network_id else None
            nics = []
            for device, role in enumerate(NIC_ROLES[vm_type]):
                nics.append(await self._nic(s, vm, zone_id, role, device, network))
            vm.boot_args = await self._boot_args(s, vm, zone, nics, network)
            s.add_all(nics)
            await s.flush()
            return vm.id, vm.name, host.name

        vm_id, name, host_name = await self.engine.db.write(work)
        self.engine.bus.publish(
            "system_vm",
            vm_id,
            "created",
            name,
            type=vm_type.value,
            state=VMState.STOPPED.value,
            zone_id=zone_id,
            host=host_name,
            network_id=network_id,
        )
        return vm_id

    async def _pick_host(self, s: AsyncSession, zone_id: int) -> Host:
        """The Up host of the zone running the fewest system VMs."""
        load = (
            select(SystemVM.host_id, func.count().label("n"))
            .where(SystemVM.state != VMState.DESTROYED.value)
            .group_by(SystemVM.host_id)
            .subquery()
        )
        host = (
            await s.scalars(
                select(Host)
                .outerjoin(load, load.c.host_id == Host.id)
                .where(Host.zone_id == zone_id, Host.state == HostState.UP.value)
                .order_by(func.coalesce(load.c.n, 0), Host.id)
                .limit(1)
            )
        ).first()
        if host is None:
            raise Conflict(f"zone {zone_id} has no host in state Up to place a system VM on")
        return host

    async def _nic(
        self,
        s: AsyncSession,
        vm: SystemVM,
        zone_id: int,
        role: NicRole,
        device: int,
        network: GuestNetwork | None,
    ) -> Nic:
        holder = f"{vm.name}/eth{device}"
        if role == NicRole.GUEST:
            assert network is not None, "a router needs its guest network"
            rng = await _range(s, zone_id, role, network.id)
            # The router is the network's gateway.
            ip, addr_id = network.gateway, None
        elif role == NicRole.PUBLIC and network is not None and network.source_nat_ip:
            rng = await _range(s, zone_id, role)
            ip, addr_id = network.source_nat_ip, None
        else:
            rng = await _range(s, zone_id, role)
            addr = await ip_allocator.allocate(s, rng, holder)
            ip, addr_id = addr.address, addr.id
        return Nic(
            system_vm_id=vm.id,
            device_id=device,
            role=role.value,
            mac=mac_for(role, ip, vm.id, device),
            ip=ip,
            netmask=_netmask(rng.cidr),
            gateway=rng.gateway,
            network_id=network.id if role == NicRole.GUEST and network else None,
            ip_address_id=addr_id,
        )

    async def _boot_args(
        self,
        s: AsyncSession,
        vm: SystemVM,
        zone: Zone,
        nics: list[Nic],
        network: GuestNetwork | None,
    ) -> dict[str, str]:
        pod = (await s.scalars(select(Pod).where(Pod.zone_id == zone.id).limit(1))).first()
        args: dict[str, str] = {
            "template": "domP",
            "type": BOOT_TYPE[SystemVMType(vm.type)],
            "name": vm.name,
            "zone": str(zone.id),
            "pod": str(pod.id if pod else 0),
            "guid": vm.uuid,
        }
        for nic in nics:
            args[f"eth{nic.device_id}ip"] = nic.ip
            args[f"eth{nic.device_id}mask"] = nic.netmask
            if nic.role == NicRole.PUBLIC.value:
                args["gateway"] = nic.gateway
                args["public.network.device"] = f"eth{nic.device_id}"
            if nic.role == NicRole.MANAGEMENT.value:
                args["localgw"] = nic.gateway
                args["private.network.device"] = f"eth{nic.device_id}"
            if nic.role == NicRole.STORAGE.value:
                args["storageip"] = nic.ip
                args["storagenetmask"] = nic.netmask
        if network is not None:
            args["guestcidr"] = network.cidr
            args["domain"] = f"{network.name}.cloud.internal"
        args["dns1"] = zone.dns or "192.0.2.53"
        return args

    async def start(self, vm_id: int) -> None:
        """Define and start the domain on its host, boot the guest, wait for its agent: Running."""
        async with self.lock(vm_id):
            await self._start_locked(vm_id)

    async def _start_locked(self, vm_id: int) -> None:
        vm, host = await self._load(vm_id)
        if vm.state == VMState.RUNNING.value:
            return
        if vm.state == VMState.DESTROYED.value:
            raise Conflict(f"{vm.name} is Destroyed; it cannot be started")
        if host is None or host.state != HostState.UP.value:
            raise Conflict(f"{vm.name}: its host is not Up; migrate it or wait for the host")
        await self.set_state(vm, VMState.STARTING)
        try:
            conn = self.engine.hypervisors.get(host.id)
            await conn.define_and_start(vm.name, self.domain_xml(vm, host))
            await self.engine.guests.boot(vm)
            await self.wait_for_agent(vm)
        except (SysvmError, OSError) as exc:
            await self.set_state(vm, VMState.ERROR, last_error=str(exc))
            raise
        await self.set_state(vm, VMState.RUNNING, started_at=utcnow(), last_error="")

    def domain_xml(self, vm: SystemVM, host: Host, *, runstate: int | None = None) -> str:
        spec = DomainSpec(
            name=vm.name,
            uuid=vm.uuid,
            domain_type="test" if host.uri.startswith("test:") else "kvm",
            memory_mib=MEMORY_MIB[SystemVMType(vm.type)],
            vcpus=1,
            nics=[NicSpec(n.role, n.mac, BRIDGES[NicRole(n.role)]) for n in vm.nics],
            vnc_listen=host.vnc_listen,
            boot_args=vm.boot_args,
            vm_type=vm.type,
        )
        return build_domain_xml(spec, runstate=runstate)

    async def wait_for_agent(self, vm: SystemVM, *, timeout: float | None = None) -> dict[str, Any]:
        """Poll the guest's SSH agent (strict host key) until it answers `status`."""
        deadline = time.monotonic() + (
            timeout
            if timeout is not None
            else float(self.engine.config["lab.boot_delay"]) + self.engine.agent_timeout
        )
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            endpoint = self.engine.guests.ssh_endpoint(vm)
            if endpoint is not None:
                try:
                    result = await self.engine.transport.run(
                        endpoint[0], endpoint[1], vm.host_key_public, "sysvm-appliance status"
                    )
                    if result.exit_status == 0:
                        import json

                        return dict(json.loads(result.stdout))
                    last_error = f"status exited {result.exit_status}: {result.stderr.strip()}"
                except SysvmError as exc:
                    last_error = str(exc)
            await asyncio.sleep(0.1)
        raise SysvmError(f"{vm.name}: its agent did not answer over SSH in time ({last_error})")

    async def stop(self, vm_id: int) -> None:
        async with self.lock(vm_id):
            vm, host = await self._load(vm_id)
            if vm.state in (VMState.STOPPED.value, VMState.DESTROYED.value):
                return
            await self.set_state(vm, VMState.STOPPING)
            await self.engine.guests.halt(vm)
            if host is not None:
                await self.engine.hypervisors.get(host.id).destroy(vm.name)
            await self.set_state(vm, VMState.STOPPED)

    async def _load(self, vm_id: int) -> tuple[SystemVM, Host | None]:
        from sqlalchemy.orm import selectinload

        async with self.engine.db.read() as s:
            vm = (
                await s.scalars(
                    select(SystemVM)
                    .where(SystemVM.id == vm_id)
                    .options(selectinload(SystemVM.nics))
                )
            ).first()
            if vm is None:
                raise NotFound(f"system VM {vm_id} does not exist")
            host = await s.get(Host, vm.host_id) if vm.host_id else None
            return vm, host

    async def set_state(self, vm: SystemVM, state: VMState, **extra: Any) -> None:
        async def work(s: AsyncSession) -> None:
            row = await s.get(SystemVM, vm.id)
            assert row is not None
            row.state = state.value
            for k, v in extra.items():
                setattr(row, k, v)

        await self.engine.db.write(work)
        vm.state = state.value
        fields = {"state": state.value, "type": vm.type, "zone_id": vm.zone_id}
        if "last_error" in extra:
            fields["last_error"] = extra["last_error"]
        self.engine.bus.publish("system_vm", vm.id, "updated", vm.name, **fields)

    async def running_in_zone(self, zone_id: int, vm_type: SystemVMType) -> list[SystemVM]:
        async with self.engine.db.read() as s:
            return list(
                (
                    await s.scalars(
                        select(SystemVM).where(
                            SystemVM.zone_id == zone_id,
                            SystemVM.type == vm_type.value,
                            SystemVM.state != VMState.DESTROYED.value,
                        )
                    )
                ).all()
            )

    async def ensure_zone_vm(self, zone_id: int, vm_type: SystemVMType) -> int:
        """At least one Running VM of this type in the zone: start a stopped one or create one."""
        existing = await self.running_in_zone(zone_id, vm_type)
        if any(v.state == VMState.RUNNING.value for v in existing):
            return next(v.id for v in existing if v.state == VMState.RUNNING.value)
        vm_id = existing[0].id if existing else await self.create(zone_id, vm_type)
        await self.start(vm_id)
        return vm_id

    async def ensure_router(self, network_id: int) -> int:
        """The network's router exists and runs (created on the network's first VM start)."""
        async with self.engine.db.read() as s:
            net = await s.get(GuestNetwork, network_id)
            if net is None:
                raise NotFound(f"network {network_id} does not exist")
            router = (
                await s.scalars(
                    select(SystemVM).where(
                        SystemVM.network_id == network_id,
                        SystemVM.state != VMState.DESTROYED.value,
                    )
                )
            ).first()
        vm_id = (
            router.id
            if router
            else await self.create(net.zone_id, SystemVMType.ROUTER, network_id=network_id)
        )
        await self.start(vm_id)
        return vm_id


class GuestVMService:
    """Guest VMs (instances): deploy on a network, start (its router first), stop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def deploy(self, network_id: int, name: str) -> int:
        async def work(s: AsyncSession) -> tuple[int, str]:
            net = await s.get(GuestNetwork, network_id)
            if net is None:
                raise NotFound(f"network {network_id} does not exist")
            existing = (await s.scalars(select(GuestVM).where(GuestVM.name == name))).first()
            if existing is not None:
                return existing.id, existing.state
            host = await SystemVMService(self.engine)._pick_host(s, net.zone_id)
            vm = GuestVM(
                name=name,
                zone_id=net.zone_id,
                network_id=net.id,
                host_id=host.id,
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
            return vm.id, vm.state

        vm_id, state = await self.engine.db.write(work)
        self.engine.bus.publish(
            "guest_vm", vm_id, "created", name, state=state, network_id=network_id
        )
        return vm_id

    async def start(self, vm_id: int) -> None:
        from sqlalchemy.orm import selectinload

        async with self.engine.db.read() as s:
            vm = (
                await s.scalars(
                    select(GuestVM).where(GuestVM.id == vm_id).options(selectinload(GuestVM.nics))
                )
            ).first()
            if vm is None:
                raise NotFound(f"guest VM {vm_id} does not exist")
            host = await s.get(Host, vm.host_id) if vm.host_id else None
        if vm.state == VMState.RUNNING.value:
            return
        if host is None:
            raise Conflict(f"{vm.name} has no host")
        await self.engine.system_vms.ensure_router(vm.network_id)
        await self._set_state(vm, VMState.STARTING)
        try:
            await self.engine.hypervisors.get(host.id).define_and_start(
                vm.name, self.domain_xml(vm, host)
            )
        except SysvmError:
            await self._set_state(vm, VMState.ERROR)
            raise
        await self._set_state(vm, VMState.RUNNING, started_at=utcnow())

    def domain_xml(self, vm: GuestVM, host: Host, *, runstate: int | None = None) -> str:
        spec = DomainSpec(
            name=vm.name,
            uuid=vm.uuid,
            domain_type="test" if host.uri.startswith("test:") else "kvm",
            memory_mib=512,
            vcpus=1,
            nics=[NicSpec(n.role, n.mac, BRIDGES[NicRole.GUEST]) for n in vm.nics],
            vnc_listen=host.vnc_listen,
        )
        return build_domain_xml(spec, runstate=runstate)

    async def _set_state(self, vm: GuestVM, state: VMState, **extra: Any) -> None:
        async def work(s: AsyncSession) -> None:
            row = await s.get(GuestVM, vm.id)
            assert row is not None
            row.state = state.value
            for k, v in extra.items():
                setattr(row, k, v)
            if state == VMState.RUNNING:
                net = await s.get(GuestNetwork, vm.network_id)
                if net is not None:
                    net.last_active_at = utcnow()

        await self.engine.db.write(work)
        vm.state = state.value
        self.engine.bus.publish(
            "guest_vm", vm.id, "updated", vm.name, state=state.value, network_id=vm.network_id
        )

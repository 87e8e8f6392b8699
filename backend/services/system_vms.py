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
from sqlalchemy.orm import selectinload

from backend.db import ip_allocator
from backend.db.models import (
    GuestNetwork,
    Host,
    HostState,
    ImageStore,
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


def _require(vm: Any, action: str, allowed: set[VMState]) -> None:
    """Refuse `action` on a VM in a state it cannot be done from, saying why."""
    if VMState(vm.state) not in allowed:
        states = ", ".join(sorted(s.value for s in allowed))
        raise Conflict(f"cannot {action} {vm.name}: it is {vm.state} (possible when {states})")


def _netmask(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr, strict=False).netmask)


class SystemVMService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._locks: dict[int, asyncio.Lock] = {}
        self._network_locks: dict[int, asyncio.Lock] = {}

    def lock(self, vm_id: int) -> asyncio.Lock:
        """Actions on one VM are serialized through its lock."""
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def create(
        self, zone_id: int, vm_type: SystemVMType, *, network_id: int | None = None
    ) -> int:
        """Record a new system VM with its NICs, addresses, host key and boot args (Stopped)."""
        private_key, public_key = await asyncio.to_thread(new_host_key)

        async def work(s: AsyncSession) -> tuple[int, str, str, str]:
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
            vm.name = f"{NAME_PREFIX[vm_type]}-{vm.id}-{self.engine.config['instance.name']}"
            network = await s.get(GuestNetwork, network_id) if network_id else None
            nics = []
            for device, role in enumerate(NIC_ROLES[vm_type]):
                nics.append(await self._nic(s, vm, zone_id, role, device, network))
            vm.boot_args = await self._boot_args(s, vm, zone, nics, network)
            s.add_all(nics)
            await s.flush()
            control = next(n.ip for n in nics if n.role == NicRole.CONTROL.value)
            return vm.id, vm.name, host.name, control

        vm_id, name, host_name, control_ip = await self.engine.db.write(work)
        self.engine.bus.publish(
            "system_vm",
            vm_id,
            "created",
            name,
            type=vm_type.value,
            state=VMState.STOPPED.value,
            zone_id=zone_id,
            host=host_name,
            control_ip=control_ip,
            network_id=network_id,
        )
        return vm_id

    async def _pick_host(
        self, s: AsyncSession, zone_id: int, *, exclude: set[int] | None = None
    ) -> Host:
        """The Up host of the zone running the fewest system VMs (not one of `exclude`)."""
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
                .where(
                    Host.zone_id == zone_id,
                    Host.state == HostState.UP.value,
                    Host.id.not_in(exclude or set()),
                )
                .order_by(func.coalesce(load.c.n, 0), Host.id)
                .limit(1)
            )
        ).first()
        if host is None:
            raise Conflict(
                f"zone {zone_id} has no {'other ' if exclude else ''}host in state Up "
                "to place a VM on"
            )
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

    async def start(self, vm_id: int, *, host_id: int | None = None) -> None:
        """Define and start the domain on its host (or `host_id`), boot the guest, wait for its
        agent: Running. Starting a Running VM is a no-op."""
        async with self.lock(vm_id):
            await self._start_locked(vm_id, host_id)

    async def _start_locked(self, vm_id: int, host_id: int | None = None) -> None:
        vm, host = await self._load(vm_id)
        if vm.state == VMState.RUNNING.value and host_id in (None, vm.host_id):
            return
        _require(vm, "start", {VMState.STOPPED, VMState.ERROR, VMState.UNKNOWN, VMState.RUNNING})
        if host_id is not None and host_id != vm.host_id:
            host = await self._move(vm, host_id)
        if host is None or host.state != HostState.UP.value:
            raise Conflict(
                f"{vm.name}: its host {host.name if host else '(none)'} is not Up; "
                "migrate it or wait for the host"
            )
        await self.set_state(vm, VMState.STARTING, last_error="")
        try:
            conn = self.engine.hypervisors.get(host.id)
            await conn.define_and_start(vm.name, self.domain_xml(vm, host))
            await self.engine.system_vms.boot_guest(vm)
            await self.wait_for_agent(vm)
            if vm.type == SystemVMType.ROUTER.value and vm.network_id is not None:
                # the router serves nothing before its network's rules are live again
                await self.engine.routers.push_current(vm.network_id)
        except (SysvmError, OSError) as exc:
            await self.set_state(vm, VMState.ERROR, last_error=str(exc))
            raise
        await self.set_state(vm, VMState.RUNNING, started_at=utcnow(), last_error="")

    async def _move(self, vm: SystemVM, host_id: int) -> Host:
        """Record that `vm` now lives on `host_id` (its domain is defined there on start)."""

        async def work(s: AsyncSession) -> Host:
            host = await s.get(Host, host_id)
            if host is None:
                raise NotFound(f"host {host_id} does not exist")
            if host.zone_id != vm.zone_id:
                raise Conflict(f"{host.name} is not in the zone of {vm.name}")
            row = await s.get(SystemVM, vm.id)
            assert row is not None
            row.host_id = host.id
            return host

        host = await self.engine.db.write(work)
        vm.host_id = host.id
        self.engine.bus.publish("system_vm", vm.id, "updated", vm.name, host=host.name)
        return host

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

    async def stop(self, vm_id: int, *, force: bool = False) -> None:
        """Shut the guest down gracefully, power it off after `systemvm.stop_timeout` (at once
        with `force`): Stopping -> Stopped. Stopping a Stopped VM is a no-op."""
        async with self.lock(vm_id):
            vm, host = await self._load(vm_id)
            if vm.state == VMState.STOPPED.value:
                return
            _require(vm, "stop", {VMState.RUNNING, VMState.ERROR, VMState.UNKNOWN})
            await self.set_state(vm, VMState.STOPPING)
            await self.engine.guests.halt(vm)
            if host is not None:
                conn = self.engine.hypervisors.get(host.id)
                timeout = 0.0 if force else float(self.engine.config["systemvm.stop_timeout"])
                try:
                    await conn.shutdown(vm.name, timeout=timeout)
                except SysvmError as exc:
                    await self.set_state(vm, VMState.ERROR, last_error=str(exc))
                    raise
            await self.set_state(vm, VMState.STOPPED)

    async def reboot(self, vm_id: int) -> None:
        """Restart the guest in place: Running -> Stopping -> Starting -> Running."""
        async with self.lock(vm_id):
            vm, host = await self._load(vm_id)
            _require(vm, "reboot", {VMState.RUNNING})
            assert host is not None
            await self.set_state(vm, VMState.STOPPING)
            await self.engine.guests.halt(vm)
            await self.set_state(vm, VMState.STARTING)
            try:
                await self.engine.hypervisors.get(host.id).reboot(vm.name)
                await self.engine.system_vms.boot_guest(vm)
                await self.wait_for_agent(vm)
            except (SysvmError, OSError) as exc:
                await self.set_state(vm, VMState.ERROR, last_error=str(exc))
                raise
            await self.set_state(vm, VMState.RUNNING, started_at=utcnow())

    async def destroy(self, vm_id: int) -> None:
        """Power off, forget the domain, give back its addresses: -> Expunging -> Destroyed.
        The zone's reconciler then creates a replacement where one is required."""
        async with self.lock(vm_id):
            vm, host = await self._load(vm_id)
            if vm.state == VMState.DESTROYED.value:
                raise Conflict(f"{vm.name} is already Destroyed")
            _require(
                vm,
                "destroy",
                {
                    VMState.RUNNING,
                    VMState.STOPPED,
                    VMState.ERROR,
                    VMState.UNKNOWN,
                    VMState.EXPUNGING,
                },
            )
            await self.set_state(vm, VMState.EXPUNGING)
            await self.engine.guests.halt(vm)
            if host is not None:
                try:
                    await self.engine.hypervisors.get(host.id).destroy(vm.name, undefine=True)
                except SysvmError as exc:
                    # An unreachable host keeps its copy; host recovery removes it later.
                    log.warning("%s: domain left on %s: %s", vm.name, host.name, exc)

            async def release(s: AsyncSession) -> None:
                for nic in (await s.scalars(select(Nic).where(Nic.system_vm_id == vm.id))).all():
                    await ip_allocator.release(s, nic.ip_address_id)
                    await s.delete(nic)

            await self.engine.db.write(release)
            await self.set_state(vm, VMState.DESTROYED)

    async def migrate(self, vm_id: int, to_host_id: int | None = None) -> str:
        """Move a Running VM to another Up host of its zone (the least loaded by default):
        Running -> Migrating -> Running. Returns the new host's name."""
        async with self.lock(vm_id):
            vm, source = await self._load(vm_id)
            _require(vm, "migrate", {VMState.RUNNING})
            assert source is not None
            async with self.engine.db.read() as s:
                if to_host_id is None:
                    target = await self._pick_host(s, vm.zone_id, exclude={source.id})
                else:
                    found = await s.get(Host, to_host_id)
                    if found is None:
                        raise NotFound(f"host {to_host_id} does not exist")
                    target = found
            if target.id == source.id:
                raise Conflict(f"{vm.name} already runs on {target.name}")
            if target.zone_id != vm.zone_id:
                raise Conflict(f"{target.name} is in another zone than {vm.name}")
            if target.state != HostState.UP.value:
                raise Conflict(f"{target.name} is {target.state}, not Up")
            await self.set_state(vm, VMState.MIGRATING)
            try:
                await self.engine.hypervisors.migrate(
                    vm.name, source.id, target.id, self.domain_xml(vm, target)
                )
            except SysvmError as exc:
                await self.set_state(vm, VMState.RUNNING, last_error=f"migration failed: {exc}")
                raise
            await self._move(vm, target.id)
            await self.set_state(vm, VMState.RUNNING)
            return target.name

    async def boot_guest(self, vm: SystemVM) -> None:
        """Boot the VM's guest; an SSVM's guest mounts its zone's image store."""
        store_root = None
        if vm.type == SystemVMType.SSVM.value:
            async with self.engine.db.read() as s:
                store_root = await s.scalar(
                    select(ImageStore.path).where(ImageStore.zone_id == vm.zone_id).limit(1)
                )
        await self.engine.guests.boot(vm, store_root=store_root)

    async def id_by_name(self, name: str) -> int:
        async with self.engine.db.read() as s:
            vm_id = await s.scalar(select(SystemVM.id).where(SystemVM.name == name))
        if vm_id is None:
            raise NotFound(f"no system VM named {name!r}; `sysvm systemvm list` shows them")
        return int(vm_id)

    async def _load(self, vm_id: int) -> tuple[SystemVM, Host | None]:
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

    async def ensure_router(self, network_id: int) -> int:
        """The network's router exists and runs (created on the network's first VM start)."""
        async with self._network_locks.setdefault(network_id, asyncio.Lock()):
            return await self._ensure_router(network_id)

    async def _ensure_router(self, network_id: int) -> int:
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

"""The embedded lab: a demo cloud on libvirt test-driver hosts, built idempotently.

Back ends (`lab up --backend`): `local` (every system VM's guest is an SSH endpoint of the lab's
guest host on loopback) and `netns` (root: routers are network namespaces with real sshd,
iptables, dnsmasq and haproxy, guest VMs are namespaces too; see `backend.lab.netns`).

Names are fixed (`zone1`, `zone1-host1`, `zone1-net1`, `zone1-net1-vm1`) so screenshots and tests
are deterministic. Each host is its own `test:///<file>.xml` instance held by the engine; the file
is rewritten from the database when the engine starts, so domains survive an engine restart the
way they survive a management-server restart on real hosts.

Address plan per zone k (nothing here is ever routed; see DESIGN.md):
control 169.254.k.0/24 (link-local), management 10.k.0.0/24, storage 10.k.1.0/24,
public 203.0.113.0/24, 198.51.100.0/24, 192.0.2.0/24 for zones 1-3 (documentation ranges), then
198.18.0.0/15 (benchmarking range) slices; guest network n: 10.k.(100+n).0/24.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from backend.db import ip_allocator
from backend.db.models import (
    GuestNetwork,
    GuestVM,
    Host,
    ImageStore,
    IpRange,
    NetworkState,
    NicRole,
    Pod,
    PrimaryStorage,
    SystemVM,
    SystemVMType,
    Template,
    TemplateState,
    VMState,
    Zone,
)
from backend.engine.jobs import JobContext
from backend.errors import InvalidInput, SysvmError
from backend.hypervisor.domain_xml import lab_node_xml
from backend.lab import netns

if TYPE_CHECKING:
    from backend.engine.core import Engine

log = logging.getLogger(__name__)

MAX_ZONES = 254
DOC_RANGES = ["203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24"]
RUNSTATE_RUNNING, RUNSTATE_SHUTOFF = 1, 5
BACKENDS = ("local", "netns")
LAB_HOST_BACKENDS = BACKENDS


def public_cidr(k: int) -> str:
    if k <= len(DOC_RANGES):
        return DOC_RANGES[k - 1]
    base = int(ipaddress.ip_address("198.18.0.0")) + (k - len(DOC_RANGES)) * 256
    return f"{ipaddress.ip_address(base)}/24"


def _span(cidr: str, first: int, last: int) -> tuple[str, str, str]:
    net = ipaddress.ip_network(cidr)
    return str(net[first]), str(net[last]), str(net[1])


class LabCloud:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.root = engine.home / "lab"

    def host_file(self, name: str) -> Path:
        return self.root / "hosts" / f"{name}.xml"

    @staticmethod
    def validate(zones: int, hosts: int, networks: int, vms: int, backend: str = "local") -> None:
        if backend not in BACKENDS:
            raise InvalidInput("backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
        for field, value, low, high in (
            ("zones", zones, 1, len(DOC_RANGES) if backend == "netns" else MAX_ZONES),
            ("hosts", hosts, 1, 64),
            ("networks", networks, 0, 150),
            ("vms", vms, 0, 250),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(field, f"must be an integer, got {value!r}")
            if not low <= value <= high:
                raise InvalidInput(field, f"must be between {low} and {high}, got {value}")

    async def up(self, ctx: JobContext) -> dict[str, Any]:
        """Create what is missing, then converge: system VMs, routers and guest VMs Running."""
        p = ctx.params
        zones, hosts, networks, vms = p["zones"], p["hosts"], p["networks"], p["vms"]
        backend = str(p.get("backend", "local"))
        self.validate(zones, hosts, networks, vms, backend)
        await self._check_backend(backend, zones)
        await ctx.progress(0, message="recording the lab's zones, hosts and networks", force=True)
        for k in range(1, zones + 1):
            await self.engine.db.write(
                functools.partial(
                    self._ensure_zone, k=k, hosts=hosts, networks=networks, backend=backend
                )
            )
            await ctx.progress(10 * k / zones, message=f"recorded zone{k}")
        await self.attach_hosts()
        zone_ids = await self._lab_zone_ids(limit=zones)
        net_ids: list[tuple[int, list[str]]] = []
        async with self.engine.db.read() as s:
            for net in (
                await s.scalars(
                    select(GuestNetwork)
                    .where(GuestNetwork.zone_id.in_(zone_ids))
                    .order_by(GuestNetwork.id)
                )
            ).all():
                net_ids.append((net.id, [f"{net.name}-vm{v}" for v in range(1, vms + 1)]))
        for net_id, names in net_ids:
            for name in names:
                await self.engine.guest_vms.deploy(net_id, name)

        # The zone reconciler brings up each zone's SSVM and CPVM; the lab waits for it.
        self.engine.reconciler.poke()
        total = len(zone_ids) * 2 + sum(len(n) for _, n in net_ids)
        done = 0
        limit = asyncio.Semaphore(16)

        async def step(coro: Any, what: str, weight: int) -> None:
            nonlocal done
            async with limit:
                await coro
            done += weight
            await ctx.progress(10 + 90 * done / max(total, 1), message=what)

        await asyncio.gather(
            *(
                step(self.engine.reconciler.reconcile_zone(zid), "zone system VMs up", 2)
                for zid in zone_ids
            )
        )
        await asyncio.gather(
            *(step(self._start_network(names), "network up", len(names)) for _, names in net_ids)
        )
        await self._wait_converged(zone_ids)
        if backend == "netns":
            await ctx.progress(98, message="plugging guest VMs into their networks")
            await self.plug_guest_vms()
        summary = {
            "zones": len(zone_ids),
            "networks": len(net_ids),
            "vms": sum(len(n) for _, n in net_ids),
        }
        await ctx.progress(100, message="lab converged", force=True)
        return summary

    async def _wait_converged(self, zone_ids: list[int], timeout: float = 120.0) -> None:
        """Every zone has a Running SSVM and CPVM (the reconciler's work), or say what is not."""
        deadline = (
            asyncio.get_running_loop().time()
            + timeout
            + float(self.engine.config["lab.boot_delay"])
        )
        while True:
            async with self.engine.db.read() as s:
                rows = (
                    await s.execute(
                        select(SystemVM.zone_id, SystemVM.type).where(
                            SystemVM.zone_id.in_(zone_ids),
                            SystemVM.state == VMState.RUNNING.value,
                            SystemVM.type.in_([SystemVMType.SSVM.value, SystemVMType.CPVM.value]),
                        )
                    )
                ).all()
            have = {(z, t) for z, t in rows}
            missing = [
                f"zone {z} {t.value}"
                for z in zone_ids
                for t in (SystemVMType.SSVM, SystemVMType.CPVM)
                if (z, t.value) not in have
            ]
            if not missing:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise SysvmError(
                    "the lab did not converge: no Running "
                    + ", ".join(missing[:5])
                    + "; see `sysvm events` and engine.log"
                )
            self.engine.reconciler.poke()
            await asyncio.sleep(0.2)

    async def _start_network(self, names: list[str]) -> None:
        """Start a network's guest VMs: the first start brings its router up."""
        async with self.engine.db.read() as s:
            ids = (await s.scalars(select(GuestVM.id).where(GuestVM.name.in_(names)))).all()
        for vm_id in ids:
            await self.engine.guest_vms.start(vm_id)

    async def _lab_zone_ids(self, limit: int | None = None) -> list[int]:
        async with self.engine.db.read() as s:
            q = select(Zone.id).where(Zone.is_lab).order_by(Zone.id)
            if limit:
                q = q.limit(limit)
            return list((await s.scalars(q)).all())

    async def _check_backend(self, backend: str, zones: int) -> None:
        """The lab has one back end: refuse another than the existing lab's, or a machine
        that cannot run it (one clear line)."""
        async with self.engine.db.read() as s:
            other = await s.scalar(
                select(Host.backend).where(
                    Host.backend.in_(LAB_HOST_BACKENDS), Host.backend != backend
                )
            )
        if other is not None:
            raise InvalidInput(
                "backend", f"the lab runs the {other} back end; `sysvm lab down` first"
            )
        if backend != "netns":
            return
        problem = netns.problem()
        if problem:
            raise SysvmError(problem)
        for k in range(1, zones + 1):
            elsewhere = await netns.routed_elsewhere(public_cidr(k))
            if elsewhere:
                raise InvalidInput(
                    "zones",
                    f"zone{k}'s public range {public_cidr(k)} is routed on this machine "
                    f"({elsewhere}); use fewer zones",
                )

    async def plug_guest_vms(self) -> list[str]:
        """netns: every Running guest VM on a netns host gets its namespace (remade)."""
        async with self.engine.db.read() as s:
            ids = list(
                (
                    await s.scalars(
                        select(GuestVM.id)
                        .join(Host, Host.id == GuestVM.host_id)
                        .where(Host.backend == "netns", GuestVM.state == VMState.RUNNING.value)
                    )
                ).all()
            )
        return await self.engine.guests.plug_guests(ids) if ids else []

    async def _ensure_zone(
        self, s: AsyncSession, k: int, hosts: int, networks: int, backend: str = "local"
    ) -> None:
        name = f"zone{k}"
        zone = (await s.scalars(select(Zone).where(Zone.name == name))).first()
        if zone is None:
            zone = Zone(name=name, is_lab=True, allow_local_urls=True, dns="192.0.2.53")
            s.add(zone)
            await s.flush()
            pod = Pod(zone_id=zone.id, name=f"{name}-pod1")
            s.add(pod)
            await s.flush()
            store = self.root / "secondary" / name
            primary = self.root / "primary" / name
            store.mkdir(parents=True, exist_ok=True)
            primary.mkdir(parents=True, exist_ok=True)
            s.add(ImageStore(zone_id=zone.id, name=f"{name}-images", path=str(store)))
            s.add(
                PrimaryStorage(
                    zone_id=zone.id,
                    name=f"{name}-primary",
                    pool_name=f"{name}-primary",
                    path=str(primary),
                )
            )
            s.add(
                Template(
                    zone_id=zone.id,
                    name="systemvm-template",
                    format="QCOW2",
                    state=TemplateState.DOWNLOADED.value,
                    is_system=True,
                )
            )
            for purpose, cidr, first, last, pod_id in (
                (NicRole.CONTROL, f"169.254.{k}.0/24", 2, 254, None),
                (NicRole.MANAGEMENT, f"10.{k}.0.0/24", 10, 250, pod.id),
                (NicRole.STORAGE, f"10.{k}.1.0/24", 10, 250, pod.id),
                (NicRole.PUBLIC, public_cidr(k), 10, 250, None),
            ):
                start, end, gw = _span(cidr, first, last)
                s.add(
                    IpRange(
                        zone_id=zone.id,
                        pod_id=pod_id,
                        purpose=purpose.value,
                        cidr=cidr,
                        start_ip=start,
                        end_ip=end,
                        gateway=gw,
                    )
                )
            await s.flush()
            self.engine.bus.publish("zone", zone.id, "created", name, state=zone.state)
        pod_id = (await s.scalars(select(Pod.id).where(Pod.zone_id == zone.id))).first()
        for h in range(1, hosts + 1):
            hname = f"{name}-host{h}"
            if (await s.scalars(select(Host.id).where(Host.name == hname))).first() is None:
                host = Host(
                    zone_id=zone.id,
                    pod_id=pod_id,
                    name=hname,
                    uri=f"test://{self.host_file(hname)}",
                    backend=backend,
                )
                s.add(host)
                await s.flush()
                self.engine.bus.publish(
                    "host",
                    host.id,
                    "created",
                    hname,
                    state=host.state,
                    zone_id=zone.id,
                    uri=host.uri,
                )
        public = (
            await s.scalars(
                select(IpRange).where(
                    IpRange.zone_id == zone.id, IpRange.purpose == NicRole.PUBLIC.value
                )
            )
        ).one()
        for n in range(1, networks + 1):
            nname = f"{name}-net{n}"
            if (await s.scalars(select(GuestNetwork.id).where(GuestNetwork.name == nname))).first():
                continue
            cidr = f"10.{k}.{100 + n}.0/24"
            start, end, gw = _span(cidr, 10, 250)
            snat = await ip_allocator.allocate(s, public, f"{nname}/source-nat")
            net = GuestNetwork(
                zone_id=zone.id,
                name=nname,
                cidr=cidr,
                gateway=gw,
                vlan=1000 + k * 10 + n,
                source_nat_ip=snat.address,
                state=NetworkState.IMPLEMENTED.value,
            )
            s.add(net)
            await s.flush()
            s.add(
                IpRange(
                    zone_id=zone.id,
                    network_id=net.id,
                    purpose=NicRole.GUEST.value,
                    cidr=cidr,
                    start_ip=start,
                    end_ip=end,
                    gateway=gw,
                )
            )
            self.engine.bus.publish("network", net.id, "created", nname, cidr=cidr, zone_id=zone.id)

    async def attach_hosts(self) -> None:
        """Write each lab host's node file from the database, register it, boot running guests.

        Called on `lab up` and on engine start: a lab host "kept running" while the engine was
        down, so its domains come back in the state the database last recorded.
        """
        (self.root / "hosts").mkdir(parents=True, exist_ok=True)
        async with self.engine.db.read() as s:
            hosts = (await s.scalars(select(Host).where(Host.backend.in_(LAB_HOST_BACKENDS)))).all()
            svms = (
                await s.scalars(
                    select(SystemVM)
                    .where(SystemVM.state != VMState.DESTROYED.value)
                    .options(selectinload(SystemVM.nics))
                )
            ).all()
            gvms = (
                await s.scalars(
                    select(GuestVM)
                    .where(GuestVM.state != VMState.DESTROYED.value)
                    .options(selectinload(GuestVM.nics))
                )
            ).all()

        def runstate(state: str) -> int:
            return RUNSTATE_RUNNING if state == VMState.RUNNING.value else RUNSTATE_SHUTOFF

        for host in hosts:
            path = self.host_file(host.name)
            if host.id not in self.engine.hypervisors.known:
                domains = [
                    self.engine.system_vms.domain_xml(vm, host, runstate=runstate(vm.state))
                    for vm in svms
                    if vm.host_id == host.id
                ] + [
                    self.engine.guest_vms.domain_xml(vm, host, runstate=runstate(vm.state))
                    for vm in gvms
                    if vm.host_id == host.id
                ]
                await asyncio.to_thread(_write_file, path, lab_node_xml(domains))
            self.engine.hypervisors.add(host.id, host.name, host.uri)
        self.engine.guests.netns_hosts = {h.id for h in hosts if h.backend == "netns"}
        for vm in svms:
            if vm.state == VMState.RUNNING.value:
                await self.engine.system_vms.boot_guest(vm)
        if self.engine.guests.netns_hosts:
            try:
                await self.plug_guest_vms()
            except SysvmError as exc:  # e.g. an engine started without root: routers say so too
                log.warning("netns lab: guest VMs not plugged: %s", exc)

    async def down(self, ctx: JobContext) -> dict[str, Any]:
        """Power off and forget everything the lab made: domains, endpoints, records, files."""
        await ctx.progress(0, message="stopping lab system VMs", force=True)
        async with self.engine.db.read() as s:
            hosts = (await s.scalars(select(Host).where(Host.backend.in_(LAB_HOST_BACKENDS)))).all()
            svms = (await s.scalars(select(SystemVM))).all()
        for vm in svms:
            await self.engine.guests.halt(vm)
        for host in hosts:
            await self.engine.hypervisors.remove(host.id)
        if any(h.backend == "netns" for h in hosts):
            await ctx.progress(10, message="removing the netns lab's namespaces and links")
            await self.engine.guests.teardown()
        self.engine.guests.netns_hosts = set()
        zone_ids = await self._lab_zone_ids()

        async def work(s: AsyncSession) -> None:
            for zid in zone_ids:
                zone = await s.get(Zone, zid)
                if zone is not None:
                    await s.delete(zone)

        await self.engine.db.write(work)
        for zid in zone_ids:
            self.engine.bus.publish("zone", zid, "deleted")
        await asyncio.to_thread(shutil.rmtree, self.root, True)
        return {"zones_removed": len(zone_ids)}


def _write_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)

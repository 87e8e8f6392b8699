"""The status tree: zones -> hosts, system VMs, networks -> router and guest VMs (stable JSON)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, defer, selectinload

from backend.api.types import (
    GuestVMNode,
    HostNode,
    NetworkNode,
    RouterNode,
    StatusTree,
    SystemVMNode,
)
from backend.db.models import (
    GuestNetwork,
    GuestVM,
    Host,
    Nic,
    NicRole,
    SystemVM,
    SystemVMType,
    VMState,
    Zone,
)
from backend.db.worker import command


@command
def status_tree(s: Session) -> StatusTree:
    """Everything not Destroyed, in a handful of queries whatever the size of the cloud (a unit
    of work for `Database.run_read`: the rows of a big cloud are made into objects off the
    event loop)."""
    zones = s.scalars(select(Zone).order_by(Zone.id)).all()
    hosts = s.scalars(select(Host).order_by(Host.id)).all()
    host_names = {h.id: h.name for h in hosts}
    svms = s.scalars(
        select(SystemVM).where(SystemVM.state != VMState.DESTROYED.value).order_by(SystemVM.id)
    ).all()
    # without each network's last applied bundle (megabytes for 10,000 rules)
    nets = s.scalars(
        select(GuestNetwork)
        .options(defer(GuestNetwork.router_bundle, raiseload=True))
        .order_by(GuestNetwork.id)
    ).all()
    gvms = s.scalars(
        select(GuestVM).where(GuestVM.state != VMState.DESTROYED.value).order_by(GuestVM.id)
    ).all()
    control_ip: dict[int, str] = {}
    guest_ip: dict[int, str] = {}
    for nic in s.scalars(select(Nic)).all():
        if nic.system_vm_id is not None and nic.role == NicRole.CONTROL.value:
            control_ip[nic.system_vm_id] = nic.ip
        elif nic.guest_vm_id is not None and nic.device_id == 0:
            guest_ip[nic.guest_vm_id] = nic.ip

    hosts_by_zone: dict[int, list[HostNode]] = defaultdict(list)
    for h in hosts:
        hosts_by_zone[h.zone_id].append(
            {"id": h.id, "name": h.name, "state": h.state, "uri": h.uri}
        )
    svms_by_zone: dict[int, list[SystemVMNode]] = defaultdict(list)
    router_of: dict[int, RouterNode] = {}
    for v in svms:
        if v.type == SystemVMType.ROUTER.value and v.network_id is not None:
            router_of[v.network_id] = {"id": v.id, "name": v.name, "state": v.state, "drift": False}
        svms_by_zone[v.zone_id].append(
            {
                "id": v.id,
                "name": v.name,
                "type": v.type,
                "state": v.state,
                "host": host_names.get(v.host_id) if v.host_id else None,
                "control_ip": control_ip.get(v.id),
            }
        )
    vms_by_net: dict[int, list[GuestVMNode]] = defaultdict(list)
    for g in gvms:
        vms_by_net[g.network_id].append(
            {"id": g.id, "name": g.name, "state": g.state, "ip": guest_ip.get(g.id)}
        )
    nets_by_zone: dict[int, list[NetworkNode]] = defaultdict(list)
    for n in nets:
        router = router_of.get(n.id)
        if router is not None:
            live = n.router_live_digest
            router["drift"] = bool(live) and live != n.router_expected_live
        nets_by_zone[n.zone_id].append(
            {
                "id": n.id,
                "name": n.name,
                "cidr": n.cidr,
                "router": router,
                "vms": vms_by_net.get(n.id, []),
            }
        )
    return {
        "zones": [
            {
                "id": z.id,
                "name": z.name,
                "state": z.state,
                "hosts": hosts_by_zone.get(z.id, []),
                "system_vms": svms_by_zone.get(z.id, []),
                "networks": nets_by_zone.get(z.id, []),
            }
            for z in zones
        ]
    }


def count_objects(tree: StatusTree) -> dict[str, Any]:
    """Totals for a one-line summary."""
    zones = tree["zones"]
    return {
        "zones": len(zones),
        "hosts": sum(len(z["hosts"]) for z in zones),
        "system_vms": sum(len(z["system_vms"]) for z in zones),
        "networks": sum(len(z["networks"]) for z in zones),
        "vms": sum(len(n["vms"]) for z in zones for n in z["networks"]),
    }


@command
def system_vm_details(
    s: Session, *, zone: str | None = None, name: str | None = None
) -> list[dict[str, Any]]:
    """System VMs (not Destroyed) with everything an operator looks at: host, NICs, boot args
    (a unit of work for `Database.run_read`)."""
    q = (
        select(SystemVM, Zone.name, Host.name)
        .join(Zone, Zone.id == SystemVM.zone_id)
        .outerjoin(Host, Host.id == SystemVM.host_id)
        .where(SystemVM.state != VMState.DESTROYED.value)
        .options(selectinload(SystemVM.nics))
        .order_by(SystemVM.id)
    )
    if zone is not None:
        q = q.where(Zone.name == zone)
    if name is not None:
        q = q.where(SystemVM.name == name)
    nets = {i: n for i, n in s.execute(select(GuestNetwork.id, GuestNetwork.name)).all()}
    out = []
    for vm, zone_name, host_name in s.execute(q).all():
        out.append(
            {
                "id": vm.id,
                "name": vm.name,
                "type": vm.type,
                "state": vm.state,
                "zone": zone_name,
                "host": host_name,
                "network": nets.get(vm.network_id) if vm.network_id else None,
                "control_ip": next(
                    (n.ip for n in vm.nics if n.role == NicRole.CONTROL.value), None
                ),
                "started_at": vm.started_at.isoformat(timespec="seconds")
                if vm.started_at
                else None,
                "last_error": vm.last_error,
                "boot_args": vm.boot_args,
                "nics": [
                    {
                        "device": f"eth{n.device_id}",
                        "role": n.role,
                        "ip": n.ip,
                        "netmask": n.netmask,
                        "mac": n.mac,
                    }
                    for n in vm.nics
                ],
            }
        )
    return out

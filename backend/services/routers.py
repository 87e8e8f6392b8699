"""A network's router as desired state: its rules (validated against the network and each other),
the versioned bundle built from them, and what the router last reported to be live.

Rules are stored normalized (`to_fields()`); nothing invalid is ever stored, so a bundle built
from the database always validates.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db.models import GuestNetwork, Nic, NicRole, RouterRule, SystemVM, VMState, VpnUser
from backend.errors import InvalidInput, NotFound
from backend.router.bundle import BundleNetwork, RouterAddresses, RouterBundle
from backend.router.rules import NetworkContext, Rule, parse_rule, parse_rule_alone

if TYPE_CHECKING:
    from backend.engine.core import Engine


def _context(net: GuestNetwork, rows: list[RouterRule], users: list[VpnUser]) -> NetworkContext:
    base = NetworkContext(
        cidr=net.cidr,
        gateway=net.gateway,
        public_ips=frozenset({net.source_nat_ip} - {""}),
        source_nat_ip=net.source_nat_ip,
        vpn_usernames=frozenset(u.username for u in users),
    )
    parsed: dict[int, Rule] = {r.id: parse_rule_alone(r.type, r.fields, base) for r in rows}
    return NetworkContext(
        cidr=net.cidr,
        gateway=net.gateway,
        public_ips=base.public_ips,
        rules=parsed,
        source_nat_ip=net.source_nat_ip,
        vpn_usernames=base.vpn_usernames,
    )


class RouterService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def _network(self, s: AsyncSession, name: str) -> GuestNetwork:
        net = (await s.scalars(select(GuestNetwork).where(GuestNetwork.name == name))).first()
        if net is None:
            raise NotFound(f"no network named {name!r}; `sysvm status` lists them")
        return net

    async def _rows(self, s: AsyncSession, net_id: int) -> tuple[list[RouterRule], list[VpnUser]]:
        rules = list(
            (
                await s.scalars(
                    select(RouterRule)
                    .where(RouterRule.network_id == net_id)
                    .order_by(RouterRule.id)
                )
            ).all()
        )
        users = list((await s.scalars(select(VpnUser).where(VpnUser.network_id == net_id))).all())
        return rules, users

    async def add_rule(self, network: str, rule_type: str, fields: object) -> dict[str, Any]:
        """Validate and store one rule; nothing is stored when any field is wrong."""
        if not isinstance(fields, dict):
            raise InvalidInput("fields", "must be an object of rule fields")

        async def work(s: AsyncSession) -> tuple[int, dict[str, Any], int]:
            net = await self._network(s, network)
            rows, users = await self._rows(s, net.id)
            rule = parse_rule(rule_type, fields, _context(net, rows, users))
            row = RouterRule(network_id=net.id, type=rule_type, fields=rule.to_fields())
            s.add(row)
            await s.flush()
            return row.id, row.fields, net.id

        rule_id, stored, net_id = await self.engine.db.write(work)
        self.engine.bus.publish(
            "router_rule", rule_id, "created", network, type=rule_type, network_id=net_id
        )
        return {"id": rule_id, "type": rule_type, **stored}

    async def delete_rule(self, network: str, rule_id: int) -> dict[str, Any]:
        async def work(s: AsyncSession) -> int:
            net = await self._network(s, network)
            row = await s.get(RouterRule, rule_id)
            if row is None or row.network_id != net.id:
                raise NotFound(f"network {network} has no rule {rule_id}")
            await s.delete(row)
            return net.id

        net_id = await self.engine.db.write(work)
        self.engine.bus.publish("router_rule", rule_id, "deleted", network, network_id=net_id)
        return {"deleted": rule_id}

    async def desired_bundle(
        self, s: AsyncSession, net: GuestNetwork, version: int
    ) -> RouterBundle:
        """The whole desired config of the network's router, as one validated bundle."""
        rows, users = await self._rows(s, net.id)
        router = (
            await s.scalars(
                select(SystemVM).where(
                    SystemVM.network_id == net.id, SystemVM.state != VMState.DESTROYED.value
                )
            )
        ).first()
        control = ""
        if router is not None:
            control = (
                await s.scalar(
                    select(Nic.ip).where(
                        Nic.system_vm_id == router.id, Nic.role == NicRole.CONTROL.value
                    )
                )
                or ""
            )
        previous = RouterBundle.from_json(net.router_bundle) if net.router_bundle else None
        return RouterBundle.create(
            version=version,
            network=BundleNetwork(name=net.name, cidr=net.cidr, gateway=net.gateway, vlan=net.vlan),
            addresses=RouterAddresses(
                control_ip=control or "169.254.0.1",
                guest_ip=net.gateway,
                public_ips=tuple(ip for ip in (net.source_nat_ip,) if ip),
            ),
            rules=[(r.id, r.type, r.fields) for r in rows],
            vpn_users=[{"username": u.username, "password": u.password} for u in users],
            default_egress_policy=net.default_egress,
            previous=previous,
        )

    async def show(self, network: str) -> dict[str, Any]:
        async with self.engine.db.read() as s:
            net = await self._network(s, network)
            rows, _users = await self._rows(s, net.id)
            router = (
                await s.scalars(
                    select(SystemVM).where(
                        SystemVM.network_id == net.id, SystemVM.state != VMState.DESTROYED.value
                    )
                )
            ).first()
            desired = await self.desired_bundle(s, net, net.router_version + 1)
        return {
            "network": net.name,
            "router": router.name if router else None,
            "router_state": router.state if router else None,
            "public_ip": net.source_nat_ip or None,
            "version": net.router_version,
            "digest": net.router_digest,
            "live_digest": net.router_live_digest,
            "drift": bool(net.router_live_digest)
            and net.router_live_digest != net.router_expected_live,
            "pending": desired.digest != net.router_digest,
            "rules": [{"id": r.id, "type": r.type, **r.fields} for r in rows],
        }

    async def diff(self, network: str) -> dict[str, Any]:
        """What an apply would change: rules added, removed and changed since the last apply."""
        async with self.engine.db.read() as s:
            net = await self._network(s, network)
            desired = await self.desired_bundle(s, net, net.router_version + 1)
        old = (
            {r["id"]: r for r in json.loads(net.router_bundle)["rules"]}
            if net.router_bundle
            else {}
        )
        new = {r["id"]: r for r in json.loads(desired.to_json())["rules"]}
        return {
            "network": network,
            "from_version": net.router_version,
            "added": [new[i] for i in sorted(new.keys() - old.keys())],
            "removed": [old[i] for i in sorted(old.keys() - new.keys())],
            "changed": [new[i] for i in sorted(new.keys() & old.keys()) if new[i] != old[i]],
            "pending": desired.digest != net.router_digest,
        }

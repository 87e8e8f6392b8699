"""A network's router as desired state: its rules (validated against the network and each other),
the versioned bundle built from them, and what the router last reported to be live.

Rules are stored normalized (`to_fields()`); nothing invalid is ever stored, so a bundle built
from the database always validates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Text, select, type_coerce, update
from sqlalchemy.orm import Session, defer

from backend.db.models import GuestNetwork, Nic, NicRole, RouterRule, SystemVM, VMState, VpnUser
from backend.db.worker import command
from backend.errors import InvalidInput, NotFound, SysvmError, TransportError
from backend.router.bundle import (
    BundleNetwork,
    RouterAddresses,
    RouterBundle,
    bundle_patch,
    bundle_text,
)
from backend.router.rules import NetworkContext, parse_rule

if TYPE_CHECKING:
    from backend.engine.core import Engine

log = logging.getLogger(__name__)
BUILT_KEPT = 64
"""Networks whose last built bundle is kept in memory (see `RouterService._built`)."""
CONFIRM_MARGIN = 2.0
"""Seconds before a confirm window closes after which the engine stops trying to confirm."""


INLINE_RULES = 32
"""A bundle of at most this many rules is built, encoded and diffed on the event loop; a larger
one in a thread. For a one-rule bundle these took 0.23-0.52, 0.07 and 0.06 ms: less than a hop
to a thread and back, and that thread competes with the loop for the GIL."""

LARGE_RULES = 1000
"""A network with more rules than this is read and recorded in the database's threads, not its
worker process (`Database.run_read(large=True)`): a rule is ~130 bytes to copy there and back,
and with 10,000 the copies made an apply's read 61 ms against 34, its record 30 against 9."""

T = TypeVar("T")


async def _cpu(rules: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, CPU work on a bundle of `rules` rules: inline when small, else in a thread."""
    if rules <= INLINE_RULES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


@dataclass(frozen=True)
class _Inputs:
    """What a network's desired bundle is made of, as read from the database: everything but
    the rules (`parts`), each rule row's (type, fields JSON text) by id, and the JSON of the
    bundle last applied (the start of a cold build)."""

    net_id: int
    parts: dict[str, Any]
    stored: dict[int, tuple[str, str]]
    applied_json: str

    @property
    def size(self) -> int:
        """Rules a build may parse: the rows, or the last applied bundle's (a cold build starts
        from it), reckoned from its length."""
        return max(len(self.stored), len(self.applied_json) // 256)


@dataclass(frozen=True)
class _Built:
    """A network's last built bundle, with what it was built from: the bundle's text without
    its rules and version (`frame`), and each rule row's (type, fields JSON text) by id."""

    bundle: RouterBundle
    frame: str
    rows: dict[int, tuple[str, str]]


def _with_changed_rows(
    built: _Built, rows: dict[int, tuple[str, str]], version: int
) -> RouterBundle | None:
    """The bundle of `rows` made from `built.bundle` by parsing and checking only the rows that
    differ from the ones it was built from (as a router applies a patch), or None to build it
    whole: many rows changed, or one is refused (the whole build names it in place). A one-rule
    change of a 10,000-rule network: ~10 ms instead of ~130 (reading, encoding and parsing all)."""
    drop = {i for i in built.rows if i not in rows}
    changed = [(i, row) for i, row in rows.items() if built.rows.get(i) != row]
    if len(drop) + len(changed) > max(16, len(rows) // 4):
        return None
    try:
        put = [{"id": i, "type": t, "fields": json.loads(f)} for i, (t, f) in changed]
        bundle = RouterBundle.with_rules_changed(built.bundle, version, drop, put)
    except (InvalidInput, ValueError):
        return None
    _ = bundle.digest
    return bundle


@command
def _set_live(s: Session, net_id: int, live: str, expected: str) -> None:
    """Record what a router reported live, and what its applied bundle renders to."""
    s.execute(
        update(GuestNetwork)
        .where(GuestNetwork.id == net_id)
        .values(router_live_digest=live, router_expected_live=expected)
    )


def _rule_changes(applied_json: str, desired: RouterBundle) -> dict[str, list[Any]]:
    """The rules added, removed and changed from the applied bundle's text to `desired`."""
    old = {r["id"]: r for r in json.loads(applied_json)["rules"]} if applied_json else {}
    new = {r["id"]: r for r in json.loads(desired.to_json())["rules"]}
    return {
        "added": [new[i] for i in sorted(new.keys() - old.keys())],
        "removed": [old[i] for i in sorted(old.keys() - new.keys())],
        "changed": [new[i] for i in sorted(new.keys() & old.keys()) if new[i] != old[i]],
    }


def _bundle_inputs(
    s: Session,
    net: GuestNetwork,
    control_sources: tuple[str, ...] | None = None,
    *,
    applied: bool = False,
) -> _Inputs:
    """What the network's desired bundle is made of, read in one transaction
    (`control_sources`: who may SSH to the router, default the whole link-local range).
    The last applied bundle's text is read when asked (`applied`): a diff, and a cold build,
    which starts from it."""
    # The rules' fields as the JSON text stored: 10,000 rows are not decoded one by one.
    rows = s.execute(
        select(RouterRule.id, RouterRule.type, type_coerce(RouterRule.fields, Text))
        .where(RouterRule.network_id == net.id)
        .order_by(RouterRule.id)
    ).all()
    users = s.execute(
        select(VpnUser.username, VpnUser.password).where(VpnUser.network_id == net.id)
    ).all()
    control = (
        s.scalar(
            select(Nic.ip)
            .join(SystemVM, Nic.system_vm_id == SystemVM.id)
            .where(
                SystemVM.network_id == net.id,
                SystemVM.state != VMState.DESTROYED.value,
                Nic.role == NicRole.CONTROL.value,
            )
            .order_by(SystemVM.id)
            .limit(1)
        )
        or ""
    )
    parts: dict[str, Any] = {
        "network": BundleNetwork(name=net.name, cidr=net.cidr, gateway=net.gateway, vlan=net.vlan),
        "addresses": RouterAddresses(
            control_ip=control or "169.254.0.1",
            guest_ip=net.gateway,
            public_ips=tuple(ip for ip in (net.source_nat_ip,) if ip),
        ),
        "vpn_users": [{"username": u, "password": pw} for u, pw in users],
        "default_egress_policy": net.default_egress,
        **({"control_sources": control_sources} if control_sources else {}),
    }
    return _Inputs(
        net_id=net.id,
        parts=parts,
        stored={r[0]: (r[1], r[2] or "{}") for r in rows},
        applied_json=_applied_text(s, net_id=net.id) if applied else "",
    )


def _network(s: Session, name: str) -> GuestNetwork:
    """The network named `name`, without the text of its last applied bundle (megabytes
    for 10,000 rules; `_bundle_inputs` reads it when a build needs it)."""
    net = s.scalars(
        select(GuestNetwork)
        .where(GuestNetwork.name == name)
        .options(defer(GuestNetwork.router_bundle, raiseload=True))
    ).first()
    if net is None:
        raise NotFound(f"no network named {name!r}; `sysvm status` lists them")
    return net


def _router_row(s: Session, net: GuestNetwork) -> SystemVM | None:
    return s.scalars(
        select(SystemVM).where(
            SystemVM.network_id == net.id, SystemVM.state != VMState.DESTROYED.value
        )
    ).first()


# Commands (see `backend.db.worker`): run in the database's worker process.


@command
def _require_network(s: Session, *, network: str) -> None:
    _network(s, network)


@command
def _apply_inputs(
    s: Session, *, network: str, control_sources: tuple[str, ...] | None
) -> tuple[GuestNetwork, SystemVM | None, _Inputs]:
    """What an apply reads: the network, its router and its bundle's inputs (without the last
    applied bundle's text: `_applied_text` when a cold build needs it)."""
    net = _network(s, network)
    return net, _router_row(s, net), _bundle_inputs(s, net, control_sources)


@command
def _applied_text(s: Session, *, net_id: int) -> str:
    return s.scalar(select(GuestNetwork.router_bundle).where(GuestNetwork.id == net_id)) or ""


@command
def _network_and_router(s: Session, *, network: str) -> tuple[GuestNetwork, SystemVM | None]:
    net = _network(s, network)
    return net, _router_row(s, net)


@command
def _network_by_id_and_router(
    s: Session, *, net_id: int
) -> tuple[GuestNetwork | None, SystemVM | None]:
    """The network (with its last applied bundle) and its router; (None, None) if it is gone."""
    net = s.get(GuestNetwork, net_id)
    return net, None if net is None else _router_row(s, net)


@command
def _record_apply(s: Session, *, net_id: int, values: dict[str, Any]) -> str:
    """Record an applied bundle; the network's name."""
    statement = (
        update(GuestNetwork)
        .where(GuestNetwork.id == net_id)
        .values(values)
        .returning(GuestNetwork.name)
    )
    return str(s.execute(statement).scalar_one())


@command
def _delete_rule(s: Session, *, network: str, rule_id: int) -> int:
    """Delete one rule of the network; the network's id."""
    net = _network(s, network)
    row = s.get(RouterRule, rule_id)
    if row is None or row.network_id != net.id:
        raise NotFound(f"network {network} has no rule {rule_id}")
    s.delete(row)
    return net.id


class RouterNotReady(SysvmError):
    """The network's router is not Running (or its agent does not answer)."""


class RouterService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The last bundle built per network id, with the rows it was built from: the next build
        # parses only the rows that changed (the result is the same without it).
        # Built in threads (`_build`): the lock guards the dictionary, not the builds.
        self._built: OrderedDict[int, _Built] = OrderedDict()
        self._built_lock = threading.Lock()
        # The last bundle applied per network id: what the router runs, so the next apply can
        # send a patch of it instead of the whole bundle.
        self._applied: OrderedDict[int, RouterBundle] = OrderedDict()
        # Rules of each network's last applied bundle, by name: a large one is read in the
        # database's threads (LARGE_RULES).
        self._rules: dict[str, int] = {}

    def _rows(self, s: Session, net_id: int) -> list[RouterRule]:
        return list(
            s.scalars(
                select(RouterRule).where(RouterRule.network_id == net_id).order_by(RouterRule.id)
            ).all()
        )

    def _rule_context(
        self, s: Session, net: GuestNetwork, without: int | None = None
    ) -> NetworkContext:
        """What a new or changed rule is checked against: the network's rules (but `without`),
        taken from its desired bundle, which is made from the rows changed since the last one
        (`_build`): a rule added to 10,000 is not checked after decoding and parsing all of them
        again. Read in the caller's transaction, so no other change slips between."""
        bundle = self._build(self._bundle_inputs(s, net), net.router_version + 1)
        return NetworkContext(
            cidr=net.cidr,
            gateway=net.gateway,
            public_ips=frozenset({net.source_nat_ip} - {""}),
            rules={r.id: r.rule for r in bundle.rules if r.id != without},
            source_nat_ip=net.source_nat_ip,
            vpn_usernames=frozenset(u.username for u in bundle.vpn_users),
        )

    async def add_rule(self, network: str, rule_type: str, fields: object) -> dict[str, Any]:
        """Validate and store one rule; nothing is stored when any field is wrong."""
        if not isinstance(fields, dict):
            raise InvalidInput("fields", "must be an object of rule fields")

        def work(s: Session) -> tuple[int, dict[str, Any], int]:
            net = _network(s, network)
            rule = parse_rule(rule_type, fields, self._rule_context(s, net))
            row = RouterRule(network_id=net.id, type=rule_type, fields=rule.to_fields())
            s.add(row)
            s.flush()
            return row.id, row.fields, net.id

        rule_id, stored, net_id = await self.engine.db.run_write(work)
        self.engine.bus.publish(
            "router_rule", rule_id, "created", network, type=rule_type, network_id=net_id
        )
        return {"id": rule_id, "type": rule_type, **stored}

    async def replace_rule(
        self, network: str, rule_id: int, rule_type: str, fields: object
    ) -> dict[str, Any]:
        """Change a rule in place (same id), checked against the network's other rules; when any
        field is wrong the old rule stays as it was."""
        if not isinstance(fields, dict):
            raise InvalidInput("fields", "must be an object of rule fields")

        def work(s: Session) -> tuple[dict[str, Any], int]:
            net = _network(s, network)
            row = s.get(RouterRule, rule_id)
            if row is None or row.network_id != net.id:
                raise NotFound(f"network {network} has no rule {rule_id}")
            context = self._rule_context(s, net, without=rule_id)
            rule = parse_rule(rule_type, fields, context)
            row.type = rule_type
            row.fields = rule.to_fields()
            return row.fields, net.id

        stored, net_id = await self.engine.db.run_write(work)
        self.engine.bus.publish(
            "router_rule", rule_id, "updated", network, type=rule_type, network_id=net_id
        )
        return {"id": rule_id, "type": rule_type, **stored}

    async def delete_rule(self, network: str, rule_id: int) -> dict[str, Any]:
        net_id = await self.engine.db.run_write(
            functools.partial(_delete_rule, network=network, rule_id=rule_id)
        )
        self.engine.bus.publish("router_rule", rule_id, "deleted", network, network_id=net_id)
        return {"deleted": rule_id}

    def _bundle_inputs(
        self,
        s: Session,
        net: GuestNetwork,
        control_sources: tuple[str, ...] | None = None,
        *,
        applied: bool = False,
    ) -> _Inputs:
        """`_bundle_inputs` with the last applied bundle's text also when no build of the
        network is kept (a cold build starts from it)."""
        return _bundle_inputs(s, net, control_sources, applied=applied or self._cold(net.id))

    def _cold(self, net_id: int) -> bool:
        """No build of the network is kept."""
        with self._built_lock:
            return net_id not in self._built

    def _build(self, inputs: _Inputs, version: int) -> RouterBundle:
        """The desired bundle, validated, as version `version`. CPU work (validating 10,000 rules
        takes ~1 s cold, ~0.15 s with a previous bundle): through `_cpu`. Only the rows changed
        since the network's last build are parsed when everything else is the same."""
        frame = bundle_text(version=0, rules=(), **inputs.parts)
        with self._built_lock:
            built = self._built.get(inputs.net_id)
        bundle: RouterBundle | None = None
        if built is not None and built.frame == frame:
            bundle = _with_changed_rows(built, inputs.stored, version)
        if bundle is None:
            previous = built.bundle if built is not None else None
            if previous is None and inputs.applied_json:
                previous = RouterBundle.from_json(inputs.applied_json)
            text = bundle_text(
                version=version,
                rules=[(i, t, f) for i, (t, f) in inputs.stored.items()],
                **inputs.parts,
            )
            bundle = RouterBundle.from_json(text, previous)
            _ = bundle.digest  # computes each new rule's JSON, which to_json then reuses
        with self._built_lock:
            self._built[inputs.net_id] = _Built(bundle, frame, inputs.stored)
            self._built.move_to_end(inputs.net_id)
            while len(self._built) > BUILT_KEPT:
                self._built.popitem(last=False)
        return bundle

    async def desired_bundle(self, network: str) -> RouterBundle:
        """The network's desired bundle as its next version would be (read in the database's
        thread, then built: in a thread of its own when large, see `_cpu`)."""

        def read(s: Session) -> tuple[int, _Inputs]:
            net = _network(s, network)
            return net.router_version + 1, self._bundle_inputs(s, net)

        version, inputs = await self.engine.db.run_read(read)
        return await _cpu(inputs.size, self._build, inputs, version)

    async def require(self, network: str) -> None:
        """NotFound unless the network exists (cheap: its rules are not read)."""
        await self.engine.db.run_read(functools.partial(_require_network, network=network))

    async def show(self, network: str) -> dict[str, Any]:
        def read(s: Session) -> tuple[GuestNetwork, list[RouterRule], SystemVM | None, _Inputs]:
            net = _network(s, network)
            return net, self._rows(s, net.id), _router_row(s, net), self._bundle_inputs(s, net)

        net, rows, router, inputs = await self.engine.db.run_read(read)
        desired = await _cpu(inputs.size, self._build, inputs, net.router_version + 1)
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

        def read(s: Session) -> tuple[GuestNetwork, _Inputs]:
            net = _network(s, network)
            return net, self._bundle_inputs(s, net, applied=True)

        net, inputs = await self.engine.db.run_read(read)
        desired = await _cpu(inputs.size, self._build, inputs, net.router_version + 1)
        changes = await _cpu(inputs.size, _rule_changes, inputs.applied_json, desired)
        return {
            "network": network,
            "from_version": net.router_version,
            **changes,
            "pending": desired.digest != net.router_digest,
        }

    def _reachable(
        self, net: GuestNetwork, router: SystemVM | None
    ) -> tuple[SystemVM, tuple[str, int]]:
        """The network's router and where to reach it over SSH, or RouterNotReady."""
        if router is None or router.state not in (VMState.RUNNING.value, VMState.STARTING.value):
            raise RouterNotReady(
                f"{net.name} has no Running router; start a VM on it or restart the network"
            )
        endpoint = self.engine.guests.ssh_endpoint(router)
        if endpoint is None:
            raise RouterNotReady(f"{router.name} does not answer over SSH yet")
        return router, endpoint

    async def _call(
        self, router: SystemVM, endpoint: tuple[str, int], command: str, stdin: str | None = None
    ) -> dict[str, Any]:
        result = await self.engine.transport.run(
            endpoint[0], endpoint[1], router.host_key_public, command, stdin=stdin
        )
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        try:
            answer = json.loads(lines[-1]) if lines else {}
        except ValueError:
            answer = {}
        if result.exit_status != 0 or "error" in answer:
            why = (
                answer.get("message") or answer.get("error") or result.stderr.strip() or "no answer"
            )
            field = answer.get("field")
            if result.exit_status == 2 and field:
                raise InvalidInput(str(field), str(why))
            raise SysvmError(f"{router.name}: {command.split()[1]} failed: {why}")
        return dict(answer)

    async def apply(
        self,
        network: str,
        *,
        confirm_timeout: float,
        progress: Any = None,
        control_sources: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """Push the desired bundle as the next version; with a confirm window, confirm it over a
        new SSH connection, else the router rolls itself back. Returns the router's answer.
        `control_sources` narrows who may SSH to the router (the data-plane tests cut the engine
        off with it to prove the rollback); the next apply without it restores the default."""

        net, router_row, inputs = await self.engine.db.run_read(
            functools.partial(_apply_inputs, network=network, control_sources=control_sources),
            large=self._rules.get(network, 0) > LARGE_RULES,
        )
        if self._cold(net.id):
            applied = await self.engine.db.run_read(
                functools.partial(_applied_text, net_id=net.id),
                large=len(inputs.stored) > LARGE_RULES,
            )
            inputs = dataclasses.replace(inputs, applied_json=applied)
        router, endpoint = self._reachable(net, router_row)
        bundle = await _cpu(inputs.size, self._build, inputs, net.router_version + 1)
        self._rules[network] = len(bundle.rules)
        if progress:
            await progress(20, f"applying version {bundle.version} to {router.name}")
        applied_at = asyncio.get_running_loop().time()
        answer = await self._push(net, router, endpoint, bundle, int(confirm_timeout))
        if confirm_timeout > 0:
            if progress:
                await progress(70, f"confirming version {bundle.version} over a new connection")
            try:
                await self._confirm(router, endpoint, bundle.version, applied_at, confirm_timeout)
            except SysvmError as exc:
                raise SysvmError(
                    f"version {bundle.version} was applied but could not be confirmed ({exc}); "
                    f"{router.name} rolls back to version {net.router_version} within "
                    f"{int(confirm_timeout)} s by itself"
                ) from exc
        await self._record(net.id, bundle, answer)
        return {"version": bundle.version, "digest": bundle.digest, **answer}

    async def _push(
        self,
        net: GuestNetwork,
        router: SystemVM,
        endpoint: tuple[str, int],
        bundle: RouterBundle,
        confirm_timeout: int,
    ) -> dict[str, Any]:
        """Send `bundle` to the router: as a patch of the bundle it runs when the engine still
        holds that one (a one-rule change of 10,000 rules is a few hundred bytes), else whole.
        A router that runs something else (restarted, rolled back) refuses the patch naming
        `base` and gets the whole bundle."""
        command = f"sysvm-router apply --confirm-timeout {confirm_timeout}"
        base = self._applied.get(net.id)
        if base is not None and (base.version, base.digest) == (
            net.router_version,
            net.router_digest,
        ):
            patch = await _cpu(len(bundle.rules), bundle_patch, base, bundle)
            try:
                return await self._call(router, endpoint, f"{command} --patch", patch)
            except InvalidInput as exc:
                if exc.field not in ("base", "digest"):
                    raise
                log.info("%s: %s; sending the whole bundle", router.name, exc.reason)
        text = await _cpu(len(bundle.rules), bundle.to_json)
        return await self._call(router, endpoint, command, text)

    async def _confirm(
        self,
        router: SystemVM,
        endpoint: tuple[str, int],
        version: int,
        applied_at: float,
        window: float,
    ) -> None:
        """Confirm `version` over a new connection, retrying one that cannot be made (a busy
        router may miss a handshake) for as long as the window surely stays open. A router that
        answers, yes or no, is not asked again."""
        loop = asyncio.get_running_loop()
        last_chance = applied_at + window - CONFIRM_MARGIN
        pause = 0.2
        while True:
            self.engine.transport.drop(endpoint[0], endpoint[1], router.host_key_public)
            try:
                await self._call(router, endpoint, f"sysvm-router confirm {version}")
                return
            except TransportError as exc:  # not reached, or no answer: confirming twice is harmless
                if loop.time() + pause >= last_chance:
                    raise
                log.info("confirm of %s version %s: %s; trying again", router.name, version, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _record(self, net_id: int, bundle: RouterBundle, answer: dict[str, Any]) -> None:
        text = await _cpu(len(bundle.rules), bundle.to_json)  # megabytes for 10,000 rules

        live = str(answer.get("live_digest", ""))
        values = {
            "router_version": bundle.version,
            "router_digest": bundle.digest,
            "router_bundle": text,
            "router_live_digest": live,
            "router_expected_live": str(answer.get("expected_live_digest") or live),
        }
        name = await self.engine.db.run_write(
            functools.partial(_record_apply, net_id=net_id, values=values),
            large=len(bundle.rules) > LARGE_RULES,
        )
        self._applied[net_id] = bundle
        self._applied.move_to_end(net_id)
        while len(self._applied) > BUILT_KEPT:
            self._applied.popitem(last=False)
        self.engine.bus.publish(
            "network", net_id, "updated", name, router_version=bundle.version, drift=False
        )

    async def push_current(self, network_id: int) -> None:
        """A router that (re)started gets the last applied bundle again before it serves."""

        net, router_row = await self.engine.db.run_read(
            functools.partial(_network_by_id_and_router, net_id=network_id)
        )
        if net is None or not net.router_bundle:
            return
        router, endpoint = self._reachable(net, router_row)
        answer = await self._call(router, endpoint, "sysvm-router boot", net.router_bundle)
        live = str(answer.get("live_digest", ""))
        expected = str(answer.get("expected_live_digest") or live)
        name = net.name

        await self.engine.db.run_write(
            functools.partial(_set_live, net_id=network_id, live=live, expected=expected)
        )
        self.engine.bus.publish("network", network_id, "updated", name, drift=live != expected)

    async def check(self, network: str) -> dict[str, Any]:
        """Read back what is live on the router and compare it with what was applied."""

        net, router_row = await self.engine.db.run_read(
            functools.partial(_network_and_router, network=network)
        )
        router, endpoint = self._reachable(net, router_row)
        answer = await self._call(router, endpoint, "sysvm-router check")
        live = str(answer.get("live_digest", ""))
        # The router knows what its applied bundle renders to (paths included) and says whether
        # what is live differs; a router running another version than applied is drift too.
        drift = bool(answer.get("drift")) or (
            net.router_version > 0 and answer.get("version") != net.router_version
        )
        expected = str(answer.get("expected_live_digest") or live)

        await self.engine.db.run_write(
            functools.partial(_set_live, net_id=net.id, live=live, expected=expected)
        )
        self.engine.bus.publish("network", net.id, "updated", net.name, drift=drift)
        return {
            "network": net.name,
            "router": router.name,
            "version": net.router_version,
            "digest": net.router_digest,
            "live_version": answer.get("version"),
            "live_digest": live,
            "drift": drift,
        }

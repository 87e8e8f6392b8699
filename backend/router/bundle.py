"""The router bundle: the whole desired config of one virtual router, versioned and digested.

The engine builds a bundle from the database and sends it as JSON on stdin to the router's one fixed
appliance command; the appliance parses it again with `RouterBundle.from_json`, which re-checks every
field and every rule (the JSON crossed an SSH seam). `to_json()` is canonical (sorted keys, no
whitespace, rules by id, users by name), so equal configs give equal text; `digest` is the sha256 of
that canonical JSON without the version, so re-sending unchanged rules under a new version keeps the
digest.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from backend.errors import InvalidInput
from backend.router.canonical_rules import CanonicalParser
from backend.router.conflicts import Claim, ClaimIndex
from backend.router.field_checks import (
    FieldReader,
    check_cidr,
    check_hostname,
    check_int,
    check_ipv4,
    check_list,
    check_unicast,
    join,
)
from backend.router.rule_types import RuleType
from backend.router.rules import (
    EgressPolicy,
    NetworkContext,
    Rule,
    VpnUser,
    parse_egress_policy,
    parse_rule_alone,
    parse_vpn_user,
)
from backend.services.names import check_name

R = TypeVar("R", bound=Rule)

BUNDLE_FORMAT = 1
MAX_RULES = 100_000
MAX_VPN_USERS = 1_000
MAX_PUBLIC_IPS = 64
# Who may SSH to the router's control interface unless the bundle says otherwise.
DEFAULT_CONTROL_SOURCES = ("169.254.0.0/16",)


@dataclass(frozen=True)
class BundleNetwork:
    """The guest network the router serves."""

    name: str
    cidr: str
    gateway: str
    vlan: int | None = None
    domain: str = ""
    dns_servers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cidr": self.cidr,
            "gateway": self.gateway,
            "vlan": self.vlan,
            "domain": self.domain,
            "dns_servers": list(self.dns_servers),
        }


@dataclass(frozen=True)
class RouterAddresses:
    """The router's own addresses: control (link-local, SSH), guest (the gateway), public."""

    control_ip: str
    guest_ip: str
    public_ips: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "control_ip": self.control_ip,
            "guest_ip": self.guest_ip,
            "public_ips": list(self.public_ips),
        }


@dataclass(frozen=True)
class BundleRule:
    """One rule of the bundle with its database id (ids name rules in drift reports)."""

    id: int
    rule: Rule
    # The JSON object this rule was parsed from, so a later bundle can reuse the parsed rule when
    # it receives the same object again (see RouterBundle.from_dict's `previous`).
    raw: Mapping[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)
    # The rule's claims, computed once: every rule is indexed, and a reused rule is re-indexed
    # without recomputing them.
    claims: tuple[Claim, ...] = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "claims", self.rule.claims())

    @property
    def type(self) -> str:
        return self.rule.type.value

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "fields": self.rule.to_fields()}


@dataclass(frozen=True)
class RouterBundle:
    """The whole desired config of one router; build it with `from_dict`/`create`, which validate.

    `control_sources` are the CIDRs allowed to SSH to the control interface (port 3922). The
    default, the whole link-local range, is what every production router uses; a narrower value
    can cut the engine off, which is what commit-confirmed apply exists to undo (tests use exactly
    that to prove the rollback).
    """

    version: int
    network: BundleNetwork
    addresses: RouterAddresses
    rules: tuple[BundleRule, ...] = ()
    vpn_users: tuple[VpnUser, ...] = ()
    default_egress_policy: EgressPolicy = EgressPolicy.ALLOW
    control_sources: tuple[str, ...] = DEFAULT_CONTROL_SOURCES

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON-able form."""
        return {
            "format": BUNDLE_FORMAT,
            "version": self.version,
            **self._content(),
        }

    def _content(self) -> dict[str, Any]:
        return {
            "network": self.network.to_dict(),
            "addresses": self.addresses.to_dict(),
            "rules": [r.to_dict() for r in self.rules],
            "vpn_users": [u.to_fields() for u in self.vpn_users],
            "default_egress_policy": self.default_egress_policy.value,
            "control_sources": list(self.control_sources),
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no insignificant whitespace, ASCII only."""
        return _canonical(self.to_dict())

    @cached_property
    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON of everything but the version."""
        content = {"format": BUNDLE_FORMAT, **self._content()}
        return hashlib.sha256(_canonical(content).encode()).hexdigest()

    def rules_of(self, kind: type[R]) -> list[tuple[int, R]]:
        """(id, rule) of every rule of one class, by id."""
        return self._by_type.get(kind.type, [])  # type: ignore[return-value]

    @cached_property
    def _by_type(self) -> dict[RuleType, list[tuple[int, Rule]]]:
        out: dict[RuleType, list[tuple[int, Rule]]] = {}
        for r in self.rules:
            out.setdefault(r.rule.type, []).append((r.id, r.rule))
        return out

    @classmethod
    def from_json(cls, text: str | bytes, previous: RouterBundle | None = None) -> RouterBundle:
        """Parse and fully validate a bundle received as JSON (see `from_dict` for `previous`)."""
        with _cycle_collection_paused():
            try:
                data = json.loads(text, parse_constant=_refuse_constant)
            except (ValueError, RecursionError) as exc:
                raise InvalidInput("bundle", f"is not valid JSON: {exc}") from None
            # The parsed objects are ours alone, so rules keep them for reuse by the next bundle.
            return cls._validate(data, previous, keep_raw=True)

    @classmethod
    def from_dict(cls, data: object, previous: RouterBundle | None = None) -> RouterBundle:
        """Validate a bundle's JSON object: shape, every field, every rule, and rule conflicts.

        With `previous` (the last bundle of the same router), rules received exactly as before
        are not parsed again, which makes a one-rule change of a large bundle cheap; the result
        is the same as without it. Only bundles parsed by `from_json` or built by `create` are
        reusable as `previous` (they own their JSON objects; a caller's dict may change later).
        """
        with _cycle_collection_paused():
            return cls._validate(data, previous, keep_raw=False)

    @classmethod
    def _validate(
        cls, data: object, previous: RouterBundle | None, *, keep_raw: bool
    ) -> RouterBundle:
        top = FieldReader(
            data,
            (
                "format",
                "version",
                "network",
                "addresses",
                "rules",
                "vpn_users",
                "default_egress_policy",
                "control_sources",
            ),
        )
        check_int(top.name("format"), top.require("format"), BUNDLE_FORMAT, BUNDLE_FORMAT)
        version = check_int(top.name("version"), top.require("version"), 0, 2**63 - 1)
        network = _network(FieldReader(top.require("network"), _NETWORK_KEYS, path="network"))
        addresses = _addresses(
            FieldReader(top.require("addresses"), _ADDRESS_KEYS, path="addresses"), network
        )
        ctx = NetworkContext(
            cidr=network.cidr, gateway=network.gateway, public_ips=frozenset(addresses.public_ips)
        )
        same_network = previous is not None and (previous.network, previous.addresses) == (
            network,
            addresses,
        )
        reusable = {r.id: r for r in previous.rules} if previous and same_network else {}
        rules = _rules(top.get("rules", []), ctx, reusable, keep_raw)
        users = _vpn_users(top.get("vpn_users", []))
        policy = parse_egress_policy(top.get("default_egress_policy", EgressPolicy.ALLOW.value))
        sources_raw = top.get("control_sources", list(DEFAULT_CONTROL_SOURCES))
        sources_list = check_list("control_sources", sources_raw, max_items=16, min_items=1)
        sources = tuple(
            str(n)
            for n in sorted(
                {check_cidr(join("control_sources", i), s) for i, s in enumerate(sources_list)}
            )
        )
        return cls(version, network, addresses, rules, users, policy, sources)

    @classmethod
    def create(
        cls,
        *,
        version: int,
        network: BundleNetwork,
        addresses: RouterAddresses,
        rules: Iterable[tuple[int, str, Mapping[str, Any]]] = (),
        vpn_users: Iterable[Mapping[str, Any]] = (),
        default_egress_policy: str = EgressPolicy.ALLOW.value,
        control_sources: Iterable[str] = DEFAULT_CONTROL_SOURCES,
        previous: RouterBundle | None = None,
    ) -> RouterBundle:
        """Build and validate a bundle from database rows: rules as (id, type, fields).

        The rows go through JSON text, so the bundle owns its objects and can be `previous`.
        """
        payload = {
            "format": BUNDLE_FORMAT,
            "version": version,
            "network": network.to_dict(),
            "addresses": addresses.to_dict(),
            "rules": [{"id": i, "type": t, "fields": f} for i, t, f in rules],
            "vpn_users": list(vpn_users),
            "default_egress_policy": default_egress_policy,
            "control_sources": list(control_sources),
        }
        try:
            text = json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInput("bundle", f"holds a value JSON cannot carry: {exc}") from None
        return cls.from_json(text, previous)


_NETWORK_KEYS = ("name", "cidr", "gateway", "vlan", "domain", "dns_servers")
_ADDRESS_KEYS = ("control_ip", "guest_ip", "public_ips")


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@contextmanager
def _cycle_collection_paused() -> Iterator[None]:
    """Parsing a bundle builds some 30 objects per rule, none in a reference cycle; meanwhile the
    cycle collector would scan the growing heap again and again and find nothing (half the time
    of parsing 10,000 rules). Collection resumes, as it was, when parsing ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _refuse_constant(name: str) -> object:
    raise InvalidInput("bundle", f"contains {name}, which is not JSON")


def _network(r: FieldReader) -> BundleNetwork:
    name = check_name(r.name("name"), r.require("name"))
    net = check_cidr(r.name("cidr"), r.require("cidr"))
    gateway = check_ipv4(r.name("gateway"), r.require("gateway"))
    if gateway not in net or gateway in (net.network_address, net.broadcast_address):
        raise InvalidInput(r.name("gateway"), f"{gateway} is not a host address of {net}")
    vlan = check_int(r.name("vlan"), r.get("vlan"), 1, 4094) if r.has("vlan") else None
    domain = r.get("domain", "")
    if domain != "":
        domain = check_hostname(r.name("domain"), domain)
    servers = check_list(r.name("dns_servers"), r.get("dns_servers", []), max_items=3)
    dns = tuple(
        str(check_unicast(join(r.name("dns_servers"), i), s)) for i, s in enumerate(servers)
    )
    return BundleNetwork(name, str(net), str(gateway), vlan, str(domain), dns)


def _addresses(r: FieldReader, network: BundleNetwork) -> RouterAddresses:
    control = str(check_ipv4(r.name("control_ip"), r.require("control_ip")))
    guest = str(check_ipv4(r.name("guest_ip"), r.require("guest_ip")))
    if guest != network.gateway:
        raise InvalidInput(
            r.name("guest_ip"), f"{guest} must be the network's gateway {network.gateway}"
        )
    items = check_list(r.name("public_ips"), r.get("public_ips", []), max_items=MAX_PUBLIC_IPS)
    public: list[str] = []
    for i, item in enumerate(items):
        ip = str(check_unicast(join(r.name("public_ips"), i), item))
        if ip in public:
            raise InvalidInput(join(r.name("public_ips"), i), f"{ip} is listed twice")
        if ip in (control, guest):
            raise InvalidInput(join(r.name("public_ips"), i), f"{ip} is the router's own address")
        public.append(ip)
    return RouterAddresses(control, guest, tuple(public))


def _rules(
    raw: object, ctx: NetworkContext, previous: Mapping[int, BundleRule], keep_raw: bool
) -> tuple[BundleRule, ...]:
    """Parse every rule, then check conflicts. A rule whose JSON object equals the one a previous
    bundle (of the same network and addresses) parsed is reused as it was: it passed the same
    checks then. Unchanged rules never conflict with each other, so only the others are checked
    against the whole set, and a conflict blames the changed rule."""
    items = check_list("rules", raw, max_items=MAX_RULES)
    canonical = CanonicalParser(ctx)
    index = ClaimIndex()
    out: dict[int, BundleRule] = {}
    pending: list[tuple[int, BundleRule]] = []
    for i, item in enumerate(items):
        if previous and type(item) is dict:
            before = previous.get(item.get("id"))  # type: ignore[arg-type]
            if before is not None and before.raw == item and before.id not in out:
                out[before.id] = before
                if before.claims:
                    index.record(f"{before.rule.type} rule {before.id}", before.claims)
                continue
        rule_id, rule = _canonical_rule(item, canonical, out) or _checked_rule(i, item, ctx, out)
        entry = out[rule_id] = BundleRule(rule_id, rule, item if keep_raw else None)  # type: ignore[arg-type]
        if entry.claims:  # firewall rules claim nothing
            pending.append((i, entry))
    for i, entry in pending:
        try:
            index.add(f"{entry.rule.type} rule {entry.id}", entry.claims)
        except InvalidInput as exc:
            raise _in_rule(FieldReader({}, (), path=join("rules", i)), exc) from None
    return tuple(out[k] for k in sorted(out))


_RULE_KEYS = frozenset(("id", "type", "fields"))


def _canonical_rule(
    item: object, canonical: CanonicalParser, taken: Mapping[int, BundleRule]
) -> tuple[int, Rule] | None:
    """(id, rule) of a rule sent in canonical form, or None to let `_checked_rule` answer."""
    if type(item) is not dict or item.keys() != _RULE_KEYS:
        return None
    rule_id = item["id"]
    if type(rule_id) is not int or not 1 <= rule_id <= 2**63 - 1 or rule_id in taken:
        return None
    rule = canonical.parse(item["type"], item["fields"])
    return None if rule is None else (rule_id, rule)


def _checked_rule(
    i: int, item: object, ctx: NetworkContext, taken: Mapping[int, BundleRule]
) -> tuple[int, Rule]:
    """(id, rule) of any rule, every check made by the precise parser; errors name its place."""
    r = FieldReader(item, ("id", "type", "fields"), path=join("rules", i))
    rule_id = check_int(r.name("id"), r.require("id"), 1, 2**63 - 1)
    if rule_id in taken:
        raise InvalidInput(r.name("id"), f"rule id {rule_id} is used twice")
    try:
        return rule_id, parse_rule_alone(r.require("type"), r.require("fields"), ctx)  # type: ignore[arg-type]
    except InvalidInput as exc:
        raise _in_rule(r, exc) from None


def _in_rule(r: FieldReader, exc: InvalidInput) -> InvalidInput:
    """An error of a rule's fields, renamed to its place in the bundle (`rules[3].fields.x`)."""
    if exc.field in ("type", "fields"):
        return InvalidInput(r.name(exc.field), exc.reason)
    return InvalidInput(join(r.name("fields"), exc.field), exc.reason)


def _vpn_users(raw: object) -> tuple[VpnUser, ...]:
    items = check_list("vpn_users", raw, max_items=MAX_VPN_USERS)
    users: dict[str, VpnUser] = {}
    for i, item in enumerate(items):
        path = join("vpn_users", i)
        try:
            user = parse_vpn_user(item)
        except InvalidInput as exc:
            where = path if exc.field == "fields" else join(path, exc.field)
            raise InvalidInput(where, exc.reason) from None
        if user.username in users:
            raise InvalidInput(join(path, "username"), f"{user.username!r} is listed twice")
        users[user.username] = user
    return tuple(users[k] for k in sorted(users))

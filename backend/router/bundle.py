"""The router bundle: the whole desired config of one virtual router, versioned and digested.

The engine builds a bundle from the database and sends it as JSON on stdin to the router's one fixed
appliance command; the appliance parses it again with `RouterBundle.from_json`, which re-checks every
field and every rule (the JSON crossed an SSH seam). `to_json()` is canonical (sorted keys, no
whitespace, rules by id, users by name), so equal configs give equal text; `digest` is the sha256 of
that canonical JSON without the version, so re-sending unchanged rules under a new version keeps the
digest.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import json
import weakref
from collections.abc import Container, Iterable, Iterator, Mapping
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

    def __init__(self, id: int, rule: Rule, raw: Mapping[str, Any] | None = None) -> None:  # noqa: A002
        # Written out (dataclass then generates none): the generated one sets each field of a
        # frozen instance with object.__setattr__, a third of building 10,000 rules' entries.
        self.__dict__.update(id=id, rule=rule, raw=raw, claims=rule.claims())

    @property
    def type(self) -> str:
        return self.rule.type.value

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "fields": self.rule.to_fields()}

    @cached_property
    def canonical(self) -> str:
        """This rule's canonical JSON, computed once: a bundle's JSON and digest are assembled
        from these, so a bundle that reuses most rules of its previous one costs a join."""
        return _canonical(self.to_dict())


@dataclass(frozen=True)
class RuleChange:
    """How a patched bundle's rules differ from those of the bundle it patched (`base()`).

    The base is held weakly: a router patched a thousand times must not keep a thousand
    bundles alive through this chain. While the base lives (it is the live one when the patch
    is rendered), what changed is known without comparing 10,000 rules."""

    _base: weakref.ReferenceType[RouterBundle]
    before: Mapping[int, BundleRule]  # base's rules that were removed or replaced, by id
    after: Mapping[int, BundleRule]  # the rules added or replacing, by id

    def base(self) -> RouterBundle | None:
        return self._base()

    def is_from(self, bundle: RouterBundle) -> bool:
        return self._base() is bundle

    @property
    def ids(self) -> set[int]:
        return set(self.before) | set(self.after)


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
    # Set on a bundle made by a patch: what changed from the bundle it patched, so the renderers
    # need not compare 10,000 rules to find the one that changed.
    change: RuleChange | None = field(default=None, compare=False, hash=False, repr=False)

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
        """Canonical JSON: sorted keys, no insignificant whitespace, ASCII only (exactly
        `_canonical(self.to_dict())`, assembled from the rules' cached JSON)."""
        return self._canonical_text({"version": self.version})

    @cached_property
    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON of everything but the version."""
        return hashlib.sha256(self._canonical_text({}).encode()).hexdigest()

    def _canonical_text(self, extra: Mapping[str, Any]) -> str:
        parts = {
            "format": _canonical(BUNDLE_FORMAT),
            "network": _canonical(self.network.to_dict()),
            "addresses": _canonical(self.addresses.to_dict()),
            "rules": "[" + ",".join([r.canonical for r in self.rules]) + "]",
            "vpn_users": _canonical([u.to_fields() for u in self.vpn_users]),
            "default_egress_policy": _canonical(self.default_egress_policy.value),
            "control_sources": _canonical(list(self.control_sources)),
            **{k: _canonical(v) for k, v in extra.items()},
        }
        return "{" + ",".join(f"{_canonical(k)}:{parts[k]}" for k in sorted(parts)) + "}"

    def rules_of(self, kind: type[R]) -> list[tuple[int, R]]:
        """(id, rule) of every rule of one class, by id."""
        return self._by_type.get(kind.type, [])  # type: ignore[return-value]

    @cached_property
    def _by_type(self) -> dict[RuleType, list[tuple[int, Rule]]]:
        base = self.change.base() if self.change is not None else None
        if base is not None and self.change is not None and "_by_type" in base.__dict__:
            return _by_type_changed(base._by_type, self.change)
        out: dict[RuleType, list[tuple[int, Rule]]] = {}
        for r in self.rules:
            out.setdefault(r.rule.type, []).append((r.id, r.rule))
        return out

    @cached_property
    def _claims(self) -> dict[tuple[str, ...], list[tuple[BundleRule, Claim]]]:
        """Every rule's claims by resource (what a patch's rules are checked against)."""
        base = self.change.base() if self.change is not None else None
        if base is not None and self.change is not None and "_claims" in base.__dict__:
            return _claims_changed(base._claims, self.change)
        out: dict[tuple[str, ...], list[tuple[BundleRule, Claim]]] = {}
        for r in self.rules:
            for claim in r.claims:
                out.setdefault(claim.resource, []).append((r, claim))
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
    def from_patch(cls, text: str | bytes, previous: RouterBundle | None) -> RouterBundle:
        """The bundle a patch (`bundle_patch`) makes of `previous`, validated exactly as a whole
        bundle is. Refused (field `base`) unless `previous` is the patch's base, and (field
        `digest`) unless the result has the digest the sender computed."""
        with _cycle_collection_paused():
            try:
                data = json.loads(text, parse_constant=_refuse_constant)
            except (ValueError, RecursionError) as exc:
                raise InvalidInput("patch", f"is not valid JSON: {exc}") from None
            top = FieldReader(data, _PATCH_KEYS)
            check_int(top.name("format"), top.require("format"), BUNDLE_FORMAT, BUNDLE_FORMAT)
            base = FieldReader(top.require("base"), ("version", "digest"), path="base")
            base_version = check_int(base.name("version"), base.require("version"), 0, 2**63 - 1)
            if (
                previous is None
                or previous.version != base_version
                or previous.digest != base.require("digest")
            ):
                here = "no bundle" if previous is None else f"version {previous.version}"
                raise InvalidInput(
                    "base",
                    f"version {base_version} is not the bundle this router runs ({here}); "
                    "send the whole bundle",
                )
            drop_list = check_list("rules_drop", top.get("rules_drop", []), max_items=MAX_RULES)
            drop = {
                check_int(join("rules_drop", i), x, 1, 2**63 - 1) for i, x in enumerate(drop_list)
            }
            put = check_list("rules_put", top.get("rules_put", []), max_items=MAX_RULES)
            version = check_int(top.name("version"), top.require("version"), 0, 2**63 - 1)
            if any(k in data for k in _PATCHED_PARTS):
                # Rare (the network, its addresses, users or policy changed): validate it whole.
                drop |= {x["id"] for x in put if type(x) is dict and type(x.get("id")) is int}
                whole = previous.to_dict_shallow()
                whole.update({k: data[k] for k in _PATCHED_PARTS if k in data})
                whole["version"] = version
                whole["rules"] = [
                    r.raw if r.raw is not None else r.to_dict()
                    for r in previous.rules
                    if r.id not in drop
                ] + put
                bundle = cls._validate(whole, previous, keep_raw=True)
            else:
                bundle = cls._with_rules_changed(previous, version, drop, put)
        claimed = top.require("digest")
        if bundle.digest != claimed:
            raise InvalidInput(
                "digest",
                f"the patched bundle's digest is {bundle.digest}, not the {claimed!s:.64} sent; "
                "send the whole bundle",
            )
        return bundle

    @classmethod
    def with_rules_changed(
        cls, previous: RouterBundle, version: int, drop: set[int], put: list[Any]
    ) -> RouterBundle:
        """`previous` under `version` with the rules of ids `drop` removed and `put` (rule JSON
        objects {"id", "type", "fields"}) added or replacing the rule of the same id; everything
        else is `previous`'s. Each put rule is parsed and checked exactly as in a whole bundle
        (errors name `rules_put[i]`), against the kept rules claiming the same resources."""
        with _cycle_collection_paused():
            return cls._with_rules_changed(previous, version, drop, put)

    @classmethod
    def _with_rules_changed(
        cls, previous: RouterBundle, version: int, drop: set[int], put: list[Any]
    ) -> RouterBundle:
        rules, change = _patched_rules(previous, drop, put)
        bundle = cls(
            version,
            previous.network,
            previous.addresses,
            rules,
            previous.vpn_users,
            previous.default_egress_policy,
            previous.control_sources,
            change,
        )
        # Derive the indexes the next patch and the render use now, from the base's, while the
        # base is alive (it is held weakly): later they would be built anew from all the rules
        # (~15 ms for 10,000).
        for index in ("_claims", "_by_type"):
            if index in previous.__dict__:
                getattr(bundle, index)
        return bundle

    def to_dict_shallow(self) -> dict[str, Any]:
        """`to_dict` without the rules (the parts a patch may replace whole)."""
        return {
            "format": BUNDLE_FORMAT,
            "version": self.version,
            "network": self.network.to_dict(),
            "addresses": self.addresses.to_dict(),
            "vpn_users": [u.to_fields() for u in self.vpn_users],
            "default_egress_policy": self.default_egress_policy.value,
            "control_sources": list(self.control_sources),
        }

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


_PATCHED_PARTS = ("network", "addresses", "vpn_users", "default_egress_policy", "control_sources")
_PATCH_KEYS = ("format", "version", "digest", "base", "rules_put", "rules_drop", *_PATCHED_PARTS)


def bundle_patch(old: RouterBundle, new: RouterBundle) -> str:
    """JSON text that turns `old` (what the router runs) into `new` with `RouterBundle.from_patch`:
    the rules added or changed, whole; the ids of rules removed; every other part that changed;
    and both digests, so the router applies it only to `old` and checks the result is `new`."""
    before = {r.id: r for r in old.rules}
    put = []
    for rule in new.rules:
        was = before.pop(rule.id, None)
        if was is None or (was is not rule and was.canonical != rule.canonical):
            put.append(rule.canonical)
    parts = {
        "format": _canonical(BUNDLE_FORMAT),
        "version": _canonical(new.version),
        "digest": _canonical(new.digest),
        "base": _canonical({"version": old.version, "digest": old.digest}),
        "rules_put": "[" + ",".join(put) + "]",
        "rules_drop": _canonical(sorted(before)),
    }
    old_parts, new_parts = old.to_dict_shallow(), new.to_dict_shallow()
    for key in _PATCHED_PARTS:
        if new_parts[key] != old_parts[key]:
            parts[key] = _canonical(new_parts[key])
    return "{" + ",".join(f"{_canonical(k)}:{parts[k]}" for k in sorted(parts)) + "}"


def bundle_text(
    *,
    version: int,
    network: BundleNetwork,
    addresses: RouterAddresses,
    rules: Iterable[tuple[int, str, str]],
    vpn_users: Iterable[Mapping[str, Any]] = (),
    default_egress_policy: str = EgressPolicy.ALLOW.value,
    control_sources: Iterable[str] = DEFAULT_CONTROL_SOURCES,
) -> str:
    """A bundle's JSON text (for `RouterBundle.from_json`, which validates it) from rules whose
    fields are JSON text already, as the database keeps them: 10,000 rules need no decoding and
    encoding on the way. Text that is not JSON is refused by `from_json` (field `bundle`)."""
    head = {
        "format": BUNDLE_FORMAT,
        "version": version,
        "network": network.to_dict(),
        "addresses": addresses.to_dict(),
        "vpn_users": list(vpn_users),
        "default_egress_policy": default_egress_policy,
        "control_sources": list(control_sources),
    }
    try:
        parts = [f"{_canonical(k)}:{_canonical(v)}" for k, v in head.items()]
    except (TypeError, ValueError) as exc:
        raise InvalidInput("bundle", f"holds a value JSON cannot carry: {exc}") from None
    items = ",".join(
        f'{{"id":{int(i)},"type":{_canonical(t)},"fields":{fields}}}' for i, t, fields in rules
    )
    return "{" + ",".join(parts) + ',"rules":[' + items + "]}"


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
            if (
                before is not None
                and (before.raw is item or before.raw == item)
                and before.id not in out
            ):
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


def changed_rule_ids(old: RouterBundle, new: RouterBundle) -> set[int]:
    """Ids of rules added, removed or changed from `old` to `new`. A patched bundle knows them;
    otherwise a rule counts as unchanged when `new` holds the very object `old` does (bundles
    parsed with `previous` reuse unchanged rules), so this costs one dictionary pass; an equal
    but re-parsed rule counts as changed, which only costs its re-render."""
    if new.change is not None and new.change.is_from(old):
        return new.change.ids
    before = {r.id: r for r in old.rules}
    changed = {r.id for r in new.rules if before.pop(r.id, None) is not r}
    changed.update(before)
    return changed


def _patched_rules(
    previous: RouterBundle, drop: set[int], put: list[Any]
) -> tuple[tuple[BundleRule, ...], RuleChange]:
    """`previous`'s rules without `drop`, with `put` added or replacing the rule of the same id;
    every put rule is parsed and checked exactly as in a whole bundle. Kept rules passed those
    checks together before, so each put rule is checked only against the kept rules claiming
    the same resources. Rules are in id order, so the few that change are found by bisection."""
    ctx = NetworkContext(
        cidr=previous.network.cidr,
        gateway=previous.network.gateway,
        public_ips=frozenset(previous.addresses.public_ips),
    )
    canonical = CanonicalParser(ctx)
    replaced = {x["id"] for x in put if type(x) is dict and type(x.get("id")) is int}
    kept = list(previous.rules)
    before: dict[int, BundleRule] = {}
    for rule_id in sorted(drop | replaced, reverse=True):
        i = bisect.bisect_left(kept, rule_id, key=_rule_id)
        if i < len(kept) and kept[i].id == rule_id:
            before[rule_id] = kept.pop(i)
    taken = _SortedIds(kept)
    added: list[BundleRule] = []
    for i, item in enumerate(put):
        try:
            rule_id, rule = _canonical_rule(item, canonical, taken) or _checked_rule(
                i, item, ctx, taken
            )
        except InvalidInput as exc:
            raise InvalidInput(exc.field.replace("rules[", "rules_put[", 1), exc.reason) from None
        taken.extra.add(rule_id)
        added.append(BundleRule(rule_id, rule, item))
    index = ClaimIndex()
    held = previous._claims
    for resource in {c.resource for entry in added for c in entry.claims}:
        for r, claim in held.get(resource, ()):
            if r.id not in before:
                index.record(f"{r.rule.type} rule {r.id}", (claim,))
    for i, entry in enumerate(added):
        if entry.claims:
            try:
                index.add(f"{entry.rule.type} rule {entry.id}", entry.claims)
            except InvalidInput as exc:
                raise _in_rule(FieldReader({}, (), path=join("rules_put", i)), exc) from None
    for entry in added:  # so few are added that inserting beats sorting
        bisect.insort(kept, entry, key=_rule_id)
    return tuple(kept), RuleChange(weakref.ref(previous), before, {e.id: e for e in added})


class _SortedIds:
    """`in` for the ids of rules in id order (by bisection), plus ids added since."""

    def __init__(self, rules: list[BundleRule]) -> None:
        self.rules = rules
        self.extra: set[int] = set()

    def __contains__(self, rule_id: object) -> bool:
        if rule_id in self.extra:
            return True
        if type(rule_id) is not int:
            return False
        i = bisect.bisect_left(self.rules, rule_id, key=_rule_id)
        return i < len(self.rules) and self.rules[i].id == rule_id


def _by_type_changed(
    base: dict[RuleType, list[tuple[int, Rule]]], change: RuleChange
) -> dict[RuleType, list[tuple[int, Rule]]]:
    """A patched bundle's rules by type, from its base's: only the changed types' lists change."""
    out = dict(base)
    types = {r.rule.type for r in (*change.before.values(), *change.after.values())}
    for kind in types:
        keep = [(i, r) for i, r in base.get(kind, []) if i not in change.before]
        keep += [(i, e.rule) for i, e in change.after.items() if e.rule.type is kind]
        keep.sort(key=_first)
        if keep:
            out[kind] = keep
        else:
            out.pop(kind, None)
    return out


def _claims_changed(
    base: dict[tuple[str, ...], list[tuple[BundleRule, Claim]]],
    change: RuleChange,
) -> dict[tuple[str, ...], list[tuple[BundleRule, Claim]]]:
    """A patched bundle's claims by resource, from its base's: only touched resources change."""
    out = dict(base)
    entries = list(change.after.values())
    gone = {c.resource for r in change.before.values() for c in r.claims}
    for resource in gone | {c.resource for r in entries for c in r.claims}:
        held = [(r, c) for r, c in base.get(resource, ()) if r.id not in change.before]
        held += [(r, c) for r in entries for c in r.claims if c.resource == resource]
        if held:
            out[resource] = held
        else:
            out.pop(resource, None)
    return out


def _first(pair: tuple[int, Rule]) -> int:
    return pair[0]


def _rule_id(rule: BundleRule) -> int:
    return rule.id


_RULE_KEYS = frozenset(("id", "type", "fields"))


def _canonical_rule(
    item: object, canonical: CanonicalParser, taken: Container[int]
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
    i: int, item: object, ctx: NetworkContext, taken: Container[int]
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

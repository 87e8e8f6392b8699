"""The canonical fast path (backend/router/canonical_rules.py) agrees exactly with the precise parser.

For random fields of every rule type (canonical, near-canonical, invalid and hostile), the fast path
either declines (None) or returns the very rule the precise parser returns; it never accepts what the
precise parser refuses. Whole bundles parse to the same bundle and digest, or fail with the same
field and reason, with the fast path as without it. And canonical fields really take the fast path.
"""

from __future__ import annotations

import copy
import gc
import json
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.errors import InvalidInput
from backend.router.bundle import RouterBundle
from backend.router.canonical_rules import CanonicalParser
from backend.router.rules import RULE_FIELDS, NetworkContext, RuleType, parse_rule_alone
from tests.test_router_rules import (
    FIELD_PATHS,
    PUBLIC,
    SNAT_IP,
    VALID,
    VARIANTS,
    _hostile_strategy,
    ctx,
    make_bundle,
)

# Networks the rules are checked against: the tests' /24 with a source NAT IP (as the engine's
# editor checks rules), the same without one (as bundles are checked), a /30 and a /16.
CONTEXTS = [
    ctx(),
    NetworkContext(cidr="10.1.1.0/24", gateway="10.1.1.1", public_ips=PUBLIC),
    NetworkContext(cidr="10.1.1.0/30", gateway="10.1.1.1", public_ips=PUBLIC),
    NetworkContext(
        cidr="10.1.0.0/16", gateway="10.1.255.254", public_ips=PUBLIC, source_nat_ip=SNAT_IP
    ),
]
PARSERS = [CanonicalParser(c) for c in CONTEXTS]

# More canonical bases than VALID holds: every protocol and port shape.
EXTRA_BASES: list[tuple[str, dict[str, Any]]] = [
    ("firewall-ingress", {"public_ip": "203.0.113.6", "protocol": "all"}),
    ("firewall-egress", {"protocol": "tcp", "start_port": 1000, "end_port": 2000}),
    ("firewall-egress", {"protocol": "all", "dest_cidrs": ["0.0.0.0/0", "192.0.2.0/24"]}),
    (
        "port-forward",
        {
            "public_ip": "203.0.113.6",
            "public_start_port": 1000,
            "public_end_port": 1010,
            "private_ip": "10.1.1.2",
            "private_start_port": 1000,
            "private_end_port": 1010,
            "protocol": "udp",
            "open_firewall": False,
        },
    ),
]
BASES: list[tuple[str, dict[str, Any]]] = [
    *VALID.items(),
    *VARIANTS.values(),
    *EXTRA_BASES,
]


def precise(rule_type: object, fields: object, context: NetworkContext) -> object:
    """What the precise parser answers: the rule, or the refusal's (field, reason)."""
    try:
        return parse_rule_alone(rule_type, fields, context)  # type: ignore[arg-type]
    except InvalidInput as exc:
        return (exc.field, exc.reason)


def canonical(rule_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The canonical fields of a valid example, as the engine stores and sends them."""
    return parse_rule_alone(rule_type, fields, ctx()).to_fields()


# ---------------------------------------------------------------- values near the canonical form

# Curated values near the canonical form of each field: every one is tried in every field of
# every example (test_fast_and_precise_paths_agree_on_every_curated_value), and drawn at random.
IP_SAMPLES = [
    *sorted(PUBLIC),
    "203.0.113.8",
    "10.1.1.0",
    "10.1.1.1",
    "10.1.1.2",
    "10.1.1.3",
    "10.1.1.10",
    "10.1.1.255",
    "10.1.2.10",
    "10.1.255.254",
    "10.1.255.255",
    "010.1.1.10",
    "10.1.1.010",
    "10.1.1.256",
    "10.1.1",
    "10.1.1.10/32",
    " 10.1.1.10",
    "10.1.1.10\n",
    "0.0.0.0",
    "127.0.0.1",
    "255.255.255.255",
    "10.1.1.\uff11",
    "169.254.1.1",
    "169.253.255.255",
    "169.255.0.0",
    "126.255.255.255",
    "128.0.0.0",
    "223.255.255.255",
    "224.0.0.1",
    "239.255.255.255",
    "240.0.0.1",
]
CIDR_SAMPLES = [
    "0.0.0.0/0",
    "10.1.1.0/24",
    "10.1.1.0/25",
    "10.1.1.128/25",
    "10.1.1.2/31",
    "10.1.0.0/16",
    "10.1.1.1/24",
    "10.1.1.0/024",
    "10.1.1.0/33",
    "10.1.1.10",
    "198.51.100.0/24",
    "192.0.2.7/32",
    "10.1.1.0/24 ",
    "10.1.1.0\\24",
]
CIDR_LIST_SAMPLES = [
    [],
    ["10.1.1.0/25", "10.1.1.0/25"],
    ["10.1.1.128/25", "10.1.1.0/24", "10.1.1.0/25"],
    ["10.1.1.10", "10.1.1.10/32"],
    [f"10.1.1.{i}/32" for i in range(16)],  # 16 sources ...
    [f"192.0.2.{i}/32" for i in range(17)],  # ... x 17 destinations is over 256 pairs
    [f"192.0.2.{i}/32" for i in range(33)],
    *[[c] for c in CIDR_SAMPLES],
]
PORT_SAMPLES = [0, 1, 22, 53, 80, 1000, 1010, 8080, 65535, 65536, -1, True, False, 80.0, "80"]
ICMP_SAMPLES = [-2, -1, 0, 3, 4, 8, 255, 256, True, "8"]
PROTOCOL_SAMPLES = ["tcp", "udp", "icmp", "all", "TCP", " tcp", "sctp", "", 6]
BOOL_SAMPLES = [True, False, 0, 1, "true", "false"]
MAC_SAMPLES = [
    "02:00:0a:01:01:0a",
    "02:00:0A:01:01:0A",
    "03:00:0a:01:01:0a",
    "00:00:00:00:00:00",
    "ff:ff:ff:ff:ff:ff",
    "02-00-0a-01-01-0a",
    "02:00:0a:01:01",
    "02:00:0a:01:01:0a:0b",
]
LABEL_SAMPLES = [
    "web1",
    "Web1",
    "-web",
    "web-",
    "a" * 63,
    "a" * 64,
    "web.1",
    "1",
    "web_1",
    "db.example.org",
    "db.Example.org",
    "db..org",
    ".db",
    "db.",
    "db.example.123",
    "db.example.1a",
    ".".join(["a" * 63] * 4),
    ".".join(["a" * 63] * 3 + ["a" * 61]),
    ".".join(["a" * 63] * 3 + ["a" * 62]),
]
SAMPLES: dict[str, list[Any]] = {
    "public_ip": IP_SAMPLES,
    "private_ip": IP_SAMPLES,
    "ip": IP_SAMPLES,
    "protocol": PROTOCOL_SAMPLES,
    "source_cidrs": CIDR_LIST_SAMPLES,
    "dest_cidrs": CIDR_LIST_SAMPLES,
    "icmp_type": ICMP_SAMPLES,
    "icmp_code": ICMP_SAMPLES,
    "open_firewall": BOOL_SAMPLES,
    "mac": MAC_SAMPLES,
    "hostname": LABEL_SAMPLES,
}

IPS = st.one_of(
    st.sampled_from(IP_SAMPLES),
    st.builds("10.1.1.{}".format, st.integers(0, 300)),
    st.builds("{}.{}.{}.{}".format, *[st.integers(0, 300)] * 4),
)
CIDR_TEXTS = st.one_of(
    st.sampled_from(CIDR_SAMPLES),
    st.builds("{}/{}".format, IPS, st.integers(0, 33)),
    st.builds("10.1.1.{}/{}".format, st.integers(0, 255), st.integers(24, 32)),
)
CIDR_LISTS = st.one_of(
    st.sampled_from(CIDR_LIST_SAMPLES),
    st.lists(CIDR_TEXTS, min_size=0, max_size=4),
    st.lists(
        st.builds("{}.{}/32".format, st.sampled_from(["192.0.2", "10.1.1"]), st.integers(0, 255)),
        min_size=15,
        max_size=33,
    ),
)
HEX = st.sampled_from(["00", "01", "02", "0a", "0A", "fe", "FF", "g0"])
NEAR: dict[str, Any] = {
    "public_ip": IPS,
    "private_ip": IPS,
    "ip": IPS,
    "source_cidrs": CIDR_LISTS,
    "dest_cidrs": CIDR_LISTS,
    "icmp_type": st.one_of(st.sampled_from(ICMP_SAMPLES), st.integers(-3, 260)),
    "icmp_code": st.one_of(st.sampled_from(ICMP_SAMPLES), st.integers(-3, 260)),
    "mac": st.one_of(
        st.sampled_from(MAC_SAMPLES),
        st.builds(":".join, st.lists(HEX, min_size=6, max_size=6)),
    ),
    "hostname": st.one_of(
        st.sampled_from(LABEL_SAMPLES),
        st.from_regex(r"[a-zA-Z0-9-]{0,66}", fullmatch=True),
    ),
}
PORTS = st.one_of(st.sampled_from(PORT_SAMPLES), st.integers(-3, 70_000))
# The kind of hostile value (tests/test_router_rules.py) each field takes.
KINDS = {path: kind for _, path, kind in FIELD_PATHS if "[" not in path and "." not in path}


def _value_for(key: str, current: Any) -> Any:
    """A replacement value for one field: near its canonical form, or hostile."""
    if key in NEAR:
        near = NEAR[key]
    else:
        near = st.sampled_from(SAMPLES[key]) if key in SAMPLES else PORTS
    choices = [near]
    if key in KINDS:
        choices.append(_hostile_strategy(KINDS[key], current if current is not None else "x"))
    return st.one_of(*choices)


@st.composite
def rule_fields(draw: st.DrawFn, rule_type: str | None = None) -> tuple[str, dict[str, Any]]:
    """A rule type and fields: a canonical example with 0-3 fields changed, removed or added."""
    candidates = [b for b in BASES if rule_type is None or b[0] == rule_type]
    base_type, base = draw(st.sampled_from(candidates))
    fields = canonical(base_type, base) if draw(st.booleans()) else copy.deepcopy(base)
    keys = sorted(RULE_FIELDS[RuleType(base_type)]) + ["start_port", "source_cidrs", "extra"]
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["set", "set", "set", "delete", "null"]))
        if action == "delete":
            fields.pop(key, None)
        elif action == "null":
            fields[key] = None
        else:
            fields[key] = draw(_value_for(key, fields.get(key)))
    return base_type, fields


def assert_agrees(rule_type: object, fields: object) -> None:
    for parser, context in zip(PARSERS, CONTEXTS, strict=True):
        fast = parser.parse(rule_type, copy.deepcopy(fields))
        if fast is not None:
            slow = precise(rule_type, fields, context)
            assert fast == slow, f"{rule_type} {fields!r}: fast {fast!r}, precise {slow!r}"
            assert fast.to_fields() == slow.to_fields()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the tests


def test_the_fast_path_knows_the_rule_types_of_large_bundles() -> None:
    assert PARSERS[0].rule_types >= {
        "firewall-ingress",
        "firewall-egress",
        "port-forward",
        "dhcp-entry",
        "dns-entry",
    }


@pytest.mark.parametrize(("rule_type", "fields"), BASES, ids=lambda v: str(v)[:24])
def test_canonical_fields_of_every_valid_example_take_the_fast_path(
    rule_type: str, fields: dict[str, Any]
) -> None:
    stored = canonical(rule_type, fields)
    fast = PARSERS[0].parse(rule_type, stored)
    if rule_type not in PARSERS[0].rule_types:
        assert fast is None
        return
    assert fast is not None, f"{rule_type} {stored} took the precise path"
    assert fast == parse_rule_alone(rule_type, stored, ctx())


@pytest.mark.parametrize(("rule_type", "fields"), BASES, ids=lambda v: str(v)[:24])
def test_fast_and_precise_paths_agree_on_every_curated_value(
    rule_type: str, fields: dict[str, Any]
) -> None:
    for base in (fields, canonical(rule_type, fields)):
        for key in sorted(RULE_FIELDS[RuleType(rule_type)]):
            for value in SAMPLES.get(key, PORT_SAMPLES):
                assert_agrees(rule_type, {**base, key: value})
            assert_agrees(rule_type, {k: v for k, v in base.items() if k != key})
            assert_agrees(rule_type, {**base, key: None})
        assert_agrees(rule_type, {**base, "extra": 1})
    # Two fields at once: a large egress rule over the limit of source x destination pairs.
    if rule_type == "firewall-egress":
        assert_agrees(
            rule_type,
            {**base, "source_cidrs": CIDR_LIST_SAMPLES[4], "dest_cidrs": CIDR_LIST_SAMPLES[5]},
        )


@pytest.mark.parametrize("rule_type", sorted(VALID))
def test_fast_and_precise_paths_agree_on_random_fields(rule_type: str) -> None:
    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rule_fields(rule_type))
    def check(drawn: tuple[str, dict[str, Any]]) -> None:
        assert_agrees(*drawn)

    check()


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(st.text(max_size=20), st.sampled_from(sorted(VALID)), st.integers(), st.none()),
    st.one_of(
        st.text(max_size=10),
        st.lists(st.integers(), max_size=2),
        st.integers(),
        st.none(),
        st.dictionaries(st.sampled_from(["public_ip", "protocol", "mac"]), IPS, max_size=2),
    ),
)
def test_fast_path_declines_what_is_not_a_rule(rule_type: object, fields: object) -> None:
    assert_agrees(rule_type, fields)


# ---------------------------------------------------------------- whole bundles


def _envelope(draw: st.DrawFn, rule_id: int, rule_type: str, fields: Any) -> Any:
    entry: dict[str, Any] = {"id": rule_id, "type": rule_type, "fields": fields}
    odd = draw(st.sampled_from(["none"] * 8 + ["id", "type", "extra", "missing", "list"]))
    if odd == "id":
        entry["id"] = draw(st.sampled_from([0, -1, True, 1.0, "1", 2**63, None, 1]))
    elif odd == "type":
        entry["type"] = draw(st.sampled_from(["Port-Forward", "nat", 3, None, ""]))
    elif odd == "extra":
        entry["note"] = "x"
    elif odd == "missing":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif odd == "list":
        return [entry]
    return entry


@st.composite
def bundle_texts(draw: st.DrawFn) -> str:
    data = make_bundle().to_dict()
    rules, types = [], set()
    for i in range(draw(st.integers(1, 6))):
        rule_type, fields = draw(rule_fields())
        rules.append(_envelope(draw, i + 1, rule_type, fields))
        types.add(rule_type)
    if draw(st.booleans()):  # the other rule types, to meet in conflicts
        rules += [r for r in data["rules"] if r["type"] not in types]
    data["rules"] = draw(st.permutations(rules))
    return json.dumps(data)


def _outcome(text: str) -> object:
    try:
        bundle = RouterBundle.from_json(text)
    except InvalidInput as exc:
        return (exc.field, exc.reason)
    return (bundle, bundle.digest, bundle.to_json())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bundle_texts())
def test_bundles_parse_the_same_with_and_without_the_fast_path(text: str) -> None:
    fast = _outcome(text)
    with mock.patch.object(CanonicalParser, "parse", return_value=None):
        slow = _outcome(text)
    assert fast == slow


def test_a_large_canonical_bundle_takes_the_fast_path_for_every_rule() -> None:
    from tests.test_router_render import big_bundle

    text = big_bundle().to_json()
    with mock.patch("backend.router.bundle.parse_rule_alone", side_effect=AssertionError):
        fast = RouterBundle.from_json(text)
    with mock.patch.object(CanonicalParser, "parse", return_value=None):
        slow = RouterBundle.from_json(text)
    assert len(fast.rules) == 10_000
    assert fast == slow and fast.digest == slow.digest


def test_parsing_leaves_cycle_collection_as_it_was() -> None:
    text = make_bundle().to_json()
    assert gc.isenabled()
    RouterBundle.from_json(text)
    assert gc.isenabled()
    with pytest.raises(InvalidInput):
        RouterBundle.from_json(text.replace('"format":1', '"format":2'))
    assert gc.isenabled()
    gc.disable()
    try:
        RouterBundle.from_dict(json.loads(text))
        assert not gc.isenabled()
    finally:
        gc.enable()

"""Router rules: every rule type's fields are checked, normalized and refused with the field named.

Covers the rule model (backend/router/rules.py), conflicts between rules, the router bundle's JSON
seam, and property tests pushing hostile values through every field of every rule type.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from backend.errors import InvalidInput
from backend.router.bundle import BundleNetwork, RouterAddresses, RouterBundle
from backend.router.rules import (
    Algorithm,
    EgressPolicy,
    FirewallEgressRule,
    LoadBalancerRule,
    NatProtocol,
    NetworkContext,
    PortForwardRule,
    Rule,
    parse_egress_policy,
    parse_rule,
    parse_vpn_user,
)

CIDR = "10.1.1.0/24"
GATEWAY = "10.1.1.1"
SNAT_IP = "203.0.113.5"
PUBLIC = frozenset({SNAT_IP, "203.0.113.6", "203.0.113.7"})


def ctx(rules: dict[int, Rule] | None = None, **kw: Any) -> NetworkContext:
    return NetworkContext(
        cidr=CIDR,
        gateway=GATEWAY,
        public_ips=PUBLIC,
        rules=rules or {},
        source_nat_ip=SNAT_IP,
        **kw,
    )


# One valid example of every rule type, with every optional field given.
VALID: dict[str, dict[str, Any]] = {
    "firewall-ingress": {
        "public_ip": "203.0.113.5",
        "protocol": "tcp",
        "start_port": 22,
        "end_port": 23,
        "source_cidrs": ["198.51.100.0/24", "192.0.2.7/32"],
    },
    "firewall-egress": {
        "protocol": "udp",
        "start_port": 53,
        "end_port": 53,
        "source_cidrs": ["10.1.1.0/25"],
        "dest_cidrs": ["198.51.100.0/24"],
    },
    "port-forward": {
        "public_ip": "203.0.113.5",
        "public_start_port": 8080,
        "public_end_port": 8080,
        "private_ip": "10.1.1.10",
        "private_start_port": 80,
        "private_end_port": 80,
        "protocol": "tcp",
        "open_firewall": True,
    },
    "static-nat": {"public_ip": "203.0.113.6", "private_ip": "10.1.1.20"},
    "source-nat": {"public_ip": "203.0.113.5"},
    "load-balancer": {
        "name": "web",
        "public_ip": "203.0.113.7",
        "public_port": 80,
        "private_port": 8000,
        "protocol": "tcp",
        "algorithm": "leastconn",
        "members": ["10.1.1.10", {"ip": "10.1.1.11", "port": 8001}],
        "health_check": {"interval": 5, "timeout": 2, "path": "/health"},
        "stickiness": "cookie",
        "open_firewall": False,
    },
    "dhcp-entry": {"mac": "02:00:0a:01:01:0a", "ip": "10.1.1.10", "hostname": "web1"},
    "dns-entry": {"hostname": "db.example.org", "ip": "10.1.1.12"},
    "remote-access-vpn": {
        "public_ip": "203.0.113.5",
        "psk": "correct horse battery",
        "client_ip_range": "10.1.2.1-10.1.2.8",
    },
}
VALID_USER = {"username": "alice.b-c_1", "password": "s3cret pass!"}


def fields(rule_type: str, **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(VALID[rule_type])
    for key, value in changes.items():
        if value is DELETE:
            out.pop(key, None)
        else:
            out[key] = value
    return out


DELETE = object()


def refused(rule_type: str, f: object, context: NetworkContext | None = None) -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        parse_rule(rule_type, f, context or ctx())  # type: ignore[arg-type]
    return err.value


# ---------------------------------------------------------------- valid rules, canonical form


@pytest.mark.parametrize("rule_type", sorted(VALID))
def test_every_rule_type_parses_and_round_trips_through_its_canonical_fields(
    rule_type: str,
) -> None:
    rule = parse_rule(rule_type, VALID[rule_type], ctx())
    canonical = rule.to_fields()
    assert json.loads(json.dumps(canonical)) == canonical
    again = parse_rule(rule_type, canonical, ctx())
    assert again == rule
    assert again.to_fields() == canonical


def test_canonical_form_fills_defaults_and_normalizes() -> None:
    rule = parse_rule(
        "firewall-ingress",
        {
            "public_ip": "203.0.113.5",
            "protocol": "tcp",
            "start_port": 22,
            "source_cidrs": ["192.0.2.7", "10.0.0.0/8", "192.0.2.7/32"],
        },
        ctx(),
    )
    assert rule.to_fields() == {
        "public_ip": "203.0.113.5",
        "protocol": "tcp",
        "start_port": 22,
        "end_port": 22,
        "source_cidrs": ["10.0.0.0/8", "192.0.2.7/32"],
    }
    assert parse_rule(
        "firewall-ingress", {"public_ip": "203.0.113.5", "protocol": "icmp"}, ctx()
    ).to_fields() == {
        "public_ip": "203.0.113.5",
        "protocol": "icmp",
        "source_cidrs": ["0.0.0.0/0"],
        "icmp_type": -1,
        "icmp_code": -1,
    }


def test_egress_defaults_to_the_network_as_source_and_anywhere_as_destination() -> None:
    rule = parse_rule("firewall-egress", {"protocol": "all"}, ctx())
    assert isinstance(rule, FirewallEgressRule)
    assert rule.source_cidrs == (CIDR,)
    assert rule.dest_cidrs == ("0.0.0.0/0",)


def test_port_forward_accepts_single_port_shorthand() -> None:
    rule = parse_rule(
        "port-forward",
        {
            "public_ip": "203.0.113.5",
            "public_port": 8080,
            "private_ip": "10.1.1.10",
            "private_port": 80,
            "protocol": "tcp",
        },
        ctx(),
    )
    assert isinstance(rule, PortForwardRule)
    assert rule.to_fields() == fields("port-forward")


def test_load_balancer_members_become_ip_port_pairs_sorted_by_address() -> None:
    rule = parse_rule(
        "load-balancer",
        {
            "name": "Web",
            "public_ip": "203.0.113.7",
            "public_port": 80,
            "members": ["10.1.1.30", {"ip": "10.1.1.4"}],
        },
        ctx(),
    )
    assert isinstance(rule, LoadBalancerRule)
    assert rule.name == "web"
    assert rule.private_port == 80
    assert rule.algorithm is Algorithm.ROUNDROBIN
    assert [(m.ip, m.port) for m in rule.members] == [("10.1.1.4", 80), ("10.1.1.30", 80)]
    assert "health_check" not in rule.to_fields()


def test_mac_is_stored_in_lower_case() -> None:
    rule = parse_rule("dhcp-entry", fields("dhcp-entry", mac="02:00:0A:01:01:0B"), ctx())
    assert rule.to_fields()["mac"] == "02:00:0a:01:01:0b"


def test_vpn_user_and_egress_policy() -> None:
    user = parse_vpn_user(VALID_USER)
    assert user.to_fields() == VALID_USER
    assert parse_egress_policy("deny") is EgressPolicy.DENY
    with pytest.raises(InvalidInput) as err:
        parse_vpn_user(VALID_USER, ctx(vpn_usernames=frozenset({"alice.b-c_1"})))
    assert err.value.field == "username"
    with pytest.raises(InvalidInput) as err:
        parse_egress_policy("permit")
    assert err.value.field == "default_egress_policy"


# ---------------------------------------------------------------- each invalid field is named

INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("firewall-ingress", {"public_ip": "198.51.100.1"}, "public_ip", "not a public IP"),
    ("firewall-ingress", {"public_ip": DELETE}, "public_ip", "required"),
    ("firewall-ingress", {"protocol": "sctp"}, "protocol", "one of tcp, udp, icmp, all"),
    ("firewall-ingress", {"start_port": 0}, "start_port", "between 1 and 65535"),
    ("firewall-ingress", {"end_port": 65536}, "end_port", "between 1 and 65535"),
    ("firewall-ingress", {"start_port": 30, "end_port": 20}, "end_port", "not be below"),
    ("firewall-ingress", {"start_port": DELETE}, "start_port", "required"),
    ("firewall-ingress", {"start_port": "22"}, "start_port", "got a string"),
    ("firewall-ingress", {"start_port": 22.0}, "start_port", "fraction"),
    ("firewall-ingress", {"start_port": True}, "start_port", "boolean"),
    ("firewall-ingress", {"start_port": 10**40}, "start_port", "41-digit"),
    ("firewall-ingress", {"source_cidrs": "0.0.0.0/0"}, "source_cidrs", "must be a list"),
    ("firewall-ingress", {"source_cidrs": []}, "source_cidrs", "at least 1"),
    (
        "firewall-ingress",
        {"source_cidrs": ["10.0.0.0/8", "10.0.0.1/8"]},
        "source_cidrs[1]",
        "host bits",
    ),
    ("firewall-ingress", {"source_cidrs": ["10.0.0.0/33"]}, "source_cidrs[0]", "0-32"),
    ("firewall-ingress", {"source_cidrs": ["1.2.3.0/24"] * 33}, "source_cidrs", "at most 32"),
    ("firewall-ingress", {"icmp_type": 8}, "icmp_type", "only for protocol icmp"),
    ("firewall-ingress", {"color": "red"}, "color", "unknown field"),
    (
        "firewall-egress",
        {"source_cidrs": ["10.2.0.0/24"]},
        "source_cidrs[0]",
        "not inside the network",
    ),
    ("firewall-egress", {"dest_cidrs": ["0.0.0.0/0", 5]}, "dest_cidrs[1]", "must be a string"),
    ("port-forward", {"private_ip": "10.1.2.10"}, "private_ip", "outside the network"),
    ("port-forward", {"private_ip": "10.1.1.1"}, "private_ip", "gateway"),
    ("port-forward", {"private_ip": "10.1.1.255"}, "private_ip", "broadcast"),
    ("port-forward", {"private_ip": "10.1.1.010"}, "private_ip", "leading zeros"),
    ("port-forward", {"public_ip": "203.0.113.9"}, "public_ip", "not a public IP"),
    ("port-forward", {"protocol": "icmp"}, "protocol", "one of tcp, udp"),
    ("port-forward", {"open_firewall": 1}, "open_firewall", "true or false"),
    (
        "port-forward",
        {"public_end_port": 8090, "private_end_port": 85},
        "private_end_port",
        "same size",
    ),
    (
        "port-forward",
        {"public_end_port": 8090, "private_end_port": 90},
        "private_end_port",
        "same ports",
    ),
    ("port-forward", {"public_port": 80}, "public_start_port", "not both"),
    ("static-nat", {"public_ip": SNAT_IP}, "public_ip", "source NAT IP"),
    ("static-nat", {"private_ip": "10.1.1.0"}, "private_ip", "network or broadcast"),
    ("source-nat", {"public_ip": "1.1.1.1"}, "public_ip", "not a public IP"),
    ("load-balancer", {"name": "web_1"}, "name", "not a host name"),
    ("load-balancer", {"name": "-web"}, "name", "not a host name"),
    ("load-balancer", {"name": "w" * 64}, "name", "at most 63"),
    ("load-balancer", {"protocol": "udp"}, "protocol", "TCP only"),
    ("load-balancer", {"algorithm": "random"}, "algorithm", "roundrobin, leastconn, source"),
    ("load-balancer", {"stickiness": "lb-cookie"}, "stickiness", "none, source, cookie"),
    ("load-balancer", {"members": ["10.1.1.10", "10.1.1.11", "10.9.9.9"]}, "members[2]", "outside"),
    (
        "load-balancer",
        {"members": ["10.1.1.10", {"ip": "10.1.1.11"}, {"ip": "10.1.1.300"}]},
        "members[2].ip",
        "above 255",
    ),
    ("load-balancer", {"members": [{"ip": "10.1.1.11", "port": 0}]}, "members[0].port", "between"),
    (
        "load-balancer",
        {"members": [{"ip": "10.1.1.11", "weight": 2}]},
        "members[0].weight",
        "unknown",
    ),
    (
        "load-balancer",
        {"members": ["10.1.1.10", {"ip": "10.1.1.10", "port": 8000}]},
        "members[1]",
        "twice",
    ),
    (
        "load-balancer",
        {"health_check": {"interval": 5, "timeout": 9}},
        "health_check.timeout",
        "exceed",
    ),
    ("load-balancer", {"health_check": {"interval": 0}}, "health_check.interval", "between 1"),
    ("load-balancer", {"health_check": {"path": "health"}}, "health_check.path", "start with '/'"),
    ("load-balancer", {"health_check": {"path": "/a b"}}, "health_check.path", "spaces"),
    ("load-balancer", {"health_check": {"path": "/a#b"}}, "health_check.path", "'#'"),
    ("load-balancer", {"health_check": "yes"}, "health_check", "must be an object"),
    ("dhcp-entry", {"mac": "02-00-0a-01-01-0a"}, "mac", "not a MAC"),
    ("dhcp-entry", {"mac": "01:00:5e:00:00:01"}, "mac", "multicast"),
    ("dhcp-entry", {"ip": "10.1.1.1"}, "ip", "gateway"),
    ("dhcp-entry", {"hostname": "web.one"}, "hostname", "not a host name"),
    ("dns-entry", {"hostname": "db..example"}, "hostname", "not a host name"),
    ("dns-entry", {"hostname": "1.2.3.4"}, "hostname", "looks like an address"),
    ("dns-entry", {"ip": "127.0.0.1"}, "ip", "loopback"),
    ("dns-entry", {"ip": "224.0.0.5"}, "ip", "multicast"),
    ("remote-access-vpn", {"psk": "short"}, "psk", "8 to 128"),
    ("remote-access-vpn", {"psk": "x" * 129}, "psk", "8 to 128"),
    ("remote-access-vpn", {"psk": "abc\ndefgh"}, "psk", "control character"),
    ("remote-access-vpn", {"client_ip_range": "10.1.2.1"}, "client_ip_range", "not a range"),
    ("remote-access-vpn", {"client_ip_range": "10.1.2.8-10.1.2.1"}, "client_ip_range", "after"),
    (
        "remote-access-vpn",
        {"client_ip_range": "10.1.1.200-10.1.2.8"},
        "client_ip_range",
        "overlaps",
    ),
    ("remote-access-vpn", {"client_ip_range": "10.2.0.1-10.2.8.1"}, "client_ip_range", "at most"),
    (
        "remote-access-vpn",
        {"client_ip_range": "169.254.0.1-169.254.0.9"},
        "client_ip_range",
        "link-local",
    ),
]


@pytest.mark.parametrize(("rule_type", "changes", "field", "reason"), INVALID)
def test_each_invalid_field_is_refused_naming_the_field_and_why(
    rule_type: str, changes: dict[str, Any], field: str, reason: str
) -> None:
    err = refused(rule_type, fields(rule_type, **changes))
    assert err.field == field, str(err)
    assert reason in err.reason, str(err)
    assert str(err).startswith(f"{field}: ")


def test_unknown_rule_type_and_non_object_fields_are_refused() -> None:
    assert refused("firewall", {}).field == "type"
    assert refused("dhcp-entry", ["mac"]).field == "fields"


def test_secrets_are_never_echoed_in_errors() -> None:
    err = refused("remote-access-vpn", fields("remote-access-vpn", psk="hunter2\x00hunter2"))
    assert err.field == "psk"
    assert "hunter2" not in str(err)
    with pytest.raises(InvalidInput) as user_err:
        parse_vpn_user({"username": "bob", "password": "hunter2\thunter2"})
    assert user_err.value.field == "password"
    assert "hunter2" not in str(user_err.value)


def test_lookalike_and_hostile_identifiers_are_named() -> None:
    cases = {
        "１０.1.1.5": "FULLWIDTH DIGIT ONE",
        "10.1.1.\u0665": "ARABIC-INDIC DIGIT FIVE",
        "10.1.1.5\u200b": "ZERO WIDTH SPACE",
        "10.1.1.5 ;ls": "spaces",
        "10.1.1.5;ls": "not an IPv4 address",
        "10.1.1.5\n": "control character U+000A",
        "10.1.1.5\x00": "control character U+0000",
    }
    for value, reason in cases.items():
        err = refused("dhcp-entry", fields("dhcp-entry", ip=value))
        assert err.field == "ip"
        assert reason in err.reason, str(err)
    err = refused("dhcp-entry", fields("dhcp-entry", hostname="w\u0435b1"))  # Cyrillic e
    assert err.field == "hostname"
    assert "CYRILLIC SMALL LETTER IE" in err.reason


# ---------------------------------------------------------------- conflicts between rules


def parsed(rule_type: str, **changes: Any) -> Rule:
    return parse_rule(rule_type, fields(rule_type, **changes), ctx())


def test_overlapping_port_forward_ranges_on_one_ip_and_protocol_are_refused() -> None:
    existing = {
        7: parsed(
            "port-forward",
            public_start_port=8000,
            public_end_port=8010,
            private_start_port=8000,
            private_end_port=8010,
        )
    }
    err = refused(
        "port-forward",
        fields(
            "port-forward",
            public_start_port=8010,
            public_end_port=8020,
            private_start_port=8010,
            private_end_port=8020,
        ),
        ctx(existing),
    )
    assert err.field == "public_start_port"
    assert "port-forward rule 7" in err.reason
    assert "8000-8010" in err.reason
    # Adjacent ranges, another protocol or another public IP are fine.
    for ok in (
        fields(
            "port-forward",
            public_start_port=8011,
            public_end_port=8020,
            private_start_port=8011,
            private_end_port=8020,
        ),
        fields("port-forward", public_start_port=8005, public_end_port=8005, protocol="udp"),
        fields(
            "port-forward", public_ip="203.0.113.7", public_start_port=8005, public_end_port=8005
        ),
    ):
        parse_rule("port-forward", ok, ctx(existing))


def test_load_balancer_port_clashes_with_port_forward_and_vice_versa() -> None:
    lb = parsed("load-balancer", public_ip=SNAT_IP, public_port=8080)
    err = refused("port-forward", fields("port-forward"), ctx({3: lb}))
    assert err.field == "public_start_port"
    assert "load-balancer rule 3" in err.reason
    pf = parsed("port-forward")
    err = refused(
        "load-balancer", fields("load-balancer", public_ip=SNAT_IP, public_port=8080), ctx({4: pf})
    )
    assert err.field == "public_port"
    assert "port-forward rule 4" in err.reason
    # udp forwarding of the same port number does not clash with a (tcp) load balancer
    parse_rule("port-forward", fields("port-forward", protocol="udp"), ctx({3: lb}))


def test_static_nat_ip_is_exclusive() -> None:
    snat = parsed("static-nat")
    for rule_type, changes, field in (
        ("port-forward", {"public_ip": "203.0.113.6"}, "public_ip"),
        ("load-balancer", {"public_ip": "203.0.113.6"}, "public_ip"),
        ("static-nat", {"private_ip": "10.1.1.21"}, "public_ip"),
        ("static-nat", {"public_ip": "203.0.113.7"}, "private_ip"),
        ("remote-access-vpn", {"public_ip": "203.0.113.6"}, "public_ip"),
    ):
        err = refused(rule_type, fields(rule_type, **changes), ctx({1: snat}))
        assert err.field == field, str(err)
        assert "static-nat rule 1" in err.reason
    err = refused(
        "static-nat",
        fields("static-nat"),
        ctx({2: parsed("port-forward", public_ip="203.0.113.6")}),
    )
    assert err.field == "public_ip"


def test_singletons_and_unique_names() -> None:
    cases = [
        ("source-nat", {}, "public_ip", "source-nat"),
        ("remote-access-vpn", {}, "public_ip", "remote-access-vpn"),
        ("load-balancer", {"public_port": 81}, "name", "load-balancer"),
        ("dhcp-entry", {"ip": "10.1.1.99", "hostname": "other"}, "mac", "dhcp-entry"),
        ("dhcp-entry", {"mac": "02:00:00:00:00:99", "hostname": "other"}, "ip", "dhcp-entry"),
        ("dhcp-entry", {"mac": "02:00:00:00:00:99", "ip": "10.1.1.99"}, "hostname", "dhcp-entry"),
        ("dns-entry", {}, "hostname", "dns-entry"),
    ]
    for rule_type, changes, field, owner in cases:
        existing = {5: parsed(rule_type)}
        err = refused(rule_type, fields(rule_type, **changes), ctx(existing))
        assert err.field == field, str(err)
        assert f"{owner} rule 5" in err.reason


def test_vpn_ports_clash_with_udp_forwarding_on_the_same_ip() -> None:
    pf = parsed(
        "port-forward",
        public_start_port=400,
        public_end_port=600,
        private_start_port=400,
        private_end_port=600,
        protocol="udp",
    )
    err = refused("remote-access-vpn", fields("remote-access-vpn"), ctx({9: pf}))
    assert err.field == "public_ip"
    assert "port 500/udp" in err.reason


def test_conflict_check_scales_to_ten_thousand_rules() -> None:
    import time

    existing: dict[int, Rule] = {}
    for i in range(10_000):
        existing[i + 1] = PortForwardRule(
            SNAT_IP,
            _range(2 * i + 1),
            "10.1.1.10",
            _range(2 * i + 1),
            NatProtocol.TCP,
        )
    start = time.perf_counter()
    big = ctx(existing)
    err = refused(
        "port-forward", fields("port-forward", public_start_port=15001, public_end_port=15001), big
    )
    assert "port-forward rule 7501" in err.reason
    parse_rule(
        "port-forward", fields("port-forward", public_start_port=15002, public_end_port=15002), big
    )
    assert time.perf_counter() - start < 5


def _range(port: int) -> Any:
    from backend.router.rules import PortRange

    return PortRange(port, port)


# ---------------------------------------------------------------- the bundle's JSON seam


def make_bundle(
    version: int = 1, rules: list[tuple[int, str, dict[str, Any]]] | None = None
) -> RouterBundle:
    if rules is None:
        rules = [(i + 1, t, VALID[t]) for i, t in enumerate(sorted(VALID))]
    return RouterBundle.create(
        version=version,
        network=BundleNetwork("net-1", CIDR, GATEWAY, 100, "net-1.cloud.internal", ("192.0.2.53",)),
        addresses=RouterAddresses("169.254.3.4", GATEWAY, tuple(sorted(PUBLIC))),
        rules=rules,
        vpn_users=[VALID_USER, {"username": "bob", "password": 'p@ss word"\\#'}],
        default_egress_policy="deny",
    )


def test_bundle_json_is_canonical_and_round_trips() -> None:
    bundle = make_bundle()
    text = bundle.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    again = RouterBundle.from_json(text)
    assert again == bundle
    assert again.to_json() == text
    assert [r.id for r in bundle.rules] == sorted(r.id for r in bundle.rules)
    assert [u.username for u in bundle.vpn_users] == ["alice.b-c_1", "bob"]


def test_digest_ignores_the_version_and_rule_order_but_not_content() -> None:
    rules = [(i + 1, t, VALID[t]) for i, t in enumerate(sorted(VALID))]
    one = make_bundle(1, rules)
    two = make_bundle(2, list(reversed(rules)))
    assert one.version != two.version
    assert one.digest == two.digest
    assert len(one.digest) == 64
    changed = [
        (i, t, {**f, "psk": "another secret"} if t == "remote-access-vpn" else f)
        for i, t, f in rules
    ]
    assert make_bundle(1, changed).digest != one.digest


def _bundle_error(data: dict[str, Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_json(json.dumps(data))
    return err.value


def test_bundle_errors_name_the_dotted_path() -> None:
    base = make_bundle().to_dict()
    cases: list[tuple[str, Any, str]] = [
        ("rules.3.fields.public_ip", "198.51.100.1", "rules[3].fields.public_ip"),
        ("rules.4.fields.members.1.port", 0, "rules[4].fields.members[1].port"),
        ("rules.0.id", True, "rules[0].id"),
        ("rules.0.type", "nat", "rules[0].type"),
        ("rules.0.fields", "x", "rules[0].fields"),
        ("version", -1, "version"),
        ("version", 1.5, "version"),
        ("format", 2, "format"),
        ("network.cidr", "10.1.1.0/33", "network.cidr"),
        ("network.name", "net 1", "network.name"),
        ("network.vlan", 4095, "network.vlan"),
        ("addresses.guest_ip", "10.1.1.2", "addresses.guest_ip"),
        ("addresses.public_ips.1", "203.0.113.5", "addresses.public_ips[1]"),
        ("vpn_users.1.password", "short", "vpn_users[1].password"),
        ("vpn_users.1.username", "alice.b-c_1", "vpn_users[1].username"),
        ("default_egress_policy", "open", "default_egress_policy"),
        ("control_sources", [], "control_sources"),
        ("control_sources.0", "169.254.0.1/16", "control_sources[0]"),
    ]
    for path, value, field in cases:
        data = copy.deepcopy(base)
        _set(data, path.split("."), value)
        err = _bundle_error(data)
        assert err.field == field, f"{path}: {err}"
    data = copy.deepcopy(base)
    data["rules"].append(copy.deepcopy(data["rules"][0]))
    assert _bundle_error(data).field == f"rules[{len(base['rules'])}].id"
    data = copy.deepcopy(base)
    dup = copy.deepcopy(data["rules"][0])
    dup["id"] = 999
    data["rules"].append(dup)
    err = _bundle_error(data)
    assert err.field.startswith(f"rules[{len(base['rules'])}].fields.")
    data = copy.deepcopy(base)
    data["extra"] = 1
    assert _bundle_error(data).field == "extra"


def test_bundle_refuses_non_json_and_deep_nesting() -> None:
    for text in (
        "{",
        "NaN",
        '{"version": Infinity}',
        "[" * 100_000,
        '{"version": 1' + "0" * 5000 + "}",
    ):
        with pytest.raises(InvalidInput) as err:
            RouterBundle.from_json(text)
        assert err.value.field in ("bundle", "fields"), str(err.value)


def _set(data: Any, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        data = data[int(key)] if isinstance(data, list) else data[key]
    last = path[-1]
    if isinstance(data, list):
        data[int(last)] = value
    else:
        data[last] = value


# ---------------------------------------------------------------- hostile values, every field

# (rule type, dotted path inside the fields, kind). Kinds say what a hostile value looks like.
# Variants whose base example makes more fields reachable (ICMP type/code, port shorthands).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "firewall-ingress/icmp": (
        "firewall-ingress",
        {"public_ip": "203.0.113.6", "protocol": "icmp", "icmp_type": 3, "icmp_code": 4},
    ),
    "firewall-egress/icmp": (
        "firewall-egress",
        {"protocol": "icmp", "icmp_type": 8, "icmp_code": 0, "source_cidrs": ["10.1.1.0/24"]},
    ),
    "port-forward/single": (
        "port-forward",
        {
            "public_ip": "203.0.113.5",
            "public_port": 8080,
            "private_ip": "10.1.1.10",
            "private_port": 80,
            "protocol": "udp",
        },
    ),
}

FIELD_PATHS: list[tuple[str, str, str]] = [
    ("firewall-ingress", "source_cidrs[0]", "cidr"),
    ("firewall-ingress/icmp", "icmp_type", "int"),
    ("firewall-ingress/icmp", "icmp_code", "int"),
    ("firewall-egress/icmp", "icmp_type", "int"),
    ("firewall-egress/icmp", "icmp_code", "int"),
    ("port-forward/single", "public_port", "int"),
    ("port-forward/single", "private_port", "int"),
    ("port-forward/single", "protocol", "enum"),
    ("firewall-ingress", "public_ip", "ip"),
    ("firewall-ingress", "protocol", "enum"),
    ("firewall-ingress", "start_port", "int"),
    ("firewall-ingress", "end_port", "int"),
    ("firewall-ingress", "source_cidrs", "list"),
    ("firewall-ingress", "source_cidrs[1]", "cidr"),
    ("firewall-egress", "protocol", "enum"),
    ("firewall-egress", "start_port", "int"),
    ("firewall-egress", "end_port", "int"),
    ("firewall-egress", "source_cidrs[0]", "cidr"),
    ("firewall-egress", "dest_cidrs", "list"),
    ("firewall-egress", "dest_cidrs[0]", "cidr"),
    ("port-forward", "public_ip", "ip"),
    ("port-forward", "public_start_port", "int"),
    ("port-forward", "public_end_port", "int"),
    ("port-forward", "private_ip", "ip"),
    ("port-forward", "private_start_port", "int"),
    ("port-forward", "private_end_port", "int"),
    ("port-forward", "protocol", "enum"),
    ("port-forward", "open_firewall", "bool"),
    ("static-nat", "public_ip", "ip"),
    ("static-nat", "private_ip", "ip"),
    ("source-nat", "public_ip", "ip"),
    ("load-balancer", "name", "name"),
    ("load-balancer", "public_ip", "ip"),
    ("load-balancer", "public_port", "int"),
    ("load-balancer", "private_port", "int"),
    ("load-balancer", "protocol", "enum"),
    ("load-balancer", "algorithm", "enum"),
    ("load-balancer", "members", "list"),
    ("load-balancer", "members[0]", "ip"),
    ("load-balancer", "members[1].ip", "ip"),
    ("load-balancer", "members[1].port", "int"),
    ("load-balancer", "health_check", "object"),
    ("load-balancer", "health_check.interval", "int"),
    ("load-balancer", "health_check.timeout", "int"),
    ("load-balancer", "health_check.path", "path"),
    ("load-balancer", "stickiness", "enum"),
    ("load-balancer", "open_firewall", "bool"),
    ("dhcp-entry", "mac", "mac"),
    ("dhcp-entry", "ip", "ip"),
    ("dhcp-entry", "hostname", "name"),
    ("dns-entry", "hostname", "name"),
    ("dns-entry", "ip", "ip"),
    ("remote-access-vpn", "public_ip", "ip"),
    ("remote-access-vpn", "psk", "secret"),
    ("remote-access-vpn", "client_ip_range", "range"),
    ("vpn-user", "username", "username"),
    ("vpn-user", "password", "secret"),
]
FREE_TEXT_KINDS = {"secret", "path"}
# What an accepted value of each kind may look like: plain ASCII of its grammar.
SAFE = {
    "ip": re.compile(r"[0-9.]{7,15}"),
    "cidr": re.compile(r"[0-9./]{7,18}"),
    "enum": re.compile(r"[a-z-]{2,16}"),
    "name": re.compile(r"[a-z0-9.-]{1,253}"),
    "mac": re.compile(r"[0-9a-f:]{17}"),
    "range": re.compile(r"[0-9.-]{15,31}"),
    "username": re.compile(r"[A-Za-z0-9._-]{1,64}"),
    "secret": re.compile(r"[ -~]{8,128}"),
    "path": re.compile(r"/[!-~]{0,254}"),
}
SHELL = [" ", *"; | && $(id) `id` > < ' \" \\ * { } # ! ~ ^ [ ] % =".split(" ")]
CONTROL = list("\n\r\x00\t\x1b\x7f\x85\u2028")
# Fullwidth and Arabic-Indic digits, Cyrillic a/e/i, zero-width space, RTL override, NBSP,
# one-dot leader, fullwidth full stop, Unicode hyphen.
LOOKALIKE = list("\uff11\u0661\u0430\u0435\u0456\u200b\u202e\u00a0\u2024\uff0e\u2010")


def _split(path: str) -> list[str | int]:
    out: list[str | int] = []
    for part in path.split("."):
        m = re.fullmatch(r"([a-z_]+)((?:\[\d+\])*)", part)
        assert m, part
        out.append(m.group(1))
        out.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return out


def _get(data: Any, path: str) -> Any:
    for key in _split(path):
        data = data[key]
    return data


def _put(data: Any, path: str, value: Any) -> None:
    keys = _split(path)
    for key in keys[:-1]:
        data = data[key]
    data[keys[-1]] = value


def _hostile_strategy(kind: str, valid: Any) -> Any:
    from hypothesis import strategies as st

    if kind == "int":
        return st.one_of(
            st.integers(min_value=70_000),
            st.integers(max_value=-2),
            st.just(10**100),
            st.booleans(),
            st.floats(allow_nan=True),
            st.text(alphabet="0123456789\uff10\u0660", min_size=1, max_size=6),
            st.lists(st.integers(1, 80), max_size=2),
        )
    if kind == "bool":
        return st.one_of(st.integers(), st.sampled_from(["true", "false", "yes", ""]), st.floats())
    if kind == "list":
        return st.one_of(
            st.text(max_size=20),
            st.integers(),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
            st.lists(st.sampled_from(SHELL + CONTROL + LOOKALIKE), min_size=1, max_size=3),
            st.just(["10.1.1.10"] * 300),
        )
    if kind == "object":
        return st.one_of(st.text(max_size=20), st.integers(), st.lists(st.integers(), max_size=2))
    text = str(valid)
    pieces = SHELL + CONTROL + LOOKALIKE
    if kind in FREE_TEXT_KINDS:
        pieces = CONTROL + LOOKALIKE + SHELL
    inserted = st.builds(
        lambda piece, at: text[:at] + piece + text[at:],
        st.sampled_from(pieces),
        st.integers(0, len(text)),
    )
    return st.one_of(
        inserted,
        st.just(text * 300),
        st.just("1" * 5000),
        st.text(max_size=40),
        st.integers(),
        st.just(10**30),
        st.just(["x"]),
    )


@pytest.mark.parametrize(("rule_type", "path", "kind"), FIELD_PATHS)
def test_hostile_values_in_every_field_are_refused_naming_it_or_are_safe(
    rule_type: str, path: str, kind: str
) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    base = VALID_USER if rule_type == "vpn-user" else VALID.get(rule_type)
    if rule_type in VARIANTS:
        rule_type, base = VARIANTS[rule_type]
    assert base is not None
    valid = _get(base, path)

    @settings(max_examples=120, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        value = data.draw(_hostile_strategy(kind, valid))
        f = copy.deepcopy(base)
        _put(f, path, value)
        try:
            if rule_type == "vpn-user":
                accepted: dict[str, Any] = parse_vpn_user(f).to_fields()
            else:
                accepted = parse_rule(rule_type, f, ctx()).to_fields()
        except InvalidInput as exc:
            # A legal value drawn by chance ("icmp" for a protocol) may conflict with another
            # field of the rule: that field is named then, and its reason names this one.
            named = exc.field == path or exc.field.startswith(path) or path in exc.reason
            assert named, f"{path}: {exc}"
            assert "\n" not in str(exc) and "\x00" not in str(exc)
            return
        # Accepted: only legal values of the field's grammar get through ...
        stored = _get(accepted, path) if kind not in ("list", "object") else None
        if kind in SAFE and isinstance(stored, str):
            assert SAFE[kind].fullmatch(stored), f"{path} accepted {value!r}"
        # ... identifiers only when they are well-formed (no hostile character survives) ...
        if isinstance(value, str) and kind not in FREE_TEXT_KINDS:
            assert all(ch not in value for ch in CONTROL + LOOKALIKE), f"{path} took {value!r}"
        # ... and free text cannot reach a rendered file as a new line or directive.
        if kind in FREE_TEXT_KINDS:
            from tests.test_router_render import assert_free_text_is_contained

            assert_free_text_is_contained(rule_type, path, accepted, f)

    check()


def test_previous_bundle_reuse_gives_the_same_result_and_still_checks_changes() -> None:
    first = RouterBundle.from_json(make_bundle(1).to_json())  # as the appliance receives it
    data = first.to_dict()
    data["version"] = 2
    same = RouterBundle.from_dict(copy.deepcopy(data), previous=first)
    assert same == RouterBundle.from_dict(copy.deepcopy(data))
    assert all(a.rule is b.rule for a, b in zip(first.rules, same.rules, strict=True))
    # A changed rule is parsed again: its errors and conflicts are still found, blaming it.
    bad = copy.deepcopy(data)
    pf = next(r for r in bad["rules"] if r["type"] == "port-forward")
    pf["fields"]["private_ip"] = "10.9.9.9"
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_json(json.dumps(bad), previous=first)
    assert err.value.field.endswith(".fields.private_ip")
    clash = copy.deepcopy(data)
    pf = next(r for r in clash["rules"] if r["type"] == "port-forward")
    pf["fields"]["public_ip"] = "203.0.113.7"  # where the load balancer listens on port 80 ...
    pf["fields"]["public_start_port"] = pf["fields"]["public_end_port"] = 80
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_json(json.dumps(clash), previous=first)
    index = next(i for i, r in enumerate(clash["rules"]) if r["type"] == "port-forward")
    assert err.value.field == f"rules[{index}].fields.public_start_port"
    assert "load-balancer rule" in err.value.reason
    # Another network's bundle is never reused.
    other = copy.deepcopy(data)
    other["addresses"]["public_ips"] = ["203.0.113.5", "203.0.113.6"]
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_json(json.dumps(other), previous=first)
    assert "203.0.113.7" in err.value.reason


def test_ports_left_on_a_rule_switched_to_icmp_are_named_with_the_protocol_in_the_reason() -> None:
    """The conflict hypothesis found: the port field is the one to clear, and the reason says
    which protocol setting makes it wrong."""
    fields = copy.deepcopy(VALID["firewall-egress"])
    fields["protocol"] = "icmp"
    with pytest.raises(InvalidInput) as refused:
        parse_rule("firewall-egress", fields, ctx())
    assert refused.value.field == "start_port"
    assert "protocol" in refused.value.reason

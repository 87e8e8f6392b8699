"""Rule fields already in canonical form (exactly what `Rule.to_fields` writes), accepted in one pass.

The engine builds bundles from normalized database rows, so nearly every rule the router appliance
parses is canonical. `CanonicalParser.parse` checks such fields with precompiled patterns, integer
comparisons and set operations, and builds the rule directly. For anything else (a key missing or
extra, a shorthand, upper case, a bare address, a bad value) it returns None, and the precise parser
of `rules.py` answers, with its error messages. So it never accepts what the precise parser refuses,
and what it accepts equals what the precise parser returns (tests/test_router_canonical_rules.py
checks both by property). Rule types without a canonical parser here always take the precise path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from backend.router.rule_types import RuleType
from backend.router.rules import (
    MAX_CIDRS,
    MAX_EGRESS_PAIRS,
    DhcpEntry,
    DnsEntry,
    FirewallEgressRule,
    FirewallIngressRule,
    IcmpMatch,
    NatProtocol,
    NetworkContext,
    PortForwardRule,
    PortRange,
    Protocol,
    Rule,
    SourceNatRule,
    StaticNatRule,
)

# Canonical text only: no leading zeros, no bare address for a CIDR, lower case.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_CIDR = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})/(3[0-2]|[12]?[0-9])")
_MAX_IP_TEXT = len("255.255.255.255")
_MAX_CIDR_TEXT = len("255.255.255.255/32")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

_PROTOCOLS = {p.value: p for p in Protocol}
_NAT_PROTOCOLS = {p.value: p for p in NatProtocol}
_MATCH_KEYS = {
    Protocol.TCP: ("start_port", "end_port"),
    Protocol.UDP: ("start_port", "end_port"),
    Protocol.ICMP: ("icmp_type", "icmp_code"),
    Protocol.ALL: (),
}
_INGRESS_KEYS = {
    p: frozenset(("public_ip", "protocol", "source_cidrs", *keys))
    for p, keys in _MATCH_KEYS.items()
}
_EGRESS_KEYS = {
    p: frozenset(("protocol", "source_cidrs", "dest_cidrs", *keys))
    for p, keys in _MATCH_KEYS.items()
}
_PORT_FORWARD_KEYS = frozenset(
    (
        "public_ip",
        "public_start_port",
        "public_end_port",
        "private_ip",
        "private_start_port",
        "private_end_port",
        "protocol",
        "open_firewall",
    )
)
_STATIC_NAT_KEYS = frozenset(("public_ip", "private_ip"))
_SOURCE_NAT_KEYS = frozenset(("public_ip",))
_DHCP_KEYS = frozenset(("mac", "ip", "hostname"))
_DNS_KEYS = frozenset(("hostname", "ip"))
# What check_unicast refuses, as (first, last) address ints: the unspecified address, loopback,
# link-local, multicast and reserved (which holds 255.255.255.255).
_NOT_UNICAST = tuple(
    (int(net.network_address), int(net.broadcast_address))
    for net in map(
        ipaddress.IPv4Network,
        ("0.0.0.0/32", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"),
    )
)

# (first address, prefix length, last address) of a network, as ints; sorts as IPv4Network does.
_Net = tuple[int, int, int]


@lru_cache(maxsize=16384)
def _ip_value(text: str) -> int | None:
    """The address of a canonical dotted quad as an int, or None."""
    if not _IPV4.fullmatch(text):
        return None
    a, b, c, d = text.split(".")
    return int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)


@lru_cache(maxsize=16384)
def _net_value(text: str) -> _Net | None:
    """A canonical a.b.c.d/n without host bits, or None."""
    m = _CIDR.fullmatch(text)
    if m is None:
        return None
    first, prefix = _ip_value(m[1]), int(m[2])
    assert first is not None  # the pattern matched a canonical address
    host_bits = (1 << (32 - prefix)) - 1
    if first & host_bits:
        return None
    return first, prefix, first | host_bits


def _ports(start: object, end: object) -> PortRange | None:
    if type(start) is int and type(end) is int and 1 <= start <= end <= 65535:
        return PortRange(start, end)
    return None


def _icmp(icmp_type: object, code: object) -> IcmpMatch | None:
    if type(icmp_type) is not int or type(code) is not int:
        return None
    if not (-1 <= icmp_type <= 255 and -1 <= code <= 255) or (icmp_type == -1 and code != -1):
        return None
    return IcmpMatch(icmp_type, code)


def _choice(table: dict[str, Any], value: object) -> Any:
    return table.get(value) if type(value) is str else None


class CanonicalParser:
    """Parses canonical rule fields against one network; build it once per bundle."""

    def __init__(self, ctx: NetworkContext) -> None:
        net = ctx.network
        self._first = int(net.network_address)
        self._last = int(net.broadcast_address)
        self._mask = int(net.netmask)
        # Network and broadcast addresses are no host's, except in /31 and /32 networks.
        self._edges = (self._first, self._last) if net.prefixlen < 31 else ()
        self._gateway = ctx.gateway
        self._public_ips = ctx.public_ips
        self._source_nat_ip = ctx.source_nat_ip
        self._parsers: dict[str, Callable[[dict[str, Any]], Rule | None]] = {
            RuleType.FIREWALL_INGRESS.value: self._firewall_ingress,
            RuleType.FIREWALL_EGRESS.value: self._firewall_egress,
            RuleType.PORT_FORWARD.value: self._port_forward,
            RuleType.STATIC_NAT.value: self._static_nat,
            RuleType.SOURCE_NAT.value: self._source_nat,
            RuleType.DHCP_ENTRY.value: self._dhcp_entry,
            RuleType.DNS_ENTRY.value: self._dns_entry,
        }

    @property
    def rule_types(self) -> frozenset[str]:
        """The rule types this parser knows; the others always take the precise path."""
        return frozenset(self._parsers)

    def parse(self, rule_type: object, fields: object) -> Rule | None:
        """The rule, if `fields` are canonical and valid; None means: ask the precise parser."""
        parser = self._parsers.get(rule_type) if type(rule_type) is str else None
        if parser is None or type(fields) is not dict:
            return None
        return parser(fields)

    def _public_ip(self, value: object) -> bool:
        return type(value) is str and value in self._public_ips

    def _guest_host(self, value: object) -> bool:
        # Only short strings reach the caches (a hostile 5,000-character value is not kept).
        if type(value) is not str or len(value) > _MAX_IP_TEXT:
            return False
        n = _ip_value(value)
        return (
            n is not None
            and n & self._mask == self._first
            and n not in self._edges
            and value != self._gateway
        )

    def _cidrs(self, items: object, *, inside_network: bool = False) -> tuple[str, ...] | None:
        """Canonical CIDRs, deduplicated and sorted as the precise parser returns them."""
        if type(items) is not list or not 1 <= len(items) <= MAX_CIDRS:
            return None
        nets: dict[_Net, str] = {}
        for text in items:
            if type(text) is not str or len(text) > _MAX_CIDR_TEXT:
                return None
            net = _net_value(text)
            if net is None:
                return None
            if inside_network and not (self._first <= net[0] and net[2] <= self._last):
                return None
            nets[net] = text
        return (text,) if len(items) == 1 else tuple(nets[k] for k in sorted(nets))

    def _match(
        self, protocol: Protocol, fields: dict[str, Any]
    ) -> tuple[PortRange | None, IcmpMatch | None] | None:
        """(ports, icmp) of a firewall rule whose keys fit its protocol, or None."""
        if protocol is Protocol.ALL:
            return None, None
        if protocol is Protocol.ICMP:
            icmp = _icmp(fields["icmp_type"], fields["icmp_code"])
            return None if icmp is None else (None, icmp)
        ports = _ports(fields["start_port"], fields["end_port"])
        return None if ports is None else (ports, None)

    def _firewall_ingress(self, f: dict[str, Any]) -> Rule | None:
        protocol = _choice(_PROTOCOLS, f.get("protocol"))
        if protocol is None or f.keys() != _INGRESS_KEYS[protocol]:
            return None
        public_ip = f["public_ip"]
        match = self._match(protocol, f)
        sources = self._cidrs(f["source_cidrs"])
        if not self._public_ip(public_ip) or match is None or sources is None:
            return None
        return FirewallIngressRule(public_ip, protocol, sources, *match)

    def _firewall_egress(self, f: dict[str, Any]) -> Rule | None:
        protocol = _choice(_PROTOCOLS, f.get("protocol"))
        if protocol is None or f.keys() != _EGRESS_KEYS[protocol]:
            return None
        match = self._match(protocol, f)
        sources = self._cidrs(f["source_cidrs"], inside_network=True)
        dests = self._cidrs(f["dest_cidrs"])
        if match is None or sources is None or dests is None:
            return None
        if len(sources) * len(dests) > MAX_EGRESS_PAIRS:
            return None
        return FirewallEgressRule(protocol, sources, dests, *match)

    def _port_forward(self, f: dict[str, Any]) -> Rule | None:
        if f.keys() != _PORT_FORWARD_KEYS:
            return None
        public_ip, private_ip = f["public_ip"], f["private_ip"]
        public = _ports(f["public_start_port"], f["public_end_port"])
        private = _ports(f["private_start_port"], f["private_end_port"])
        protocol = _choice(_NAT_PROTOCOLS, f["protocol"])
        open_firewall = f["open_firewall"]
        if not (self._public_ip(public_ip) and self._guest_host(private_ip)):
            return None
        if public is None or private is None or protocol is None:
            return None
        if open_firewall is not True and open_firewall is not False:
            return None
        # A range maps only onto the same ports; a single port may be translated.
        if public != private and (public.start != public.end or private.start != private.end):
            return None
        return PortForwardRule(public_ip, public, private_ip, private, protocol, open_firewall)

    def _static_nat(self, f: dict[str, Any]) -> Rule | None:
        if f.keys() != _STATIC_NAT_KEYS:
            return None
        public_ip, private_ip = f["public_ip"], f["private_ip"]
        if not self._public_ip(public_ip) or public_ip == self._source_nat_ip:
            return None
        if not self._guest_host(private_ip):
            return None
        return StaticNatRule(public_ip, private_ip)

    def _source_nat(self, f: dict[str, Any]) -> Rule | None:
        if f.keys() != _SOURCE_NAT_KEYS or not self._public_ip(f["public_ip"]):
            return None
        return SourceNatRule(f["public_ip"])

    def _dhcp_entry(self, f: dict[str, Any]) -> Rule | None:
        if f.keys() != _DHCP_KEYS:
            return None
        mac, ip, hostname = f["mac"], f["ip"], f["hostname"]
        if type(mac) is not str or not _MAC.fullmatch(mac):
            return None
        # Unicast (the multicast bit clear) and not all zeros, as check_mac requires.
        if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            return None
        if type(hostname) is not str or not _HOST_LABEL.fullmatch(hostname):
            return None
        return DhcpEntry(mac, ip, hostname) if self._guest_host(ip) else None

    def _dns_entry(self, f: dict[str, Any]) -> Rule | None:
        if f.keys() != _DNS_KEYS:
            return None
        hostname, ip = f["hostname"], f["ip"]
        if type(hostname) is not str or len(hostname) > 253:
            return None
        labels = hostname.split(".")
        # Every label a lower-case RFC 1123 label, and the last not all digits (not an address).
        if not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
            return None
        if type(ip) is not str or len(ip) > _MAX_IP_TEXT:
            return None
        n = _ip_value(ip)
        if n is None or any(first <= n <= last for first, last in _NOT_UNICAST):
            return None
        return DnsEntry(hostname, ip)

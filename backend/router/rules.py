"""Router rules: one validated, immutable dataclass per rule type, with CloudStack's fields.

The database keeps each rule's fields as a plain JSON object. `parse_rule(type, fields, ctx)` checks
them against the network (`NetworkContext`: its CIDR, gateway, owned public IPs and other rules) and
returns a rule whose `to_fields()` is the canonical JSON to store back, so stored rules are normal.
Every refusal is an `InvalidInput` naming the field by its dotted path (`members[2].ip`) and saying why.

Semantics follow CloudStack's isolated-network virtual router:
- Ingress firewall rules open traffic to one public IP; everything else to a public IP is dropped.
  Port forwarding and load-balancer rules open their own public port unless `open_firewall` is false
  (CloudStack's `openfirewall`); static NAT opens nothing by itself.
- Egress rules act against the network's default egress policy: with `allow` they block what they
  match, with `deny` they allow it.
- Load balancing is TCP only (haproxy proxies TCP; it has no UDP mode).
"""

from __future__ import annotations

import enum
import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, ClassVar

from backend.errors import InvalidInput
from backend.router.conflicts import Claim, ClaimIndex
from backend.router.field_checks import (
    FieldReader,
    check_bool,
    check_choice,
    check_cidr,
    check_hostname,
    check_int,
    check_ipv4,
    check_label,
    check_list,
    check_mac,
    check_port,
    check_secret,
    check_text,
    check_unicast,
    check_url_path,
    check_username,
    join,
)
from backend.router.rule_types import RuleType

MAX_CIDRS = 32
MAX_EGRESS_PAIRS = 256
MAX_LB_MEMBERS = 256
MAX_VPN_CLIENTS = 1024


class Protocol(enum.StrEnum):
    """What a firewall rule matches."""

    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ALL = "all"


class NatProtocol(enum.StrEnum):
    """What a port-forwarding rule forwards."""

    TCP = "tcp"
    UDP = "udp"


class LbProtocol(enum.StrEnum):
    """What a load balancer balances: TCP only (haproxy has no UDP mode)."""

    TCP = "tcp"


class EgressPolicy(enum.StrEnum):
    """A network's default for guest traffic leaving through the router."""

    ALLOW = "allow"
    DENY = "deny"


class Algorithm(enum.StrEnum):
    ROUNDROBIN = "roundrobin"
    LEASTCONN = "leastconn"
    SOURCE = "source"


class Stickiness(enum.StrEnum):
    NONE = "none"
    SOURCE = "source"
    COOKIE = "cookie"


@dataclass(frozen=True)
class PortRange:
    """An ordered range of ports, both ends included."""

    start: int
    end: int

    def iptables(self) -> str:
        """As iptables writes it: `80` or `1000:2000`."""
        return str(self.start) if self.start == self.end else f"{self.start}:{self.end}"

    def words(self) -> str:
        return f"port {self.start}" if self.start == self.end else f"ports {self.start}-{self.end}"


@dataclass(frozen=True)
class IcmpMatch:
    """ICMP type and code; -1 means any (CloudStack's convention)."""

    type: int = -1
    code: int = -1

    def iptables(self) -> str | None:
        """The `--icmp-type` argument, or None to match any ICMP."""
        if self.type == -1:
            return None
        return str(self.type) if self.code == -1 else f"{self.type}/{self.code}"


class Rule(ABC):
    """A validated rule of one network. Subclasses are frozen dataclasses."""

    type: ClassVar[RuleType]

    @abstractmethod
    def to_fields(self) -> dict[str, Any]:
        """The canonical JSON object of this rule's fields (what the database stores)."""

    def claims(self) -> tuple[Claim, ...]:
        """What this rule occupies, for conflict checks against the network's other rules."""
        return ()


@dataclass(frozen=True, eq=False)
class NetworkContext:
    """What a rule is checked against: the network, the public IPs it owns and its other rules.

    `rules` are the network's existing rules by id; when editing a rule, leave it out.
    """

    cidr: str
    gateway: str
    public_ips: frozenset[str]
    rules: Mapping[int, Rule] = field(default_factory=dict)
    source_nat_ip: str = ""
    vpn_usernames: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.network  # noqa: B018  (validates cidr and gateway early)
        for ip in self.public_ips:
            check_unicast("public_ips", ip)

    @cached_property
    def network(self) -> ipaddress.IPv4Network:
        net = check_cidr("network.cidr", self.cidr)
        gw = check_ipv4("network.gateway", self.gateway)
        if gw not in net or gw in (net.network_address, net.broadcast_address):
            raise InvalidInput("network.gateway", f"{gw} is not a host address of {net}")
        return net

    @cached_property
    def claim_index(self) -> ClaimIndex:
        """The claims of the existing rules (built once per context)."""
        index = ClaimIndex()
        for rule_id, rule in sorted(self.rules.items()):
            index.add(f"{rule.type} rule {rule_id}", rule.claims())
        return index

    @cached_property
    def _bounds(self) -> tuple[int, int, int]:
        net = self.network
        return int(net.network_address), int(net.broadcast_address), int(net.netmask)

    def guest_host(self, name: str, value: object) -> str:
        """An address of a guest VM in this network: inside the CIDR, not its network, broadcast
        or gateway address."""
        ip = check_ipv4(name, value)
        first, last, mask = self._bounds
        n = int(ip)
        if n & mask != first:
            raise InvalidInput(name, f"{ip} is outside the network {self.network}")
        if self.network.prefixlen < 31 and n in (first, last):
            raise InvalidInput(name, f"{ip} is the network or broadcast address of {self.network}")
        text = str(value)  # check_ipv4 accepted it, so it is already in canonical form
        if text == self.gateway:
            raise InvalidInput(name, f"{ip} is the gateway (the router itself)")
        return text

    def public_ip(self, name: str, value: object) -> str:
        """A public IP this network owns."""
        check_ipv4(name, value)
        ip = str(value)  # canonical, as check_ipv4 accepted it
        if ip not in self.public_ips:
            owned = ", ".join(sorted(self.public_ips)) or "none"
            raise InvalidInput(name, f"{ip} is not a public IP of this network (it owns: {owned})")
        return ip


_net_text = lru_cache(maxsize=16384)(str)


def _cidrs(
    r: FieldReader, key: str, default: list[str], within: ipaddress.IPv4Network | None = None
) -> tuple[str, ...]:
    """A list of CIDRs, deduplicated and sorted; optionally each inside `within`."""
    name = r.name(key)
    items = check_list(name, r.get(key, default), max_items=MAX_CIDRS, min_items=1)
    nets = set()
    for i, item in enumerate(items):
        try:
            net = check_cidr(name, item)
        except InvalidInput as exc:
            raise InvalidInput(join(name, i), exc.reason) from None
        if within is not None and not net.subnet_of(within):
            raise InvalidInput(join(name, i), f"{net} is not inside the network {within}")
        nets.add(net)
    if len(nets) == 1:
        return (_net_text(next(iter(nets))),)
    return tuple(_net_text(n) for n in sorted(nets))


def _port_range(r: FieldReader, start_key: str, end_key: str) -> PortRange:
    start = check_port(r.name(start_key), r.require(start_key))
    end = check_port(r.name(end_key), r.get(end_key, start))
    if end < start:
        raise InvalidInput(r.name(end_key), f"must not be below {start_key} ({start}), got {end}")
    return PortRange(start, end)


def _match(r: FieldReader, protocol: Protocol) -> tuple[PortRange | None, IcmpMatch | None]:
    """The port range (tcp/udp) or ICMP type/code (icmp) a firewall rule matches."""
    port_keys = ("start_port", "end_port")
    icmp_keys = ("icmp_type", "icmp_code")
    if protocol in (Protocol.TCP, Protocol.UDP):
        _refuse_present(r, icmp_keys, "only for protocol icmp")
        return _port_range(r, *port_keys), None
    _refuse_present(r, port_keys, "only for protocol tcp or udp")
    if protocol is Protocol.ALL:
        _refuse_present(r, icmp_keys, "only for protocol icmp")
        return None, None
    icmp_type = check_int(r.name("icmp_type"), r.get("icmp_type", -1), -1, 255)
    icmp_code = check_int(r.name("icmp_code"), r.get("icmp_code", -1), -1, 255)
    if icmp_type == -1 and icmp_code != -1:
        raise InvalidInput(r.name("icmp_code"), "needs an icmp_type (icmp_type -1 means any)")
    return None, IcmpMatch(icmp_type, icmp_code)


def _refuse_present(r: FieldReader, keys: tuple[str, ...], why: str) -> None:
    for key in keys:
        if r.has(key):
            raise InvalidInput(r.name(key), why)


def _match_fields(ports: PortRange | None, icmp: IcmpMatch | None) -> dict[str, Any]:
    if ports is not None:
        return {"start_port": ports.start, "end_port": ports.end}
    if icmp is not None:
        return {"icmp_type": icmp.type, "icmp_code": icmp.code}
    return {}


@dataclass(frozen=True)
class FirewallIngressRule(Rule):
    """Allow traffic from `source_cidrs` to `public_ip` (everything else to it is dropped)."""

    type: ClassVar[RuleType] = RuleType.FIREWALL_INGRESS
    public_ip: str
    protocol: Protocol
    source_cidrs: tuple[str, ...]
    ports: PortRange | None = None
    icmp: IcmpMatch | None = None

    def to_fields(self) -> dict[str, Any]:
        return {
            "public_ip": self.public_ip,
            "protocol": self.protocol.value,
            "source_cidrs": list(self.source_cidrs),
            **_match_fields(self.ports, self.icmp),
        }


def _parse_firewall_ingress(r: FieldReader, ctx: NetworkContext) -> FirewallIngressRule:
    public_ip = ctx.public_ip(r.name("public_ip"), r.require("public_ip"))
    protocol = check_choice(r.name("protocol"), r.require("protocol"), Protocol)
    ports, icmp = _match(r, protocol)
    sources = _cidrs(r, "source_cidrs", ["0.0.0.0/0"])
    return FirewallIngressRule(public_ip, protocol, sources, ports, icmp)


@dataclass(frozen=True)
class FirewallEgressRule(Rule):
    """Match guest traffic leaving the network; acts against the default egress policy."""

    type: ClassVar[RuleType] = RuleType.FIREWALL_EGRESS
    protocol: Protocol
    source_cidrs: tuple[str, ...]
    dest_cidrs: tuple[str, ...]
    ports: PortRange | None = None
    icmp: IcmpMatch | None = None

    def to_fields(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol.value,
            "source_cidrs": list(self.source_cidrs),
            "dest_cidrs": list(self.dest_cidrs),
            **_match_fields(self.ports, self.icmp),
        }


def _parse_firewall_egress(r: FieldReader, ctx: NetworkContext) -> FirewallEgressRule:
    protocol = check_choice(r.name("protocol"), r.require("protocol"), Protocol)
    ports, icmp = _match(r, protocol)
    sources = _cidrs(r, "source_cidrs", [str(ctx.network)], within=ctx.network)
    dests = _cidrs(r, "dest_cidrs", ["0.0.0.0/0"])
    if len(sources) * len(dests) > MAX_EGRESS_PAIRS:
        raise InvalidInput(
            r.name("dest_cidrs"),
            f"{len(sources)} sources x {len(dests)} destinations is more than "
            f"{MAX_EGRESS_PAIRS} pairs; split the rule",
        )
    return FirewallEgressRule(protocol, sources, dests, ports, icmp)


def _ip_use(name: str, public_ip: str, what: str, *, shared: bool) -> Claim:
    return Claim(("ip-use", public_ip), name, what, shared=shared)


def _port_claim(name: str, public_ip: str, protocol: str, ports: PortRange) -> Claim:
    return Claim(
        ("port", public_ip, protocol),
        name,
        f"{ports.words()}/{protocol} on {public_ip}",
        ports.start,
        ports.end,
    )


@dataclass(frozen=True)
class PortForwardRule(Rule):
    """Forward `public_ip`:public ports to `private_ip`:private ports (DNAT, with hairpin NAT)."""

    type: ClassVar[RuleType] = RuleType.PORT_FORWARD
    public_ip: str
    public_ports: PortRange
    private_ip: str
    private_ports: PortRange
    protocol: NatProtocol
    open_firewall: bool = True

    def to_fields(self) -> dict[str, Any]:
        return {
            "public_ip": self.public_ip,
            "public_start_port": self.public_ports.start,
            "public_end_port": self.public_ports.end,
            "private_ip": self.private_ip,
            "private_start_port": self.private_ports.start,
            "private_end_port": self.private_ports.end,
            "protocol": self.protocol.value,
            "open_firewall": self.open_firewall,
        }

    def claims(self) -> tuple[Claim, ...]:
        return (
            _ip_use("public_ip", self.public_ip, "port forwarding", shared=True),
            _port_claim("public_start_port", self.public_ip, self.protocol, self.public_ports),
        )


def _shorthand_ports(r: FieldReader, prefix: str) -> PortRange:
    """`<prefix>_port` (one port) or `<prefix>_start_port`/`<prefix>_end_port` (a range)."""
    one, start, end = f"{prefix}_port", f"{prefix}_start_port", f"{prefix}_end_port"
    if r.has(one):
        for key in (start, end):
            if r.has(key):
                raise InvalidInput(r.name(key), f"give either {one} or {start}/{end}, not both")
        port = check_port(r.name(one), r.require(one))
        return PortRange(port, port)
    if not r.has(start):
        raise InvalidInput(r.name(start), f"is required (or {one} for a single port)")
    return _port_range(r, start, end)


def _parse_port_forward(r: FieldReader, ctx: NetworkContext) -> PortForwardRule:
    public_ip = ctx.public_ip(r.name("public_ip"), r.require("public_ip"))
    public_ports = _shorthand_ports(r, "public")
    private_ip = ctx.guest_host(r.name("private_ip"), r.require("private_ip"))
    private_ports = _shorthand_ports(r, "private")
    protocol = check_choice(r.name("protocol"), r.require("protocol"), NatProtocol)
    open_firewall = check_bool(r.name("open_firewall"), r.get("open_firewall", True))
    public_size = public_ports.end - public_ports.start
    private_size = private_ports.end - private_ports.start
    given = [k for k in ("private_port", "private_end_port") if r.has(k)]
    name = r.name(given[0] if given else "private_start_port")
    if public_size != private_size:
        raise InvalidInput(
            name,
            f"the private range holds {private_size + 1} ports, the public one {public_size + 1}; "
            "they must be the same size",
        )
    if public_size and public_ports != private_ports:
        # Linux DNAT maps a port range onto a range only when both are the same ports.
        raise InvalidInput(
            name,
            "a port range must be forwarded to the same ports (e.g. 1000-1010 -> 1000-1010); "
            "single ports can be translated (8080 -> 80)",
        )
    return PortForwardRule(
        public_ip, public_ports, private_ip, private_ports, protocol, open_firewall
    )


@dataclass(frozen=True)
class StaticNatRule(Rule):
    """Map `public_ip` one-to-one onto `private_ip` (DNAT in, SNAT out)."""

    type: ClassVar[RuleType] = RuleType.STATIC_NAT
    public_ip: str
    private_ip: str

    def to_fields(self) -> dict[str, Any]:
        return {"public_ip": self.public_ip, "private_ip": self.private_ip}

    def claims(self) -> tuple[Claim, ...]:
        return (
            _ip_use("public_ip", self.public_ip, f"static NAT of {self.public_ip}", shared=False),
            Claim(
                ("static-nat-private", self.private_ip),
                "private_ip",
                f"static NAT to {self.private_ip}",
            ),
        )


def _parse_static_nat(r: FieldReader, ctx: NetworkContext) -> StaticNatRule:
    public_ip = ctx.public_ip(r.name("public_ip"), r.require("public_ip"))
    if public_ip == ctx.source_nat_ip:
        raise InvalidInput(r.name("public_ip"), f"{public_ip} is the network's source NAT IP")
    private_ip = ctx.guest_host(r.name("private_ip"), r.require("private_ip"))
    return StaticNatRule(public_ip, private_ip)


@dataclass(frozen=True)
class SourceNatRule(Rule):
    """Guest traffic to the outside leaves with `public_ip` as its source (one per network)."""

    type: ClassVar[RuleType] = RuleType.SOURCE_NAT
    public_ip: str

    def to_fields(self) -> dict[str, Any]:
        return {"public_ip": self.public_ip}

    def claims(self) -> tuple[Claim, ...]:
        return (
            _ip_use("public_ip", self.public_ip, "source NAT", shared=True),
            Claim(("source-nat",), "public_ip", f"source NAT via {self.public_ip}"),
        )


def _parse_source_nat(r: FieldReader, ctx: NetworkContext) -> SourceNatRule:
    return SourceNatRule(ctx.public_ip(r.name("public_ip"), r.require("public_ip")))


@dataclass(frozen=True)
class LbMember:
    """One backend of a load balancer."""

    ip: str
    port: int


@dataclass(frozen=True)
class HealthCheck:
    """How haproxy probes members: every `interval` s, `timeout` s to answer; HTTP GET `path`
    if given, else a TCP connect."""

    interval: int = 5
    timeout: int = 2
    path: str | None = None

    def to_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"interval": self.interval, "timeout": self.timeout}
        if self.path is not None:
            out["path"] = self.path
        return out


@dataclass(frozen=True)
class LoadBalancerRule(Rule):
    """Balance TCP connections to `public_ip`:`public_port` over `members` (haproxy on the router)."""

    type: ClassVar[RuleType] = RuleType.LOAD_BALANCER
    name: str
    public_ip: str
    public_port: int
    private_port: int
    members: tuple[LbMember, ...]
    protocol: LbProtocol = LbProtocol.TCP
    algorithm: Algorithm = Algorithm.ROUNDROBIN
    health_check: HealthCheck | None = None
    stickiness: Stickiness = Stickiness.NONE
    open_firewall: bool = True

    def to_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "public_ip": self.public_ip,
            "public_port": self.public_port,
            "private_port": self.private_port,
            "protocol": self.protocol.value,
            "algorithm": self.algorithm.value,
            "members": [{"ip": m.ip, "port": m.port} for m in self.members],
            "stickiness": self.stickiness.value,
            "open_firewall": self.open_firewall,
        }
        if self.health_check is not None:
            out["health_check"] = self.health_check.to_fields()
        return out

    def claims(self) -> tuple[Claim, ...]:
        port = PortRange(self.public_port, self.public_port)
        return (
            _ip_use("public_ip", self.public_ip, "load balancing", shared=True),
            _port_claim("public_port", self.public_ip, "tcp", port),
            Claim(("lb-name", self.name), "name", f"load balancer name {self.name!r}"),
        )


def _parse_members(r: FieldReader, ctx: NetworkContext, private_port: int) -> tuple[LbMember, ...]:
    items = check_list(r.name("members"), r.get("members", []), max_items=MAX_LB_MEMBERS)
    members: dict[tuple[int, int], LbMember] = {}
    for i, item in enumerate(items):
        path = join(r.name("members"), i)
        if isinstance(item, str):
            member = LbMember(ctx.guest_host(path, item), private_port)
        else:
            m = FieldReader(item, ("ip", "port"), path=path)
            ip = ctx.guest_host(m.name("ip"), m.require("ip"))
            member = LbMember(ip, check_port(m.name("port"), m.get("port", private_port)))
        key = (int(ipaddress.IPv4Address(member.ip)), member.port)
        if key in members:
            raise InvalidInput(path, f"{member.ip}:{member.port} is listed twice")
        members[key] = member
    return tuple(members[k] for k in sorted(members))


def _parse_health_check(r: FieldReader) -> HealthCheck | None:
    if not r.has("health_check"):
        return None
    h = FieldReader(r.get("health_check"), ("interval", "timeout", "path"), path="health_check")
    interval = check_int(h.name("interval"), h.get("interval", 5), 1, 3600)
    timeout = check_int(h.name("timeout"), h.get("timeout", min(2, interval)), 1, 3600)
    if timeout > interval:
        raise InvalidInput(h.name("timeout"), f"must not exceed the interval ({interval} s)")
    path = check_url_path(h.name("path"), h.get("path")) if h.has("path") else None
    return HealthCheck(interval, timeout, path)


def _parse_load_balancer(r: FieldReader, ctx: NetworkContext) -> LoadBalancerRule:
    name = check_label(r.name("name"), r.require("name"))
    public_ip = ctx.public_ip(r.name("public_ip"), r.require("public_ip"))
    public_port = check_port(r.name("public_port"), r.require("public_port"))
    private_port = check_port(r.name("private_port"), r.get("private_port", public_port))
    protocol_field = r.name("protocol")
    if r.get("protocol") == "udp":
        raise InvalidInput(protocol_field, "load balancing is TCP only (haproxy has no UDP mode)")
    protocol = check_choice(protocol_field, r.get("protocol", "tcp"), LbProtocol)
    algorithm = check_choice(r.name("algorithm"), r.get("algorithm", "roundrobin"), Algorithm)
    stickiness = check_choice(r.name("stickiness"), r.get("stickiness", "none"), Stickiness)
    return LoadBalancerRule(
        name=name,
        public_ip=public_ip,
        public_port=public_port,
        private_port=private_port,
        members=_parse_members(r, ctx, private_port),
        protocol=protocol,
        algorithm=algorithm,
        health_check=_parse_health_check(r),
        stickiness=stickiness,
        open_firewall=check_bool(r.name("open_firewall"), r.get("open_firewall", True)),
    )


@dataclass(frozen=True)
class DhcpEntry(Rule):
    """A static DHCP lease: the VM with `mac` gets `ip` and `hostname`."""

    type: ClassVar[RuleType] = RuleType.DHCP_ENTRY
    mac: str
    ip: str
    hostname: str

    def to_fields(self) -> dict[str, Any]:
        return {"mac": self.mac, "ip": self.ip, "hostname": self.hostname}

    def claims(self) -> tuple[Claim, ...]:
        return (
            Claim(("dhcp-mac", self.mac), "mac", f"DHCP entry for {self.mac}"),
            Claim(("dhcp-ip", self.ip), "ip", f"DHCP address {self.ip}"),
            Claim(("dhcp-hostname", self.hostname), "hostname", f"DHCP host name {self.hostname}"),
        )


def _parse_dhcp_entry(r: FieldReader, ctx: NetworkContext) -> DhcpEntry:
    mac = check_mac(r.name("mac"), r.require("mac"))
    ip = ctx.guest_host(r.name("ip"), r.require("ip"))
    hostname = check_label(r.name("hostname"), r.require("hostname"))
    return DhcpEntry(mac, ip, hostname)


@dataclass(frozen=True)
class DnsEntry(Rule):
    """A host record the router's DNS answers: `hostname` -> `ip`."""

    type: ClassVar[RuleType] = RuleType.DNS_ENTRY
    hostname: str
    ip: str

    def to_fields(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "ip": self.ip}

    def claims(self) -> tuple[Claim, ...]:
        return (
            Claim(("dns", self.hostname, self.ip), "hostname", f"{self.hostname} -> {self.ip}"),
        )


def _parse_dns_entry(r: FieldReader, ctx: NetworkContext) -> DnsEntry:
    hostname = check_hostname(r.name("hostname"), r.require("hostname"))
    ip = str(check_unicast(r.name("ip"), r.require("ip")))
    return DnsEntry(hostname, ip)


@dataclass(frozen=True)
class RemoteAccessVpn(Rule):
    """L2TP/IPsec remote access on `public_ip`: IPsec with a pre-shared key, users by CHAP.

    The router takes the first address of `client_ip_range` as its end of the PPP links;
    clients get the others.
    """

    type: ClassVar[RuleType] = RuleType.REMOTE_ACCESS_VPN
    public_ip: str
    psk: str
    range_start: str
    range_end: str

    @property
    def client_ip_range(self) -> str:
        return f"{self.range_start}-{self.range_end}"

    @property
    def local_ip(self) -> str:
        """The router's address on the PPP links (first of the range)."""
        return self.range_start

    @property
    def client_start(self) -> str:
        return str(ipaddress.IPv4Address(self.range_start) + 1)

    def to_fields(self) -> dict[str, Any]:
        return {
            "public_ip": self.public_ip,
            "psk": self.psk,
            "client_ip_range": self.client_ip_range,
        }

    def claims(self) -> tuple[Claim, ...]:
        ip = self.public_ip
        return (
            _ip_use("public_ip", ip, "remote access VPN", shared=True),
            Claim(("remote-access-vpn",), "public_ip", f"remote access VPN on {ip}"),
            _port_claim("public_ip", ip, "udp", PortRange(500, 500)),
            _port_claim("public_ip", ip, "udp", PortRange(1701, 1701)),
            _port_claim("public_ip", ip, "udp", PortRange(4500, 4500)),
        )


def _parse_vpn(r: FieldReader, ctx: NetworkContext) -> RemoteAccessVpn:
    public_ip = ctx.public_ip(r.name("public_ip"), r.require("public_ip"))
    psk = check_secret(r.name("psk"), r.require("psk"))
    name = r.name("client_ip_range")
    text = check_text(name, r.require("client_ip_range"), max_len=31)
    parts = text.split("-")
    if len(parts) != 2:
        raise InvalidInput(name, f"{text!r} is not a range a.b.c.d-a.b.c.e")
    start = check_unicast(name, parts[0])
    end = check_unicast(name, parts[1])
    if end <= start:
        raise InvalidInput(name, f"{end} must come after {start}")
    size = int(end) - int(start) + 1
    if size > MAX_VPN_CLIENTS + 1:
        raise InvalidInput(name, f"holds {size} addresses; at most {MAX_VPN_CLIENTS + 1}")
    span = ipaddress.summarize_address_range(start, end)
    if any(block.overlaps(ctx.network) for block in span):
        raise InvalidInput(name, f"{text} overlaps the guest network {ctx.network}")
    for pub in ctx.public_ips:
        if start <= ipaddress.IPv4Address(pub) <= end:
            raise InvalidInput(name, f"{text} contains the public IP {pub}")
    return RemoteAccessVpn(public_ip, psk, str(start), str(end))


@dataclass(frozen=True)
class VpnUser:
    """A remote-access VPN user (CHAP over the L2TP link)."""

    username: str
    password: str

    def to_fields(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password}


def parse_vpn_user(fields: object, ctx: NetworkContext | None = None) -> VpnUser:
    """Check a VPN user's fields; with `ctx`, also that the name is not taken in the network."""
    r = FieldReader(fields, ("username", "password"))
    username = check_username(r.name("username"), r.require("username"))
    password = check_secret(r.name("password"), r.require("password"))
    if ctx is not None and username in ctx.vpn_usernames:
        raise InvalidInput("username", f"{username!r} is already a VPN user of this network")
    return VpnUser(username, password)


def parse_egress_policy(value: object, name: str = "default_egress_policy") -> EgressPolicy:
    """A network's default egress policy: allow or deny."""
    return check_choice(name, value, EgressPolicy)


_Parser = Callable[[FieldReader, NetworkContext], Rule]

_PARSERS: dict[RuleType, tuple[tuple[str, ...], _Parser]] = {
    RuleType.FIREWALL_INGRESS: (
        (
            "public_ip",
            "protocol",
            "start_port",
            "end_port",
            "source_cidrs",
            "icmp_type",
            "icmp_code",
        ),
        _parse_firewall_ingress,
    ),
    RuleType.FIREWALL_EGRESS: (
        (
            "protocol",
            "start_port",
            "end_port",
            "source_cidrs",
            "dest_cidrs",
            "icmp_type",
            "icmp_code",
        ),
        _parse_firewall_egress,
    ),
    RuleType.PORT_FORWARD: (
        (
            "public_ip",
            "public_port",
            "public_start_port",
            "public_end_port",
            "private_ip",
            "private_port",
            "private_start_port",
            "private_end_port",
            "protocol",
            "open_firewall",
        ),
        _parse_port_forward,
    ),
    RuleType.STATIC_NAT: (("public_ip", "private_ip"), _parse_static_nat),
    RuleType.SOURCE_NAT: (("public_ip",), _parse_source_nat),
    RuleType.LOAD_BALANCER: (
        (
            "name",
            "public_ip",
            "public_port",
            "private_port",
            "protocol",
            "algorithm",
            "members",
            "health_check",
            "stickiness",
            "open_firewall",
        ),
        _parse_load_balancer,
    ),
    RuleType.DHCP_ENTRY: (("mac", "ip", "hostname"), _parse_dhcp_entry),
    RuleType.DNS_ENTRY: (("hostname", "ip"), _parse_dns_entry),
    RuleType.REMOTE_ACCESS_VPN: (("public_ip", "psk", "client_ip_range"), _parse_vpn),
}


def parse_rule_alone(type: str, fields: object, ctx: NetworkContext) -> Rule:
    """Check one rule against the network, but not against the network's other rules."""
    rule_type = check_choice("type", type, RuleType)
    allowed, parser = _PARSERS[rule_type]
    return parser(FieldReader(fields, _ALLOWED[rule_type]), ctx)


def parse_rule(type: str, fields: object, ctx: NetworkContext) -> Rule:
    """Check a rule's fields against the network and its other rules; return the normalized rule.

    Raises InvalidInput naming the field (dotted path) and the reason.
    """
    rule = parse_rule_alone(type, fields, ctx)
    ctx.claim_index.check(rule.claims())
    return rule


# The fields each rule type accepts (forms and CLI flags are built from this).
RULE_FIELDS: Mapping[RuleType, tuple[str, ...]] = {t: keys for t, (keys, _) in _PARSERS.items()}
_ALLOWED = {t: frozenset(keys) for t, keys in RULE_FIELDS.items()}

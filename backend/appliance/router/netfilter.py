"""A router bundle as netfilter tables: the filter, nat and mangle chains iptables-restore loads.

Layout. The built-in chains only hook our head chains (`SYSVM_*`). Each head chain holds fixed
lines (stateful accepts, the control path, defaults) and jumps to bucket chains holding the
per-rule lines: a rule with id N lands in bucket N % 64 of each section it contributes to
(`SYSVM_FWI_05`, ...). Changing one rule therefore changes one bucket chain per section, and
`render_delta` rewrites only those. Spreading rules over buckets is safe because, within a
section, the per-rule lines commute: ingress, service and VPN lines all ACCEPT; egress lines all
share one action (set by the default policy); DNAT lines never overlap (port ranges and static
NAT IPs are exclusive claims); SNAT lines match distinct private sources.

Packets, in CloudStack's manner:
- Inbound to a public IP is filtered in mangle PREROUTING, before DNAT rewrites the destination,
  so firewall rules name the public IP. What passes and was DNATed is forwarded by the filter
  table (`--ctstate DNAT`); what is for the router itself (haproxy, IPsec) is accepted by INPUT.
- Hairpin: a guest reaching a public IP that is DNATed back into the guest network leaves with
  the gateway as its source, so the answer comes back through the router.
- Source NAT is the last SNAT line, after static NAT's per-VM SNAT.
- INPUT's first line always admits SSH on 3922 from `control_sources` on the control NIC.

Every line is written exactly as `iptables-save` prints it (option order, /32 suffixes), so the
live digest of a router can be compared with the one its bundle predicts.

Lines carry no `-m comment` naming their rule: the comment match, parsed and checked per line,
doubled the time iptables-restore takes to load 10,000 rules (66 -> 129 ms) and cost reading
them back a third more. A line's rule is found by its bucket chain (its id modulo 64) and its
fields; `sysvm router show` lists the rules with their ids.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from backend.appliance.router.layout import RouterInterfaces
from backend.appliance.router.rule_tables import TABLES
from backend.router.bundle import RouterBundle, changed_rule_ids
from backend.router.rules import (
    EgressPolicy,
    FirewallEgressRule,
    FirewallIngressRule,
    IcmpMatch,
    LoadBalancerRule,
    PortForwardRule,
    PortRange,
    Protocol,
    RemoteAccessVpn,
    Rule,
    SourceNatRule,
    StaticNatRule,
)

PREFIX = "SYSVM_"
BUCKETS = 64
BUILTIN: Mapping[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}
CONTROL_PORT = 3922


@dataclass(frozen=True)
class Section:
    """A head chain and the family of bucket chains it jumps to."""

    table: str
    head: str
    bucket_prefix: str

    def bucket(self, rule_id: int) -> str:
        return self.buckets[rule_id % BUCKETS]

    @cached_property
    def buckets(self) -> tuple[str, ...]:
        """The bucket chains' names by number (rendering 10,000 rules looks one up per line)."""
        return tuple(f"{self.bucket_prefix}{k:02d}" for k in range(BUCKETS))


FW_INGRESS = Section("mangle", "SYSVM_FW_INGRESS", "SYSVM_FWI_")
DNAT = Section("nat", "SYSVM_DNAT", "SYSVM_DNAT_")
SNAT = Section("nat", "SYSVM_SNAT", "SYSVM_SNAT_")
INPUT = Section("filter", "SYSVM_INPUT", "SYSVM_IN_")
FORWARD = Section("filter", "SYSVM_FORWARD", "SYSVM_FWD_")
FW_EGRESS = Section("filter", "SYSVM_FW_EGRESS", "SYSVM_FWE_")
SECTIONS = (FW_INGRESS, DNAT, SNAT, INPUT, FORWARD, FW_EGRESS)
_SECTION_OF_PREFIX = {s.bucket_prefix: s for s in SECTIONS}


@dataclass(frozen=True)
class Chain:
    """One chain: its policy if built in (None for ours) and its `-A` lines, in order."""

    table: str
    name: str
    policy: str | None
    lines: tuple[str, ...]

    @property
    def builtin(self) -> bool:
        return self.policy is not None

    def declaration(self) -> str:
        return f":{self.name} {self.policy or '-'} [0:0]"


@dataclass(frozen=True)
class Ruleset:
    """Every chain of the three tables we own, keyed by (table, chain)."""

    chains: Mapping[tuple[str, str], Chain]

    def table(self, table: str) -> list[Chain]:
        """A table's chains: built-ins in iptables' order, then ours by name."""
        builtin = [self.chains[(table, n)] for n in BUILTIN[table]]
        ours = sorted(
            (c for (t, _), c in self.chains.items() if t == table and not c.builtin),
            key=lambda c: c.name,
        )
        return builtin + ours

    def canonical_text(self) -> str:
        """The tables as `live_digest.canonical_netfilter` writes them (tables and chains by
        name, `:NAME POLICY` then its lines), without printing and parsing restore text."""
        out: list[str] = []
        for table in sorted(TABLES):
            out.append(f"*{table}")
            for c in sorted(self.table(table), key=_chain_name):
                out.append(f":{c.name} {c.policy or '-'}")
                out.extend(c.lines)
        return "\n".join(out) + "\n"

    def restore_text(self) -> str:
        """Complete `iptables-restore` input (replaces the three tables whole)."""
        out: list[str] = []
        for table in TABLES:
            chains = self.table(table)
            out.append(f"*{table}")
            out.extend(c.declaration() for c in chains)
            for c in chains:
                out.extend(c.lines)
            out.append("COMMIT")
        return "\n".join(out) + "\n"


def _chain_name(chain: Chain) -> str:
    return chain.name


def spec(
    *,
    s: str | None = None,
    d: str | None = None,
    i: str | None = None,
    o: str | None = None,
    p: str | None = None,
    matches: Iterable[str] = (),
    target: str,
) -> str:
    """A rule's options in the order iptables-save prints them."""
    parts: list[str] = []
    if s is not None and s != "0.0.0.0/0":
        parts += ["-s", _host(s)]
    if d is not None and d != "0.0.0.0/0":
        parts += ["-d", _host(d)]
    if i is not None:
        parts += ["-i", i]
    if o is not None:
        parts += ["-o", o]
    if p is not None:
        parts += ["-p", p]
    parts.extend(matches)
    parts += ["-j", target]
    return " ".join(parts)


def _host(addr: str) -> str:
    return addr if "/" in addr else f"{addr}/32"


def _port_match(protocol: str, ports: str) -> str:
    """The match of a destination port or range (`80`, `1000:2000`) of `protocol`.

    UDP ports go through `multiport`, which matches the same packets (one port or range, first
    fragments only, as `-m udp` does): iptables 1.8's udp match looks every port up with
    getaddrinfo(3) (a netlink query and name-service sockets, ~35 µs of system calls), which made
    loading 2,500 UDP rules take 90 of the 200 ms of a 10,000-rule ruleset. multiport and tcp
    parse numbers directly."""
    if protocol == "udp":
        return f"-m multiport --dports {ports}"
    return f"-m {protocol} --dport {ports}"


def _proto_match(protocol: str, ports: PortRange | None, icmp: IcmpMatch | None) -> list[str]:
    """`-p` value is separate; these are the matches after it (port or ICMP type)."""
    if ports is not None:
        return [_port_match(protocol, ports.iptables())]
    if icmp is not None and icmp.iptables() is not None:
        return [f"-m icmp --icmp-type {icmp.iptables()}"]
    return []


Fragment = tuple[Section, str]


def _ingress(rule: FirewallIngressRule) -> list[Fragment]:
    proto = None if rule.protocol is Protocol.ALL else rule.protocol.value
    matches = _proto_match(rule.protocol.value, rule.ports, rule.icmp)
    return [
        (
            FW_INGRESS,
            spec(s=src, d=rule.public_ip, p=proto, matches=matches, target="ACCEPT"),
        )
        for src in rule.source_cidrs
    ]


def _egress(rule: FirewallEgressRule, action: str) -> list[Fragment]:
    proto = None if rule.protocol is Protocol.ALL else rule.protocol.value
    matches = _proto_match(rule.protocol.value, rule.ports, rule.icmp)
    return [
        (FW_EGRESS, spec(s=src, d=dst, p=proto, matches=matches, target=action))
        for src in rule.source_cidrs
        for dst in rule.dest_cidrs
    ]


def _open_port(section: Section, ip: str, protocol: str, ports: str) -> Fragment:
    return (
        section,
        spec(
            d=ip,
            p=protocol,
            matches=[_port_match(protocol, ports)],
            target="ACCEPT",
        ),
    )


def _port_forward(rule: PortForwardRule) -> list[Fragment]:
    proto = rule.protocol.value
    private = rule.private_ports
    to_port = (
        str(private.start) if private.start == private.end else f"{private.start}-{private.end}"
    )
    out = [
        (
            DNAT,
            spec(
                d=rule.public_ip,
                p=proto,
                matches=[_port_match(proto, rule.public_ports.iptables())],
                target=f"DNAT --to-destination {rule.private_ip}:{to_port}",
            ),
        )
    ]
    if rule.open_firewall:
        out.append(_open_port(FW_INGRESS, rule.public_ip, proto, rule.public_ports.iptables()))
    return out


def _static_nat(rule: StaticNatRule, ifs: RouterInterfaces) -> list[Fragment]:
    return [
        (
            DNAT,
            spec(d=rule.public_ip, target=f"DNAT --to-destination {rule.private_ip}"),
        ),
        (
            SNAT,
            spec(
                s=rule.private_ip,
                o=ifs.public,
                target=f"SNAT --to-source {rule.public_ip}",
            ),
        ),
    ]


def _load_balancer(rule: LoadBalancerRule) -> list[Fragment]:
    port = str(rule.public_port)
    out = [_open_port(INPUT, rule.public_ip, "tcp", port)]
    if rule.open_firewall:
        out.append(_open_port(FW_INGRESS, rule.public_ip, "tcp", port))
    return out


def _vpn(rule: RemoteAccessVpn, ifs: RouterInterfaces) -> list[Fragment]:
    ip = rule.public_ip
    ike = [
        spec(d=ip, p="udp", matches=[_port_match("udp", "500")], target="ACCEPT"),
        spec(d=ip, p="udp", matches=[_port_match("udp", "4500")], target="ACCEPT"),
        spec(d=ip, p="esp", target="ACCEPT"),
        # L2TP is accepted only when it arrived inside IPsec.
        spec(
            d=ip,
            p="udp",
            matches=["-m policy --dir in --pol ipsec", _port_match("udp", "1701")],
            target="ACCEPT",
        ),
    ]
    clients = f"-m iprange --src-range {rule.client_start}-{rule.range_end}"
    return [
        *((FW_INGRESS, line) for line in ike),
        *((INPUT, line) for line in ike),
        (INPUT, spec(i="ppp+", matches=[clients], target="ACCEPT")),
        (FORWARD, spec(i="ppp+", o=ifs.guest, matches=[clients], target="ACCEPT")),
    ]


def rule_lines(
    rule_id: int, rule: Rule, ifs: RouterInterfaces, egress_action: str
) -> tuple[tuple[str, str], ...]:
    """The (bucket chain, `-A` line) pairs one rule contributes. Not memoized: a delta renders
    the rules of its changed buckets only (~160 of 10,000: under a millisecond), and hashing every
    rule for a cache cost a first render of 10,000 rules a quarter of its time."""
    render = _RENDERERS.get(type(rule))
    if render is None:
        render = next((r for kind, r in _RENDERERS.items() if isinstance(rule, kind)), _nothing)
    k = rule_id % BUCKETS
    return tuple(
        (chain, f"-A {chain} {line_spec}")
        for section, line_spec in render(rule, ifs, egress_action)
        for chain in (section.buckets[k],)
    )


def _nothing(rule: Rule, ifs: RouterInterfaces, action: str) -> list[Fragment]:
    # Source NAT is a line of the SNAT head chain; DHCP and DNS entries live in dnsmasq.
    return []


# What each rule class renders to, found by its exact class (isinstance against the abstract
# Rule class costs more than the rest of rendering a line).
_RENDERERS: dict[type, Callable[[Any, RouterInterfaces, str], list[Fragment]]] = {
    FirewallIngressRule: lambda rule, ifs, action: _ingress(rule),
    FirewallEgressRule: lambda rule, ifs, action: _egress(rule, action),
    PortForwardRule: lambda rule, ifs, action: _port_forward(rule),
    StaticNatRule: lambda rule, ifs, action: _static_nat(rule, ifs),
    LoadBalancerRule: lambda rule, ifs, action: _load_balancer(rule),
    RemoteAccessVpn: lambda rule, ifs, action: _vpn(rule, ifs),
}


def render_ruleset(bundle: RouterBundle, ifs: RouterInterfaces | None = None) -> Ruleset:
    """The complete netfilter state a bundle asks for."""
    ifs = ifs or RouterInterfaces()
    action = _egress_action(bundle)
    buckets: dict[str, list[str]] = defaultdict(list)
    for entry in bundle.rules:
        for chain, line in rule_lines(entry.id, entry.rule, ifs, action):
            buckets[chain].append(line)
    chains = _builtin_chains(ifs)
    for name, lines in buckets.items():
        table = _SECTION_OF_PREFIX[name[:-2]].table
        chains[(table, name)] = Chain(table, name, None, tuple(lines))
    _put_heads(chains, bundle, ifs, action)
    return Ruleset(chains)


def update_ruleset(
    old_bundle: RouterBundle,
    old: Ruleset,
    new_bundle: RouterBundle,
    ifs: RouterInterfaces | None = None,
    changed: set[int] | None = None,
) -> Ruleset:
    """`render_ruleset(new_bundle)`, computed from `old` (what `old_bundle` rendered to) by
    re-rendering only the bucket chains of rules that differ (`changed`, their ids, if known),
    and the head chains. A rule is
    unchanged when the new bundle holds the same object (`changed_rule_ids`). Anything else that feeds every chain (the network, the
    control sources, the egress policy) changing means a complete render."""
    ifs = ifs or RouterInterfaces()
    frame = ("network", "addresses", "control_sources", "default_egress_policy")
    if any(getattr(old_bundle, k) != getattr(new_bundle, k) for k in frame):
        return render_ruleset(new_bundle, ifs)
    if changed is None:
        changed = changed_rule_ids(old_bundle, new_bundle)
    if len(changed) > len(new_bundle.rules) // 4:
        return render_ruleset(new_bundle, ifs)
    wanted = {rule_id % BUCKETS for rule_id in changed}
    action = _egress_action(new_bundle)
    buckets: dict[str, list[str]] = defaultdict(list)
    for entry in new_bundle.rules:
        if entry.id % BUCKETS in wanted:
            for chain, line in rule_lines(entry.id, entry.rule, ifs, action):
                buckets[chain].append(line)
    chains = dict(old.chains)
    for section in SECTIONS:
        for k in wanted:
            name = f"{section.bucket_prefix}{k:02d}"
            lines = buckets.get(name)
            if lines:
                chains[(section.table, name)] = Chain(section.table, name, None, tuple(lines))
            else:
                chains.pop((section.table, name), None)
    _put_heads(chains, new_bundle, ifs, action)
    return Ruleset(chains)


def _egress_action(bundle: RouterBundle) -> str:
    return "DROP" if bundle.default_egress_policy is EgressPolicy.ALLOW else "ACCEPT"


def _builtin_chains(ifs: RouterInterfaces) -> dict[tuple[str, str], Chain]:
    chains: dict[tuple[str, str], Chain] = {}

    def put(table: str, name: str, policy: str, specs: Iterable[str]) -> None:
        chains[(table, name)] = Chain(table, name, policy, tuple(f"-A {name} {x}" for x in specs))

    for table, names in BUILTIN.items():
        for name in names:
            put(table, name, "ACCEPT", ())
    put("filter", "INPUT", "DROP", [spec(target=INPUT.head)])
    put("filter", "FORWARD", "DROP", [spec(target=FORWARD.head)])
    put("mangle", "PREROUTING", "ACCEPT", [spec(i=ifs.public, target=FW_INGRESS.head)])
    put("nat", "PREROUTING", "ACCEPT", [spec(target=DNAT.head)])
    put("nat", "POSTROUTING", "ACCEPT", [spec(target=SNAT.head)])
    return chains


def _put_heads(
    chains: dict[tuple[str, str], Chain], bundle: RouterBundle, ifs: RouterInterfaces, action: str
) -> None:
    """Set each section's head chain: its fixed lines around jumps to its bucket chains."""
    net = bundle.network
    source_nat = [
        spec(s=net.cidr, o=ifs.public, target=f"SNAT --to-source {snat.public_ip}")
        for _rule_id, snat in bundle.rules_of(SourceNatRule)
    ]
    established = "-m conntrack --ctstate RELATED,ESTABLISHED"
    invalid = "-m conntrack --ctstate INVALID"
    heads: dict[Section, tuple[list[str], list[str]]] = {
        INPUT: (
            [
                *(
                    spec(
                        s=src,
                        i=ifs.control,
                        p="tcp",
                        matches=[f"-m tcp --dport {CONTROL_PORT}"],
                        target="ACCEPT",
                    )
                    for src in bundle.control_sources
                ),
                spec(i="lo", target="ACCEPT"),
                spec(matches=[established], target="ACCEPT"),
                spec(matches=[invalid], target="DROP"),
                spec(p="icmp", target="ACCEPT"),
                spec(i=ifs.guest, p="udp", matches=[_port_match("udp", "67")], target="ACCEPT"),
                spec(
                    s=net.cidr,
                    i=ifs.guest,
                    p="udp",
                    matches=[_port_match("udp", "53")],
                    target="ACCEPT",
                ),
                spec(
                    s=net.cidr, i=ifs.guest, p="tcp", matches=["-m tcp --dport 53"], target="ACCEPT"
                ),
            ],
            [],
        ),
        FORWARD: (
            [
                spec(matches=[established], target="ACCEPT"),
                spec(matches=[invalid], target="DROP"),
                spec(
                    i=ifs.public,
                    o=ifs.guest,
                    matches=["-m conntrack --ctstate DNAT"],
                    target="ACCEPT",
                ),
                spec(i=ifs.guest, o=ifs.guest, target="ACCEPT"),
                spec(i=ifs.guest, o=ifs.public, target=FW_EGRESS.head),
            ],
            [],
        ),
        FW_EGRESS: ([], [spec(target="ACCEPT" if action == "DROP" else "DROP")]),
        FW_INGRESS: ([spec(matches=[established], target="ACCEPT")], [spec(target="DROP")]),
        DNAT: ([], []),
        SNAT: (
            [
                spec(
                    s=net.cidr,
                    d=net.cidr,
                    o=ifs.guest,
                    matches=["-m conntrack --ctstate DNAT"],
                    target=f"SNAT --to-source {net.gateway}",
                )
            ],
            source_nat,
        ),
    }
    own: dict[Section, list[str]] = defaultdict(list)
    for _table, name in chains:
        section = _SECTION_OF_PREFIX.get(name[:-2])
        if section is not None:
            own[section].append(name)
    for section in SECTIONS:
        first, last = heads[section]
        jumps = [spec(target=n) for n in sorted(own[section])]
        lines = tuple(f"-A {section.head} {x}" for x in (*first, *jumps, *last))
        chains[(section.table, section.head)] = Chain(section.table, section.head, None, lines)


def render_iptables(bundle: RouterBundle, ifs: RouterInterfaces | None = None) -> str:
    """Complete `iptables-restore` input for filter, nat and mangle."""
    return render_ruleset(bundle, ifs).restore_text()

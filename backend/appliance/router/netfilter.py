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

Every line is written exactly as `iptables-save` prints it (option order, /32 suffixes, quoted
comments), so the live digest of a router can be compared with the one its bundle predicts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from backend.appliance.router.layout import RouterInterfaces
from backend.router.bundle import RouterBundle
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
    SourceNatRule,
    StaticNatRule,
)

PREFIX = "SYSVM_"
BUCKETS = 64
TABLES = ("filter", "nat", "mangle")
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
        return f"{self.bucket_prefix}{rule_id % BUCKETS:02d}"


FW_INGRESS = Section("mangle", "SYSVM_FW_INGRESS", "SYSVM_FWI_")
DNAT = Section("nat", "SYSVM_DNAT", "SYSVM_DNAT_")
SNAT = Section("nat", "SYSVM_SNAT", "SYSVM_SNAT_")
INPUT = Section("filter", "SYSVM_INPUT", "SYSVM_IN_")
FORWARD = Section("filter", "SYSVM_FORWARD", "SYSVM_FWD_")
FW_EGRESS = Section("filter", "SYSVM_FW_EGRESS", "SYSVM_FWE_")
SECTIONS = (FW_INGRESS, DNAT, SNAT, INPUT, FORWARD, FW_EGRESS)


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


def spec(
    *,
    s: str | None = None,
    d: str | None = None,
    i: str | None = None,
    o: str | None = None,
    p: str | None = None,
    matches: Iterable[str] = (),
    rule_id: int | None = None,
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
    if rule_id is not None:
        parts.append(f'-m comment --comment "rule {rule_id}"')
    parts += ["-j", target]
    return " ".join(parts)


def _host(addr: str) -> str:
    return addr if "/" in addr else f"{addr}/32"


def _proto_match(protocol: str, ports: PortRange | None, icmp: IcmpMatch | None) -> list[str]:
    """`-p` value is separate; these are the matches after it (port or ICMP type)."""
    if ports is not None:
        return [f"-m {protocol} --dport {ports.iptables()}"]
    if icmp is not None and icmp.iptables() is not None:
        return [f"-m icmp --icmp-type {icmp.iptables()}"]
    return []


class _Lines:
    """Per-rule lines collected by section and bucket."""

    def __init__(self) -> None:
        self.buckets: dict[tuple[Section, str], list[str]] = defaultdict(list)

    def add(self, section: Section, rule_id: int, line_spec: str) -> None:
        self.buckets[(section, section.bucket(rule_id))].append(line_spec)

    def chains_of(self, section: Section) -> list[str]:
        return sorted(name for (sec, name) in self.buckets if sec == section)


def _ingress(lines: _Lines, rule_id: int, rule: FirewallIngressRule) -> None:
    proto = None if rule.protocol is Protocol.ALL else rule.protocol.value
    for src in rule.source_cidrs:
        lines.add(
            FW_INGRESS,
            rule_id,
            spec(
                s=src,
                d=rule.public_ip,
                p=proto,
                matches=_proto_match(rule.protocol.value, rule.ports, rule.icmp),
                rule_id=rule_id,
                target="ACCEPT",
            ),
        )


def _egress(lines: _Lines, rule_id: int, rule: FirewallEgressRule, action: str) -> None:
    proto = None if rule.protocol is Protocol.ALL else rule.protocol.value
    matches = _proto_match(rule.protocol.value, rule.ports, rule.icmp)
    for src in rule.source_cidrs:
        for dst in rule.dest_cidrs:
            lines.add(
                FW_EGRESS,
                rule_id,
                spec(s=src, d=dst, p=proto, matches=matches, rule_id=rule_id, target=action),
            )


def _open_public_port(
    lines: _Lines, section: Section, rule_id: int, ip: str, protocol: str, ports: PortRange
) -> None:
    lines.add(
        section,
        rule_id,
        spec(
            d=ip,
            p=protocol,
            matches=[f"-m {protocol} --dport {ports.iptables()}"],
            rule_id=rule_id,
            target="ACCEPT",
        ),
    )


def _port_forward(lines: _Lines, rule_id: int, rule: PortForwardRule) -> None:
    proto = rule.protocol.value
    private = rule.private_ports
    to_port = (
        str(private.start) if private.start == private.end else f"{private.start}-{private.end}"
    )
    lines.add(
        DNAT,
        rule_id,
        spec(
            d=rule.public_ip,
            p=proto,
            matches=[f"-m {proto} --dport {rule.public_ports.iptables()}"],
            rule_id=rule_id,
            target=f"DNAT --to-destination {rule.private_ip}:{to_port}",
        ),
    )
    if rule.open_firewall:
        _open_public_port(lines, FW_INGRESS, rule_id, rule.public_ip, proto, rule.public_ports)


def _static_nat(lines: _Lines, rule_id: int, rule: StaticNatRule, ifs: RouterInterfaces) -> None:
    lines.add(
        DNAT,
        rule_id,
        spec(
            d=rule.public_ip,
            rule_id=rule_id,
            target=f"DNAT --to-destination {rule.private_ip}",
        ),
    )
    lines.add(
        SNAT,
        rule_id,
        spec(
            s=rule.private_ip,
            o=ifs.public,
            rule_id=rule_id,
            target=f"SNAT --to-source {rule.public_ip}",
        ),
    )


def _load_balancer(lines: _Lines, rule_id: int, rule: LoadBalancerRule) -> None:
    port = PortRange(rule.public_port, rule.public_port)
    _open_public_port(lines, INPUT, rule_id, rule.public_ip, "tcp", port)
    if rule.open_firewall:
        _open_public_port(lines, FW_INGRESS, rule_id, rule.public_ip, "tcp", port)


def _vpn(lines: _Lines, rule_id: int, rule: RemoteAccessVpn, ifs: RouterInterfaces) -> None:
    ip = rule.public_ip
    ike = [
        spec(d=ip, p="udp", matches=["-m udp --dport 500"], rule_id=rule_id, target="ACCEPT"),
        spec(d=ip, p="udp", matches=["-m udp --dport 4500"], rule_id=rule_id, target="ACCEPT"),
        spec(d=ip, p="esp", rule_id=rule_id, target="ACCEPT"),
        # L2TP is accepted only when it arrived inside IPsec.
        spec(
            d=ip,
            p="udp",
            matches=["-m policy --dir in --pol ipsec", "-m udp --dport 1701"],
            rule_id=rule_id,
            target="ACCEPT",
        ),
    ]
    clients = f"-m iprange --src-range {rule.client_start}-{rule.range_end}"
    for line in ike:
        lines.add(FW_INGRESS, rule_id, line)
        lines.add(INPUT, rule_id, line)
    lines.add(INPUT, rule_id, spec(i="ppp+", matches=[clients], rule_id=rule_id, target="ACCEPT"))
    lines.add(
        FORWARD,
        rule_id,
        spec(i="ppp+", o=ifs.guest, matches=[clients], rule_id=rule_id, target="ACCEPT"),
    )


def render_ruleset(bundle: RouterBundle, ifs: RouterInterfaces | None = None) -> Ruleset:
    """The complete netfilter state a bundle asks for."""
    ifs = ifs or RouterInterfaces()
    net = bundle.network
    egress_action = "DROP" if bundle.default_egress_policy is EgressPolicy.ALLOW else "ACCEPT"
    lines = _Lines()
    for rid, ingress in bundle.rules_of(FirewallIngressRule):
        _ingress(lines, rid, ingress)
    for rid, egress in bundle.rules_of(FirewallEgressRule):
        _egress(lines, rid, egress, egress_action)
    for rid, forward in bundle.rules_of(PortForwardRule):
        _port_forward(lines, rid, forward)
    for rid, static in bundle.rules_of(StaticNatRule):
        _static_nat(lines, rid, static, ifs)
    for rid, lb in bundle.rules_of(LoadBalancerRule):
        _load_balancer(lines, rid, lb)
    for rid, vpn in bundle.rules_of(RemoteAccessVpn):
        _vpn(lines, rid, vpn, ifs)
    # DHCP and DNS entries live in dnsmasq's files, not in netfilter.
    source_nat = [
        spec(s=net.cidr, o=ifs.public, rule_id=rid, target=f"SNAT --to-source {snat.public_ip}")
        for rid, snat in bundle.rules_of(SourceNatRule)
    ]

    chains: dict[tuple[str, str], Chain] = {}

    def put(table: str, name: str, policy: str | None, specs: Iterable[str]) -> None:
        chains[(table, name)] = Chain(table, name, policy, tuple(f"-A {name} {x}" for x in specs))

    for table, names in BUILTIN.items():
        for name in names:
            put(table, name, "ACCEPT", ())
    put("filter", "INPUT", "DROP", [spec(target=INPUT.head)])
    put("filter", "FORWARD", "DROP", [spec(target=FORWARD.head)])
    put("mangle", "PREROUTING", "ACCEPT", [spec(i=ifs.public, target=FW_INGRESS.head)])
    put("nat", "PREROUTING", "ACCEPT", [spec(target=DNAT.head)])
    put("nat", "POSTROUTING", "ACCEPT", [spec(target=SNAT.head)])

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
                spec(i=ifs.guest, p="udp", matches=["-m udp --dport 67"], target="ACCEPT"),
                spec(
                    s=net.cidr, i=ifs.guest, p="udp", matches=["-m udp --dport 53"], target="ACCEPT"
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
        FW_EGRESS: ([], [spec(target="ACCEPT" if egress_action == "DROP" else "DROP")]),
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
    for section in SECTIONS:
        before, after = heads[section]
        buckets = lines.chains_of(section)
        put(
            section.table, section.head, None, [*before, *(spec(target=b) for b in buckets), *after]
        )
        for bucket in buckets:
            put(section.table, bucket, None, lines.buckets[(section, bucket)])
    return Ruleset(chains)


def render_iptables(bundle: RouterBundle, ifs: RouterInterfaces | None = None) -> str:
    """Complete `iptables-restore` input for filter, nat and mangle."""
    return render_ruleset(bundle, ifs).restore_text()

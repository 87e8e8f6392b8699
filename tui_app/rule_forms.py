"""Router rule forms, built from the rule model: which fields each rule type's form shows, how
typed text becomes the fields `EngineAPI.router_rule_add` takes, and back again for editing.

The fields come from `backend.router.rules.RULE_FIELDS` (what the engine accepts); the engine
alone validates them, and its `InvalidInput` names the field (a dotted path such as
`members[2].ip` or `health_check.timeout`), which `form_field_for` maps back to a form row.
Pure functions, tested without a screen.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backend.router.rule_types import RuleType
from backend.router.rules import (
    RULE_FIELDS,
    Algorithm,
    LbProtocol,
    NatProtocol,
    Protocol,
    Stickiness,
)

TEXT, NUMBER, LIST, CHOICE, YES_NO, SECRET = "text", "number", "list", "choice", "yes/no", "secret"
YES, NO = "yes", "no"


@dataclass(frozen=True)
class FormField:
    """One row of a rule form: the engine's field name (dotted when nested), a label, a kind."""

    name: str
    label: str
    kind: str = TEXT
    choices: tuple[str, ...] = ()
    hint: str = ""
    required: bool = False  # a choice with no default (the others default when left empty)


@dataclass(frozen=True)
class RuleForm:
    """The form and table of one rule type."""

    type: RuleType
    title: str  # "Port forwarding"
    tab: str  # short, for the tab row at 80 columns
    noun: str  # one rule: "port forward"
    fields: tuple[FormField, ...]
    columns: tuple[tuple[str, tuple[str, ...]], ...]  # (header, fields shown joined as a range)

    def field(self, name: str) -> FormField | None:
        return next((f for f in self.fields if f.name == name), None)


TITLES: dict[RuleType, tuple[str, str, str]] = {
    RuleType.FIREWALL_INGRESS: ("Ingress firewall rules", "FW in", "ingress firewall rule"),
    RuleType.FIREWALL_EGRESS: ("Egress firewall rules", "FW out", "egress firewall rule"),
    RuleType.PORT_FORWARD: ("Port forwarding rules", "Port fwd", "port forwarding rule"),
    RuleType.STATIC_NAT: ("Static NAT rules", "Static NAT", "static NAT rule"),
    RuleType.SOURCE_NAT: ("Source NAT rules", "SNAT", "source NAT rule"),
    RuleType.LOAD_BALANCER: ("Load balancers", "LB", "load balancer"),
    RuleType.DHCP_ENTRY: ("DHCP static entries", "DHCP", "DHCP static entry"),
    RuleType.DNS_ENTRY: ("DNS host entries", "DNS", "DNS host entry"),
    RuleType.REMOTE_ACCESS_VPN: ("Remote access VPN", "VPN", "remote access VPN"),
}

# Shorthands the engine also takes (`public_port` for a one-port range) stay off the forms:
# a stored rule always has the start/end pair, so that is what a form edits.
SHORTHANDS = frozenset({"public_port", "private_port"})
NESTED = {"health_check": ("interval", "timeout", "path")}
CHOICES: dict[str, type[enum.StrEnum]] = {
    "algorithm": Algorithm,
    "stickiness": Stickiness,
}
PROTOCOLS: dict[RuleType, type[enum.StrEnum]] = {
    RuleType.FIREWALL_INGRESS: Protocol,
    RuleType.FIREWALL_EGRESS: Protocol,
    RuleType.PORT_FORWARD: NatProtocol,
    RuleType.LOAD_BALANCER: LbProtocol,
}
LABELS = {
    "public_ip": "Public IP",
    "private_ip": "Private IP",
    "ip": "IP",
    "mac": "MAC",
    "psk": "Pre-shared key",
    "client_ip_range": "Client IP range",
    "source_cidrs": "Source CIDRs",
    "dest_cidrs": "Destination CIDRs",
    "icmp_type": "ICMP type",
    "icmp_code": "ICMP code",
    "open_firewall": "Open firewall",
    "health_check.interval": "Health every (s)",
    "health_check.timeout": "Health timeout (s)",
    "health_check.path": "Health HTTP path",
}
HINTS = {
    "public_ip": "e.g. 203.0.113.10",
    "private_ip": "a guest VM's address",
    "source_cidrs": "comma-separated; default 0.0.0.0/0",
    "dest_cidrs": "comma-separated; default 0.0.0.0/0",
    "members": "ip or ip:port, comma-separated",
    "start_port": "1-65535",
    "end_port": "default: start port",
    "public_end_port": "default: start port",
    "private_end_port": "default: start port",
    "icmp_type": "-1 = any",
    "icmp_code": "-1 = any",
    "mac": "e.g. 02:00:00:00:00:01",
    "client_ip_range": "e.g. 10.8.0.1-10.8.0.20",
    "health_check.path": "e.g. /health (empty: TCP check)",
}
COLUMNS: dict[RuleType, tuple[tuple[str, tuple[str, ...]], ...]] = {
    RuleType.FIREWALL_INGRESS: (
        ("public IP", ("public_ip",)),
        ("proto", ("protocol",)),
        ("ports", ("start_port", "end_port")),
        ("icmp", ("icmp_type", "icmp_code")),
        ("sources", ("source_cidrs",)),
    ),
    RuleType.FIREWALL_EGRESS: (
        ("proto", ("protocol",)),
        ("ports", ("start_port", "end_port")),
        ("icmp", ("icmp_type", "icmp_code")),
        ("sources", ("source_cidrs",)),
        ("destinations", ("dest_cidrs",)),
    ),
    RuleType.PORT_FORWARD: (
        ("public IP", ("public_ip",)),
        ("public", ("public_start_port", "public_end_port")),
        ("private IP", ("private_ip",)),
        ("private", ("private_start_port", "private_end_port")),
        ("proto", ("protocol",)),
        ("fw", ("open_firewall",)),
    ),
    RuleType.STATIC_NAT: (("public IP", ("public_ip",)), ("private IP", ("private_ip",))),
    RuleType.SOURCE_NAT: (("public IP", ("public_ip",)),),
    RuleType.LOAD_BALANCER: (
        ("name", ("name",)),
        ("public IP", ("public_ip",)),
        ("port", ("public_port",)),
        ("algorithm", ("algorithm",)),
        ("members", ("members",)),
    ),
    RuleType.DHCP_ENTRY: (("MAC", ("mac",)), ("IP", ("ip",)), ("hostname", ("hostname",))),
    RuleType.DNS_ENTRY: (("hostname", ("hostname",)), ("IP", ("ip",))),
    RuleType.REMOTE_ACCESS_VPN: (
        ("public IP", ("public_ip",)),
        ("client range", ("client_ip_range",)),
    ),
}


def _kind(rule_type: RuleType, name: str) -> tuple[str, tuple[str, ...]]:
    """What a field is, from its name (the rule model's naming is regular)."""
    if name == "protocol":
        return CHOICE, tuple(p.value for p in PROTOCOLS[rule_type])
    if name in CHOICES:
        return CHOICE, tuple(c.value for c in CHOICES[name])
    if name == "open_firewall":
        return YES_NO, (YES, NO)
    if name.endswith("_cidrs") or name == "members":
        return LIST, ()
    if name in ("psk", "password"):
        return SECRET, ()
    last = name.rsplit(".", 1)[-1]
    if last.endswith("port") or last in ("icmp_type", "icmp_code", "interval", "timeout"):
        return NUMBER, ()
    return TEXT, ()


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    words = name.replace("_", " ")
    return words[:1].upper() + words[1:]


def _form(rule_type: RuleType) -> RuleForm:
    names: list[str] = []
    for name in RULE_FIELDS[rule_type]:
        if rule_type == RuleType.PORT_FORWARD and name in SHORTHANDS:
            continue
        names += [f"{name}.{sub}" for sub in NESTED[name]] if name in NESTED else [name]
    fields = []
    for name in names:
        kind, choices = _kind(rule_type, name)
        # A load balancer defaults its protocol (tcp); firewall and forwarding rules need one.
        required = name == "protocol" and rule_type != RuleType.LOAD_BALANCER
        hint = HINTS.get(name, "")
        fields.append(FormField(name, _label(name), kind, choices, hint, required))
    title, tab, noun = TITLES[rule_type]
    return RuleForm(rule_type, title, tab, noun, tuple(fields), COLUMNS[rule_type])


FORMS: Mapping[RuleType, RuleForm] = {t: _form(t) for t in RuleType}


# -- values <-> fields -----------------------------------------------------------------------

_INT = re.compile(r"-?[0-9]{1,9}")


def to_fields(form: RuleForm, values: Mapping[str, str]) -> dict[str, Any]:
    """The fields to send for what was typed: empty rows are left out (the engine's defaults
    apply), numbers become ints, lists are split on commas. Anything odd goes as typed, so the
    engine's error names the field."""
    out: dict[str, Any] = {}
    for f in form.fields:
        text = values.get(f.name, "").strip()
        if not text:
            continue
        value: Any = text
        if f.kind == NUMBER and _INT.fullmatch(text):
            value = int(text)
        elif f.kind == YES_NO and text in (YES, NO):
            value = text == YES
        elif f.kind == LIST:
            items = [part.strip() for part in text.split(",") if part.strip()]
            value = [_member(i) for i in items] if f.name == "members" else items
        parent, _, child = f.name.partition(".")
        if child:
            out.setdefault(parent, {})[child] = value
        else:
            out[f.name] = value
    return out


def _member(text: str) -> Any:
    """`10.1.1.5:8080` -> {"ip", "port"}; `10.1.1.5` stays a string (the rule's private port)."""
    ip, sep, port = text.rpartition(":")
    if sep and _INT.fullmatch(port):
        return {"ip": ip, "port": int(port)}
    return text


def to_values(form: RuleForm, rule: Mapping[str, Any]) -> dict[str, str]:
    """What a form shows for a stored rule (to edit it)."""
    out: dict[str, str] = {}
    for f in form.fields:
        value = _lookup(rule, f.name)
        if value is not None:
            out[f.name] = text_of(value)
    return out


def _lookup(rule: Mapping[str, Any], name: str) -> Any:
    parent, _, child = name.partition(".")
    value = rule.get(parent)
    if child:
        return value.get(child) if isinstance(value, dict) else None
    return value


def text_of(value: Any) -> str:
    """A field's value as one line of text."""
    if isinstance(value, bool):
        return YES if value else NO
    if isinstance(value, dict) and set(value) == {"ip", "port"}:
        return f"{value['ip']}:{value['port']}"
    if isinstance(value, list | tuple):
        return ", ".join(text_of(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={text_of(v)}" for k, v in value.items())
    return str(value)


def cell(rule: Mapping[str, Any], names: tuple[str, ...]) -> str:
    """One table cell: a field, or a start/end pair shown as `80` or `1000-2000`."""
    values = [rule.get(n) for n in names]
    if all(v is None for v in values):
        return "-"
    if len(values) == 2 and values[0] is not None:
        first, second = values
        if names[0] == "icmp_type":
            return (
                "any"
                if first == -1
                else (f"{first}" if second in (-1, None) else f"{first}/{second}")
            )
        return text_of(first) if second in (None, first) else f"{first}-{second}"
    return text_of(values[0])


def form_field_for(form: RuleForm, path: str) -> str | None:
    """The form row an engine error's field path names (`members[2].ip` -> `members`,
    `public_port` -> `public_start_port`), or None when it names none of them."""
    if form.field(path) is not None:
        return path
    base = path.split("[", 1)[0]
    if form.field(base) is not None:
        return base
    for short in SHORTHANDS:
        if base == short:
            return short.replace("_port", "_start_port")
    return None


def summary(rule: Mapping[str, Any]) -> str:
    """A rule in a few words, for confirmations and diffs: "port-forward 7: 203.0.113.10:8080
    -> 10.1.101.10:80/tcp"."""
    form = FORMS.get(RuleType(rule["type"])) if rule.get("type") in set(RuleType) else None
    head = f"{rule.get('type', 'rule')} {rule.get('id', '')}".strip()
    if form is None:
        return head
    if form.type == RuleType.PORT_FORWARD:
        pub = cell(rule, ("public_start_port", "public_end_port"))
        priv = cell(rule, ("private_start_port", "private_end_port"))
        return (
            f"{head}: {rule.get('public_ip')}:{pub} -> {rule.get('private_ip')}:{priv}"
            f"/{rule.get('protocol')}"
        )
    parts = [f"{header} {cell(rule, names)}" for header, names in form.columns]
    return f"{head}: " + ", ".join(parts)

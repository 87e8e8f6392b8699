"""Rule forms are built from the rule model: every field a form shows is one the engine takes,
typed text becomes the engine's fields (and a stored rule the same text again), and an engine
error's field path finds its form row."""

from __future__ import annotations

from backend.router.rule_types import RuleType
from backend.router.rules import RULE_FIELDS, NetworkContext, parse_rule
from tui_app.rule_forms import (
    CHOICE,
    FORMS,
    LIST,
    NUMBER,
    SECRET,
    YES_NO,
    cell,
    form_field_for,
    summary,
    to_fields,
    to_values,
)

CTX = NetworkContext(
    cidr="10.1.101.0/24",
    gateway="10.1.101.1",
    public_ips=frozenset({"203.0.113.10"}),
    source_nat_ip="203.0.113.10",
)


def test_every_rule_type_has_a_form_of_fields_the_engine_accepts() -> None:
    assert set(FORMS) == set(RuleType)
    for rule_type, form in FORMS.items():
        for f in form.fields:
            assert f.name.split(".")[0] in RULE_FIELDS[rule_type], (rule_type, f.name)
        for _header, names in form.columns:
            assert all(n in RULE_FIELDS[rule_type] for n in names), (rule_type, names)


def test_field_kinds_follow_the_names() -> None:
    pf = FORMS[RuleType.PORT_FORWARD]
    kinds = {f.name: f.kind for f in pf.fields}
    assert "public_port" not in kinds, "the shorthand stays off the form"
    assert kinds["public_start_port"] == NUMBER and kinds["open_firewall"] == YES_NO
    protocol = pf.field("protocol")
    assert protocol is not None and protocol.kind == CHOICE and protocol.choices == ("tcp", "udp")
    assert protocol.required
    lb = FORMS[RuleType.LOAD_BALANCER]
    assert lb.field("members") is not None and lb.field("members").kind == LIST  # type: ignore[union-attr]
    assert lb.field("health_check.timeout") is not None
    lb_protocol = lb.field("protocol")
    assert lb_protocol is not None and not lb_protocol.required and lb_protocol.choices == ("tcp",)
    vpn_psk = FORMS[RuleType.REMOTE_ACCESS_VPN].field("psk")
    assert vpn_psk is not None and vpn_psk.kind == SECRET


def test_typed_text_becomes_fields_the_engine_stores_and_back() -> None:
    pf = FORMS[RuleType.PORT_FORWARD]
    typed = {
        "public_ip": "203.0.113.10",
        "public_start_port": "8080",
        "private_ip": " 10.1.101.10 ",
        "private_start_port": "80",
        "protocol": "tcp",
        "open_firewall": "no",
    }
    fields = to_fields(pf, typed)
    assert fields == {
        "public_ip": "203.0.113.10",
        "public_start_port": 8080,
        "private_ip": "10.1.101.10",
        "private_start_port": 80,
        "protocol": "tcp",
        "open_firewall": False,
    }
    stored = parse_rule("port-forward", fields, CTX).to_fields()
    again = to_values(pf, stored)
    assert again["public_end_port"] == "8080" and again["open_firewall"] == "no"
    assert to_fields(pf, again) == stored


def test_lists_members_and_nested_fields() -> None:
    lb = FORMS[RuleType.LOAD_BALANCER]
    fields = to_fields(
        lb,
        {
            "name": "web",
            "public_ip": "203.0.113.10",
            "public_port": "80",
            "members": "10.1.101.10, 10.1.101.11:8080,",
            "health_check.interval": "10",
            "health_check.path": "/health",
        },
    )
    assert fields["members"] == ["10.1.101.10", {"ip": "10.1.101.11", "port": 8080}]
    assert fields["health_check"] == {"interval": 10, "path": "/health"}
    stored = parse_rule("load-balancer", fields, CTX).to_fields()
    values = to_values(lb, stored)
    assert values["members"] == "10.1.101.10:80, 10.1.101.11:8080"
    assert values["health_check.timeout"] == "2"


def test_odd_text_goes_as_typed_for_the_engine_to_name() -> None:
    pf = FORMS[RuleType.PORT_FORWARD]
    assert to_fields(pf, {"public_start_port": "80; reboot"}) == {"public_start_port": "80; reboot"}
    assert to_fields(pf, {"public_start_port": "   "}) == {}


def test_engine_error_paths_find_their_rows() -> None:
    lb = FORMS[RuleType.LOAD_BALANCER]
    assert form_field_for(lb, "members[2].ip") == "members"
    assert form_field_for(lb, "health_check.timeout") == "health_check.timeout"
    pf = FORMS[RuleType.PORT_FORWARD]
    assert form_field_for(pf, "public_port") == "public_start_port"
    assert form_field_for(pf, "fields") is None


def test_cells_and_summaries() -> None:
    rule = {"id": 7, "type": "port-forward", "public_ip": "203.0.113.10"}
    rule |= {"public_start_port": 1000, "public_end_port": 1010, "protocol": "udp"}
    rule |= {"private_ip": "10.1.101.10", "private_start_port": 1000, "private_end_port": 1010}
    assert cell(rule, ("public_start_port", "public_end_port")) == "1000-1010"
    assert summary(rule) == "port-forward 7: 203.0.113.10:1000-1010 -> 10.1.101.10:1000-1010/udp"
    icmp = {"icmp_type": 8, "icmp_code": -1}
    assert cell(icmp, ("icmp_type", "icmp_code")) == "8"
    assert cell({"icmp_type": -1, "icmp_code": -1}, ("icmp_type", "icmp_code")) == "any"
    assert cell({}, ("start_port", "end_port")) == "-"


def test_status_words_of_a_new_network_do_not_speak_of_changes() -> None:
    from tui_app.screens.router_rules import status_words

    base = {"router": "r-5-VM", "router_state": "Running", "version": 0, "pending": True}
    words, _ = status_words({**base, "rules": []})
    assert words.startswith("no rules yet") and "changes" not in words
    words, _ = status_words({**base, "rules": [{"id": 1, "type": "port-forward"}]})
    assert words.startswith("changes not applied (nothing applied yet)")
    words, _ = status_words({**base, "version": 2, "pending": False, "rules": []})
    assert words == "version 2 applied, live matches it"

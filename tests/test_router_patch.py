"""Small changes of a large router: the bundle patch, the incremental render, the quick readback.

A one-rule change of a 10,000-rule router sends a patch of the live bundle instead of the whole
bundle, re-renders only the chains the changed rules feed, and recognises a read-back that is
exactly the expected ruleset without parsing it line by line. Each shortcut must give exactly
what the complete path gives: these tests compare them on random edits.
"""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.appliance.router.live_digest import (
    canonical_netfilter,
    digest_of,
    live_digest,
    save_shows,
)
from backend.appliance.router.netfilter import render_ruleset, update_ruleset
from backend.appliance.router.render import files_unchanged, render_files
from backend.errors import InvalidInput
from backend.router.bundle import RouterBundle, bundle_patch, bundle_text, changed_rule_ids
from tests.test_router_render import ten_thousand_rules

# Few rules, so that dropping or adding one empties or fills a bucket chain (and changes the
# jumps of a head chain); a source NAT rule, whose line lives in a head chain.
POOL = ten_thousand_rules()[:200]
BASE_RULES = POOL[:60]
EXTRA_RULES = [*POOL[60:], (100_000, "source-nat", {"public_ip": "203.0.113.5"})]


def make(rules: list[tuple[int, str, dict[str, Any]]], version: int = 1, **kw: Any) -> RouterBundle:
    from tests.test_router_render import big_bundle

    big = big_bundle()
    return RouterBundle.create(
        version=version, network=big.network, addresses=big.addresses, rules=rules, **kw
    )


BASE = make(BASE_RULES)


@st.composite
def edits(draw: st.DrawFn) -> tuple[list[tuple[int, str, dict[str, Any]]], dict[str, Any]]:
    """A rule list made from BASE's: some rules dropped, some added, some firewall rules changed,
    and sometimes another egress policy (which changes every egress line)."""
    rules = {r[0]: r for r in BASE_RULES}
    for rule_id in draw(st.lists(st.sampled_from(sorted(rules)), max_size=6)):
        rules.pop(rule_id, None)
    for rule in draw(st.lists(st.sampled_from(EXTRA_RULES), max_size=6)):
        rules[rule[0]] = rule
    firewall = sorted(i for i, r in rules.items() if r[1].startswith("firewall"))
    for rule_id in draw(st.lists(st.sampled_from(firewall), max_size=4)):
        _, kind, fields = rules[rule_id]
        port = draw(st.integers(20_000, 30_000))
        rules[rule_id] = (rule_id, kind, {**fields, "start_port": port, "end_port": port + 5})
    policy = draw(st.sampled_from(["allow", "allow", "allow", "deny"]))
    return [rules[k] for k in sorted(rules)], {"default_egress_policy": policy}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits())
def test_a_patch_makes_exactly_the_new_bundle_and_the_incremental_render_matches(
    edit: tuple[list[tuple[int, str, dict[str, Any]]], dict[str, Any]],
) -> None:
    rules, kw = edit
    live = RouterBundle.from_json(BASE.to_json())
    new = RouterBundle.create(
        version=2,
        network=live.network,
        addresses=live.addresses,
        rules=rules,
        previous=live,
        **kw,
    )
    patch = bundle_patch(live, new)
    got = RouterBundle.from_patch(patch, live)
    assert got == new and got.digest == new.digest and got.to_json() == new.to_json()
    # What changed is known without comparing every rule, and is what comparing finds.
    expected_changed = {r.id for r in new.rules} ^ {r.id for r in live.rules}
    live_by_id = {r.id: r.to_dict() for r in live.rules}
    expected_changed |= {
        r.id for r in new.rules if r.id in live_by_id and live_by_id[r.id] != r.to_dict()
    }
    if got.change is not None:
        assert got.change.ids == expected_changed
    assert changed_rule_ids(live, got) >= expected_changed
    # The incremental render is the complete render; files are reused only when equal.
    old_ruleset = render_ruleset(live)
    assert update_ruleset(live, old_ruleset, got) == render_ruleset(new)
    if files_unchanged(live, got):
        assert render_files(live) == render_files(new)
    # A second patch on top of the first still lands exactly (the patched bundle is a base).
    again = make(rules[: len(rules) // 2], version=3, **kw)
    second = RouterBundle.from_patch(bundle_patch(got, again), got)
    assert second == again and second.digest == again.digest
    assert update_ruleset(got, render_ruleset(got), second) == render_ruleset(again)


def test_a_one_rule_patch_is_small_and_names_only_that_rule() -> None:
    live = RouterBundle.from_json(BASE.to_json())
    rules = [r if r[0] != 6 else (6, r[1], {**r[2], "public_port": 40_000}) for r in BASE_RULES]
    new = RouterBundle.create(
        version=2, network=live.network, addresses=live.addresses, rules=rules, previous=live
    )
    patch = json.loads(bundle_patch(live, new))
    assert [r["id"] for r in patch["rules_put"]] == [6]
    assert patch["rules_drop"] == []
    assert patch["base"] == {"version": 1, "digest": live.digest}
    assert patch["digest"] == new.digest and patch["version"] == 2
    assert not {"network", "addresses", "vpn_users", "control_sources"} & patch.keys()


def test_a_patch_of_another_base_is_refused_naming_base() -> None:
    live = RouterBundle.from_json(BASE.to_json())
    other = make(BASE_RULES[:-1], version=1)
    new = make(BASE_RULES[1:], version=2)
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_patch(bundle_patch(other, new), live)
    assert err.value.field == "base" and "send the whole bundle" in err.value.reason
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_patch(bundle_patch(live, new), None)
    assert err.value.field == "base"


def test_a_patch_whose_result_differs_from_its_digest_is_refused_naming_digest() -> None:
    live = RouterBundle.from_json(BASE.to_json())
    patch = json.loads(bundle_patch(live, make(BASE_RULES[1:], version=2)))
    patch["digest"] = "0" * 64
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_patch(json.dumps(patch), live)
    assert err.value.field == "digest"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        # A port forward on a port another kept rule forwards already.
        ({"public_port": 10_001}, "rules_put[0].fields.public_start_port"),
        ({"private_ip": "10.1.0.2; reboot"}, "rules_put[0].fields.private_ip"),
        ({"protocol": "tcp\nCOMMIT"}, "rules_put[0].fields.protocol"),
        ({"public_port": 70_000}, "rules_put[0].fields.public_port"),
    ],
)
def test_a_bad_or_conflicting_rule_in_a_patch_is_refused_naming_it(
    change: dict[str, Any], field: str
) -> None:
    live = RouterBundle.from_json(BASE.to_json())
    patch = json.loads(bundle_patch(live, make(BASE_RULES[1:], version=2)))
    _, kind, fields = BASE_RULES[1]  # rule 2, a port forward on public port 10,000
    patch["rules_put"] = [{"id": 2, "type": kind, "fields": {**fields, **change}}]
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_patch(json.dumps(patch), live)
    assert err.value.field == field


def test_a_patch_may_change_the_network_parts_too() -> None:
    live = RouterBundle.from_json(BASE.to_json())
    new = make(BASE_RULES, version=2, default_egress_policy="deny", control_sources=["10.0.0.0/8"])
    patch = bundle_patch(live, new)
    assert set(json.loads(patch)) >= {"default_egress_policy", "control_sources"}
    got = RouterBundle.from_patch(patch, live)
    assert got == new and got.digest == new.digest
    assert update_ruleset(live, render_ruleset(live), got) == render_ruleset(new)


def test_the_ruleset_canonical_text_is_what_parsing_its_restore_text_gives() -> None:
    ruleset = render_ruleset(BASE)
    assert ruleset.canonical_text() == canonical_netfilter(ruleset.restore_text())


def save_text(ruleset_text: str) -> str:
    """restore text shaped as iptables-save prints it: comments, counters on declarations."""
    out = ["# Generated by iptables-save v1.8.9 on Fri Nov 27 03:00:00 2026"]
    for line in ruleset_text.splitlines():
        if line.startswith(":"):
            name, policy = line[1:].split()[:2]
            line = f":{name} {policy} [{len(name)}:{len(name) * 60}]"
        out.append(line)
        if line == "COMMIT":
            out.append("# Completed on Fri Nov 27 03:00:00 2026")
    return "\n".join(out) + "\n"


def test_a_save_showing_exactly_the_ruleset_is_recognised_and_anything_else_is_not() -> None:
    ruleset = render_ruleset(BASE)
    text = save_text(ruleset.restore_text())
    assert save_shows(text, ruleset)
    assert live_digest(text, {}) == digest_of(ruleset.canonical_text(), {})
    line = next(x for x in text.splitlines() if x.startswith("-A SYSVM_FWI_"))
    tampered = [
        text.replace(line + "\n", ""),  # a rule gone
        text.replace(line, line + "\n" + line),  # a rule twice
        text.replace(line, line.replace("ACCEPT", "DROP")),  # a rule changed
        text.replace(":INPUT DROP", ":INPUT ACCEPT"),  # a policy changed
        text.replace("COMMIT", ":SYSVM_EXTRA - [0:0]\nCOMMIT", 1),  # an extra chain
        text.replace("*nat\n", "*nut\n"),  # a table missing
    ]
    for other in tampered:
        assert not save_shows(other, ruleset), other[:200]
        # ... and then the exact parse tells the drift: the digest differs.
        assert live_digest(other, {}) != digest_of(ruleset.canonical_text(), {})


def test_a_bundle_built_from_stored_json_text_is_the_bundle_built_from_values() -> None:
    """The engine builds bundles from the rules' fields as the database stores them (JSON
    text), without decoding each row; the result is exactly what building from values gives."""
    rows = [(i, kind, json.dumps(fields)) for i, kind, fields in BASE_RULES]
    text = bundle_text(
        version=1,
        network=BASE.network,
        addresses=BASE.addresses,
        rules=rows,
        vpn_users=[{"username": "alice", "password": "s3cret-Pass"}],
        default_egress_policy="deny",
    )
    built = RouterBundle.from_json(text)
    expected = make(
        BASE_RULES,
        vpn_users=[{"username": "alice", "password": "s3cret-Pass"}],
        default_egress_policy="deny",
    )
    assert built == expected and built.digest == expected.digest
    broken = bundle_text(
        version=1, network=BASE.network, addresses=BASE.addresses, rules=[(1, "dns-entry", "{")]
    )
    with pytest.raises(InvalidInput) as err:
        RouterBundle.from_json(broken)
    assert err.value.field == "bundle"


def test_a_chain_of_patches_does_not_keep_the_old_bundles_alive() -> None:
    """The router's applier keeps only its live bundle; a patched bundle must not hold the one
    it patched (and that one its own base...), or a router patched all day would grow."""
    current = RouterBundle.from_json(BASE.to_json())
    olds = [weakref.ref(current)]
    for version in range(2, 12):
        rules = [r for r in BASE_RULES if r[0] != version]
        nxt = RouterBundle.from_patch(bundle_patch(current, make(rules, version=version)), current)
        assert nxt.change is not None and nxt.change.is_from(current)
        _ = nxt._claims, nxt._by_type  # derived from the base's while it lives
        current = nxt
        olds.append(weakref.ref(current))
    gc.collect()
    assert [ref() is not None for ref in olds] == [False] * 10 + [True]
    assert current.change is not None and current.change.base() is None
    assert current == make([r for r in BASE_RULES if r[0] != 11], version=11)


def test_a_patched_bundle_derives_its_indexes_from_its_base_before_the_base_is_gone() -> None:
    """The base is held weakly, so the claims and by-type indexes of a patched bundle are derived
    when it is made; derived later, with the base gone, they would be rebuilt from every rule
    (~14 ms for 10,000) at each patch of a chain. They equal the ones built from scratch."""
    current = RouterBundle.from_json(BASE.to_json())
    _ = current._claims, current._by_type
    for version in range(2, 6):
        rules = [r for r in BASE_RULES if r[0] != version]
        nxt = RouterBundle.from_patch(bundle_patch(current, make(rules, version=version)), current)
        assert "_claims" in nxt.__dict__ and "_by_type" in nxt.__dict__
        current = nxt
    gc.collect()
    again = RouterBundle.from_json(current.to_json())
    assert current._by_type == again._by_type
    assert _claims_by_id(current) == _claims_by_id(again)


def _claims_by_id(bundle: RouterBundle) -> dict[Any, list[Any]]:
    return {k: sorted((r.id, repr(c)) for r, c in v) for k, v in bundle._claims.items()}

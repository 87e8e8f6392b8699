"""Hostile text typed on the command line, for every field of the scalar-valued rule types (static
NAT needs a second public IP, which the lab's networks do not own; its fields are the same kinds
as port forwarding's and are covered at the model level in test_router_rules.py), goes
the way `sysvm router rule add` sends it (`_rule_fields`, then the engine API) and is refused with
one line naming that field, storing nothing and sending nothing to the router; or, if accepted,
it is a legal value of the field with nothing hostile left in it.

Property-based (hypothesis): each field gets shell metacharacters, control characters and
Unicode look-alikes spliced into a valid value, overlong values, huge numbers and random text.
One test end to end through a `sysvm` process lives in test_router_api.py.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from backend.cli import _rule_fields
from backend.engine.core import Engine
from backend.errors import InvalidInput
from tests.conftest import converge_lab

NET = "zone1-net1"
# Valid fields for the lab's zone1-net1 (10.1.101.0/24, guests .10 and .11); PUBLIC is filled in
# with the network's public (source NAT) IP.
PUBLIC = "{public}"
BASES: dict[str, dict[str, str]] = {
    "port-forward": {
        "public_ip": PUBLIC,
        "public_port": "8080",
        "private_ip": "10.1.101.10",
        "private_port": "80",
        "protocol": "tcp",
    },
    "firewall-ingress": {
        "public_ip": PUBLIC,
        "protocol": "tcp",
        "start_port": "22",
        "end_port": "23",
        "source_cidrs": "198.51.100.0/24,192.0.2.7/32",
    },
    "firewall-egress": {
        "protocol": "udp",
        "start_port": "53",
        "source_cidrs": "10.1.101.0/25",
        "dest_cidrs": "198.51.100.0/24",
    },
    "dhcp-entry": {"mac": "02:00:0a:01:65:0a", "ip": "10.1.101.10", "hostname": "web1"},
    "dns-entry": {"hostname": "db.example.org", "ip": "10.1.101.11"},
}
SHELL = [";", "|", "&&", "$(id)", "`id`", ">", "<", "'", '"', "\\", "*", "#", "!", " "]
CONTROL = ["\n", "\r", "\x00", "\t", "\x1b", "\x7f", "\u2028", "\x85"]
LOOKALIKE = ["\uff11", "\u0661", "\u0430", "\u0435", "\u200b", "\u202e", "\u00a0", "\uff0e"]
# What an accepted value may look like, per field: nothing else gets through.
LEGAL = {
    "public_ip": r"(\d{1,3}\.){3}\d{1,3}",
    "private_ip": r"(\d{1,3}\.){3}\d{1,3}",
    "ip": r"(\d{1,3}\.){3}\d{1,3}",
    "mac": r"([0-9a-f]{2}:){5}[0-9a-f]{2}",
    "hostname": r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?",
    "protocol": r"tcp|udp|icmp|all",
}


def _hostile(valid: str) -> Any:
    from hypothesis import strategies as st

    pieces = SHELL + CONTROL + LOOKALIKE
    spliced = st.builds(
        lambda piece, at: valid[:at] + piece + valid[at:],
        st.sampled_from(pieces),
        st.integers(0, len(valid)),
    )
    return st.one_of(
        spliced,
        st.just(valid * 400),
        st.just("9" * 40),
        st.just("-1"),
        st.text(max_size=30),
        st.text(alphabet="".join(pieces) + "0123456789.:/,", min_size=1, max_size=12),
    )


@pytest.fixture
async def net_engine(make_engine: Any) -> Engine:
    engine: Engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=1, vms=2)
    return engine


@pytest.mark.parametrize("rule_type", sorted(BASES))
async def test_hostile_cli_values_in_every_field_are_refused_naming_it(
    net_engine: Engine, rule_type: str
) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    shown = await net_engine.router_show(NET)
    base = {k: v.replace(PUBLIC, shown["public_ip"]) for k, v in BASES[rule_type].items()}
    version, rules_before = shown["version"], shown["rules"]
    loop = asyncio.get_running_loop()

    def engine(call: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(call, loop).result(60)

    # The base itself is accepted (so each refusal below is the hostile field's doing).
    ok = await net_engine.router_rule_add(NET, rule_type, _cli(base))
    await net_engine.router_rule_delete(NET, ok["id"])

    refused: dict[str, int] = {}

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data: st.DataObject) -> None:
        field = data.draw(st.sampled_from(sorted(base)))
        value = data.draw(_hostile(base[field]))
        try:
            fields = _cli({**base, field: value})
        except Exception as exc:  # the CLI's own refusal (a flag without a value, bad JSON)
            assert "\n" not in str(exc).strip()
            return
        try:
            added = engine(net_engine.router_rule_add(NET, rule_type, fields))
        except InvalidInput as exc:
            root = exc.field.split(".")[0].split("[")[0]
            assert root in _names_of(field), f"{field}={value!r} blamed {exc.field}: {exc}"
            assert "\n" not in str(exc) and "\x00" not in str(exc)
            refused[field] = refused.get(field, 0) + 1
            return
        try:
            for key, legal in LEGAL.items():
                stored = added.get(key)
                if isinstance(stored, str):
                    assert re.fullmatch(legal, stored), f"{field}={value!r} stored {key}={stored!r}"
            for stored in added.values():
                if isinstance(stored, str):
                    assert not any(ch in stored for ch in CONTROL + LOOKALIKE), stored
        finally:
            engine(net_engine.router_rule_delete(NET, added["id"]))

    await asyncio.to_thread(check)
    assert refused, "no hostile value was refused: the strategy is not hostile"
    after = await net_engine.router_show(NET)
    assert after["rules"] == rules_before, "a refused rule was stored"
    assert after["version"] == version, "something was sent to the router"


def _cli(fields: dict[str, str]) -> dict[str, Any]:
    """What `sysvm router rule add --name value ...` sends for these typed values."""
    pairs: list[str] = []
    for key, value in fields.items():
        pairs += [f"--{key.replace('_', '-')}", value]
    return _rule_fields(pairs)


def _names_of(field: str) -> set[str]:
    """The field names an error about `field` may carry (single-port shorthands expand)."""
    names = {field}
    if field.endswith("_port") and not field.startswith(("start", "end")):
        names |= {field.replace("_port", "_start_port"), field.replace("_port", "_end_port")}
    if field == "start_port":
        names.add("end_port")
    return names

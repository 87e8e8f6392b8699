"""Router rules through the engine API and the CLI: validated, stored normalized, nothing stored
on bad input, conflicts refused, diff and show as documented."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select

from backend.db.models import RouterRule
from backend.engine.core import Engine
from backend.errors import InvalidInput, NotFound
from tests.conftest import converge_lab, run_cli

PF = {
    "public_ip": "203.0.113.10",
    "public_port": 8080,
    "private_ip": "10.1.101.10",
    "private_port": 80,
    "protocol": "tcp",
}
HOSTILE = [
    "1; rm -rf /",
    "$(reboot)",
    "`id`",
    "80\n-A INPUT -j ACCEPT",
    "a\x00b",
    "９９",  # fullwidth digits
    "2０3.0.113.10",
    "10.1.101.1О",  # Cyrillic O
    "x" * 5000,
    99999999999999999999,
    -1,
    True,
    1.5,
    None,
    ["80"],
]


@pytest.fixture
async def net_engine(make_engine: Any) -> Engine:
    engine: Engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=1, vms=2)
    return engine


async def test_rule_is_stored_normalized_and_shown_with_pending_changes(net_engine: Engine) -> None:
    added = await net_engine.router_rule_add("zone1-net1", "port-forward", PF)
    assert added["public_start_port"] == added["public_end_port"] == 8080
    shown = await net_engine.router_show("zone1-net1")
    assert {
        "network",
        "router",
        "public_ip",
        "version",
        "digest",
        "live_digest",
        "drift",
        "rules",
    } <= set(shown)
    assert (
        shown["public_ip"] == "203.0.113.10"
        and shown["pending"] is True
        and shown["drift"] is False
    )
    assert [(r["id"], r["type"]) for r in shown["rules"]] == [(added["id"], "port-forward")]
    diff = await net_engine.router_diff("zone1-net1")
    assert [r["id"] for r in diff["added"]] == [added["id"]] and not diff["removed"]


async def test_overlapping_port_forward_is_refused_and_nothing_is_stored(
    net_engine: Engine,
) -> None:
    await net_engine.router_rule_add("zone1-net1", "port-forward", PF)
    with pytest.raises(InvalidInput) as err:
        await net_engine.router_rule_add(
            "zone1-net1", "port-forward", PF | {"private_ip": "10.1.101.11"}
        )
    assert err.value.field == "public_start_port" and "conflicts" in err.value.reason
    assert len((await net_engine.router_show("zone1-net1"))["rules"]) == 1


async def test_private_ip_outside_the_network_and_foreign_public_ip_are_refused(
    net_engine: Engine,
) -> None:
    for change, field in (
        ({"private_ip": "192.0.2.10"}, "private_ip"),
        ({"public_ip": "198.51.100.77"}, "public_ip"),
        ({"public_port": 0}, "public_port"),
    ):
        with pytest.raises(InvalidInput) as err:
            await net_engine.router_rule_add("zone1-net1", "port-forward", PF | change)
        assert err.value.field.startswith(field.split("_port")[0]), (change, err.value.field)
    assert (await net_engine.router_show("zone1-net1"))["rules"] == []


@pytest.mark.parametrize("field", sorted(PF))
async def test_hostile_values_in_every_field_get_a_clear_error_and_store_nothing(
    net_engine: Engine, field: str
) -> None:
    for value in HOSTILE:
        with pytest.raises(InvalidInput) as err:
            await net_engine.router_rule_add("zone1-net1", "port-forward", PF | {field: value})
        assert err.value.field.split(".")[0].split("[")[0] in (
            field,
            field.replace("_port", "_start_port"),
        )
        assert "\n" not in str(err.value)
    assert (await net_engine.router_show("zone1-net1"))["rules"] == []


async def test_delete_and_unknown_network(net_engine: Engine) -> None:
    rule = await net_engine.router_rule_add("zone1-net1", "port-forward", PF)
    await net_engine.router_rule_delete("zone1-net1", rule["id"])
    assert (await net_engine.router_show("zone1-net1"))["rules"] == []
    with pytest.raises(NotFound):
        await net_engine.router_rule_delete("zone1-net1", rule["id"])
    with pytest.raises(NotFound):
        await net_engine.router_show("no-such-net")


def test_cli_rule_add_with_shell_metacharacters_is_one_clear_error(home: Any) -> None:
    assert run_cli("lab", "up", "--zones", "1", "--networks", "1", "--vms", "1").returncode == 0
    out = run_cli(
        "router", "rule", "add", "zone1-net1", "--type", "port-forward",
        "--public-ip", "203.0.113.10", "--public-port", "8080; reboot",
        "--private-ip", "10.1.101.10", "--private-port", "80", "--protocol", "tcp",
    )  # fmt: skip
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "public_port" in out.stderr
    ok = run_cli(
        "router", "rule", "add", "zone1-net1", "--type", "port-forward", "--json",
        "--public-ip", "203.0.113.10", "--public-port", "8080",
        "--private-ip", "10.1.101.10", "--private-port", "80", "--protocol", "tcp",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(run_cli("router", "show", "zone1-net1", "--json").stdout)
    assert [r["public_start_port"] for r in shown["rules"]] == [8080]
    run_cli("engine", "stop")


async def test_apply_confirms_then_check_and_a_recreated_router_gets_the_same_rules(
    net_engine: Engine,
) -> None:
    await net_engine.router_rule_add("zone1-net1", "port-forward", PF)
    job = await net_engine.wait_job(
        (await net_engine.router_apply("zone1-net1", confirm_timeout=5)).id, 60
    )
    assert job.state == "succeeded", job.error
    assert (
        job.result is not None
        and job.result["version"] == 1
        and job.result["pending_confirm"] is True
    )
    # a finished apply says what it did, not its last step ("confirming version 1 ...")
    assert job.message == "version 1 applied and confirmed over a new connection"
    shown = await net_engine.router_show("zone1-net1")
    assert shown["version"] == 1 and shown["pending"] is False and shown["drift"] is False
    checked = await net_engine.router_check("zone1-net1")
    assert checked["drift"] is False and checked["live_version"] == 1
    live = checked["live_digest"]

    # destroy and recreate the router: the new one is given the current rules before it serves
    old = shown["router"]
    job = await net_engine.wait_job(
        (await net_engine.network_restart("zone1-net1", cleanup=True)).id, 60
    )
    assert job.state == "succeeded", job.error
    again = await net_engine.router_check("zone1-net1")
    assert again["router"] != old and again["live_version"] == 1 and again["drift"] is False
    assert again["digest"] == checked["digest"] and live  # same bundle, live on the new router


async def test_a_second_apply_sends_a_patch_and_an_engine_without_the_base_sends_it_whole(
    net_engine: Engine,
) -> None:
    async def apply() -> dict[str, Any]:
        job = await net_engine.router_apply("zone1-net1", confirm_timeout=5)
        done = await net_engine.wait_job(job.id, 60)
        assert done.state == "succeeded", done.error
        assert done.result is not None
        return done.result

    await net_engine.router_rule_add("zone1-net1", "port-forward", PF)
    first = await apply()
    assert first["input"] == "bundle" and first["version"] == 1
    await net_engine.router_rule_add("zone1-net1", "port-forward", {**PF, "public_port": 8081})
    second = await apply()
    assert second["input"] == "patch" and second["version"] == 2 and second["drift"] is False
    shown = await net_engine.router_show("zone1-net1")
    assert shown["digest"] == second["digest"] and shown["pending"] is False
    assert len(shown["rules"]) == 2 and "8081" in json.dumps(shown["rules"])
    net_engine.routers._applied.clear()  # as after an engine restart
    await net_engine.router_rule_add("zone1-net1", "port-forward", {**PF, "public_port": 8082})
    third = await apply()
    assert third["input"] == "bundle" and third["version"] == 3
    checked = await net_engine.router_check("zone1-net1")
    assert checked["drift"] is False and checked["live_version"] == 3


async def test_a_bundle_built_from_the_changed_rows_only_is_the_bundle_built_whole(
    net_engine: Engine,
) -> None:
    """The engine builds a network's next bundle from its last one by parsing only the rule rows
    that changed (added, replaced, deleted): the result is exactly the bundle built from every
    row, and a refused row still fails the build naming its field."""
    routers = net_engine.routers

    async def desired() -> Any:
        return await routers.desired_bundle("zone1-net1")

    async def same_as_whole() -> None:
        incremental = await desired()
        assert incremental.change is not None, "made from the changed rows"
        routers._built.clear()
        whole = await desired()
        assert whole.change is None
        assert incremental.to_json() == whole.to_json()
        assert incremental.digest == whole.digest

    first = await net_engine.router_rule_add("zone1-net1", "port-forward", PF)
    await desired()
    await net_engine.router_rule_add("zone1-net1", "port-forward", {**PF, "public_port": 8081})
    ingress = {"public_ip": PF["public_ip"], "protocol": "udp", "start_port": 53}
    await net_engine.router_rule_add("zone1-net1", "firewall-ingress", ingress)
    await same_as_whole()
    await net_engine.router_rule_replace(
        "zone1-net1", first["id"], "port-forward", PF | {"private_port": 8000}
    )
    await same_as_whole()
    await net_engine.router_rule_delete("zone1-net1", first["id"])
    await same_as_whole()

    # A row made invalid behind the engine's back (edited in the database) fails the build.
    async def corrupt(s: Any) -> None:
        row = (await s.scalars(select(RouterRule).where(RouterRule.type == "port-forward"))).one()
        row.fields = {**row.fields, "private_ip": "192.0.2.10"}

    await net_engine.db.write(corrupt)
    with pytest.raises(InvalidInput) as err:
        await desired()
    assert err.value.field.endswith("fields.private_ip"), err.value.field


async def test_nothing_changed_means_nothing_pending(net_engine: Engine) -> None:
    job = await net_engine.wait_job(
        (await net_engine.router_apply("zone1-net1", confirm_timeout=0)).id, 60
    )
    assert job.state == "succeeded", job.error
    assert job.message == "version 1 applied and not confirmed"
    assert (await net_engine.router_diff("zone1-net1"))["pending"] is False
    with pytest.raises(InvalidInput) as err:
        await net_engine.router_apply("zone1-net1", confirm_timeout=-1)
    assert err.value.field == "confirm_timeout"


async def test_replace_keeps_the_id_and_a_rejected_change_leaves_the_old_rule(
    net_engine: Engine,
) -> None:
    rule = await net_engine.router_rule_add("zone1-net1", "port-forward", PF)
    # The rule is checked against the others, not against itself: the same port is fine.
    changed = await net_engine.router_rule_replace(
        "zone1-net1", rule["id"], "port-forward", PF | {"private_port": 8000}
    )
    assert changed["id"] == rule["id"] and changed["private_start_port"] == 8000
    with pytest.raises(InvalidInput) as err:
        await net_engine.router_rule_replace(
            "zone1-net1", rule["id"], "port-forward", PF | {"private_ip": "192.0.2.10"}
        )
    assert err.value.field == "private_ip"
    [kept] = (await net_engine.router_show("zone1-net1"))["rules"]
    assert kept["id"] == rule["id"] and kept["private_start_port"] == 8000
    with pytest.raises(NotFound):
        await net_engine.router_rule_replace("zone1-net1", 9999, "port-forward", PF)


async def test_status_tree_reports_router_drift(net_engine: Engine) -> None:
    [net] = (await net_engine.status())["zones"][0]["networks"]
    assert net["router"] is not None and net["router"]["drift"] is False

"""System VM lifecycle on the lab: self-healing zones, routers that follow their network's use,
host failure, and operator actions that go through the states an operator expects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.api.types import EventRecord
from backend.db.models import Zone, ZoneState
from backend.engine.core import Engine
from backend.errors import Conflict, InvalidInput, NotFound
from backend.orchestration.reconciler import required_cpvms, required_ssvms
from tests.conftest import converge_lab

MakeEngine = Callable[..., Awaitable[Engine]]
FAST = {
    "SYSVM_HOST_PING_INTERVAL": "0.2",
    "SYSVM_HOST_PING_TIMEOUT": "0.5",
    "SYSVM_SYSTEMVM_STOP_TIMEOUT": "1",
}


async def wait_for(predicate: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def zone_vm(engine: Engine, zone: str, vm_type: str) -> list[dict[str, Any]]:
    return [v for v in await engine.system_vms_list(zone=zone) if v["type"] == vm_type]


async def running(engine: Engine, zone: str, vm_type: str) -> list[dict[str, Any]]:
    return [v for v in await zone_vm(engine, zone, vm_type) if v["state"] == "Running"]


@pytest.mark.parametrize("vm_type", ["ssvm", "cpvm"])
@pytest.mark.parametrize("undefine", [False, True], ids=["destroyed", "undefined"])
async def test_crashed_zone_system_vm_is_healed_within_5s(
    make_engine: MakeEngine, vm_type: str, undefine: bool
) -> None:
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=1, hosts=2, networks=0, vms=0)
    (victim,) = await zone_vm(engine, "zone1", vm_type)
    mark = await _last_event_id(engine)
    t0 = time.monotonic()
    await engine.lab_crash(victim["name"], undefine=undefine)
    healed = await wait_for(
        lambda: _restarted(engine, victim["name"], mark), 5, f"{victim['name']} Running again"
    )
    assert time.monotonic() - t0 < 5
    # The engine learnt of the crash from libvirt's lifecycle event (nothing told it).
    # (an undefine is a destroy first: libvirt reports the stop and the undefine; either
    # may be the one recorded)
    events = await engine.events(since_id=mark, entity="system_vm", limit=100)
    reasons = {e.fields.get("last_error") for e in events} - {None, ""}
    expected = {"domain stopped outside the engine", "domain undefined outside the engine"}
    assert len(reasons) == 1 and reasons <= (expected if undefine else {min(expected)})
    assert await _states_of(engine, victim["name"], mark) == ["Stopped", "Starting", "Running"]
    assert [v["name"] for v in await zone_vm(engine, "zone1", vm_type)] == [victim["name"]]
    host_id = await engine._host_id(healed["host"])
    assert (await engine.hypervisors.get(host_id).domain_states())[victim["name"]] == "running"


async def _restarted(engine: Engine, name: str, since_id: int) -> dict[str, Any] | None:
    states = await _states_of(engine, name, since_id)
    vm = await engine.system_vm(name)
    return vm if states[-1:] == ["Running"] and vm["state"] == "Running" else None


async def test_router_follows_its_network_first_vm_then_idles_out_then_returns(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(SYSVM_NETWORK_GC_WAIT="1", SYSVM_RECONCILE_INTERVAL="0.2", **FAST)
    await converge_lab(engine, zones=1, hosts=1, networks=1, vms=0)
    net = (await engine.status())["zones"][0]["networks"][0]
    assert net["router"] is None, "no router before the network's first VM starts"

    job = await engine.wait_job((await engine.guest_vm_deploy("zone1-net1", "web1")).id, 30)
    assert job.state == "succeeded", job.error
    net = (await engine.status())["zones"][0]["networks"][0]
    assert net["router"]["state"] == "Running"
    assert [v["state"] for v in net["vms"]] == ["Running"]
    router = net["router"]["name"]

    job = await engine.wait_job((await engine.guest_vm_action("web1", "stop")).id, 30)
    assert job.state == "succeeded", job.error

    async def router_state() -> str:
        return (await engine.system_vm(router))["state"]

    await wait_for(
        lambda: _eq(router_state(), "Stopped"), 10, "idle router stopped after network.gc.wait"
    )
    job = await engine.wait_job((await engine.guest_vm_action("web1", "start")).id, 30)
    assert job.state == "succeeded", job.error
    assert await router_state() == "Running", (
        "starting a VM starts its network's stopped router first"
    )


async def _eq(coro: Awaitable[Any], expected: Any) -> bool:
    return bool(await coro == expected)


async def _states_of(engine: Engine, name: str, since_id: int) -> list[str]:
    events: list[EventRecord] = await engine.events(
        since_id=since_id, entity="system_vm", limit=1000
    )
    return [e.fields["state"] for e in events if e.name == name and "state" in e.fields]


async def _last_event_id(engine: Engine) -> int:
    await engine.bus.flush()
    events = await engine.events(limit=1)
    return events[-1].id if events else 0


async def test_reboot_stop_start_and_migrate_go_through_the_expected_states(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=1, hosts=2, networks=1, vms=1)
    router = (await engine.status())["zones"][0]["networks"][0]["router"]["name"]

    mark = await _last_event_id(engine)
    job = await engine.wait_job((await engine.system_vm_action(router, "reboot")).id, 30)
    assert job.state == "succeeded", job.error
    assert await _states_of(engine, router, mark) == ["Stopping", "Starting", "Running"]

    mark = await _last_event_id(engine)
    job = await engine.wait_job((await engine.system_vm_action(router, "stop")).id, 30)
    assert job.state == "succeeded", job.error
    job = await engine.wait_job((await engine.system_vm_action(router, "start")).id, 30)
    assert job.state == "succeeded", job.error
    states = await _states_of(engine, router, mark)
    assert states[:2] == ["Stopping", "Stopped"] and states[-2:] == ["Starting", "Running"]

    before = (await engine.system_vm(router))["host"]
    mark = await _last_event_id(engine)
    job = await engine.wait_job((await engine.system_vm_action(router, "migrate")).id, 30)
    assert job.state == "succeeded", job.error
    after = (await engine.system_vm(router))["host"]
    assert after != before and job.result == {"host": after}
    assert await _states_of(engine, router, mark) == ["Migrating", "Running"]
    old_host = await engine.hypervisors.get(await engine._host_id(before)).domain_states()
    new_host = await engine.hypervisors.get(await engine._host_id(after)).domain_states()
    assert router not in old_host and new_host[router] == "running"


async def test_destroyed_ssvm_is_replaced_by_a_new_one(make_engine: MakeEngine) -> None:
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    (old,) = await zone_vm(engine, "zone1", "ssvm")
    job = await engine.wait_job((await engine.system_vm_action(old["name"], "destroy")).id, 30)
    assert job.state == "succeeded", job.error
    new = await wait_for(lambda: running(engine, "zone1", "ssvm"), 5, "a replacement SSVM")
    assert new[0]["name"] != old["name"]
    with pytest.raises(NotFound):
        await engine.system_vm(old["name"])  # destroyed VMs leave the lists
    # its addresses went back to the pool: the replacement may reuse the control IP
    assert new[0]["control_ip"] == old["control_ip"]


async def test_actions_in_the_wrong_state_fail_with_the_reason(make_engine: MakeEngine) -> None:
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=1, hosts=1, networks=1, vms=1)
    router = (await engine.status())["zones"][0]["networks"][0]["router"]["name"]
    job = await engine.wait_job((await engine.system_vm_action(router, "migrate")).id, 30)
    assert job.state == "failed" and "no other host in state Up" in job.error
    job = await engine.wait_job((await engine.system_vm_action(router, "stop")).id, 30)
    job = await engine.wait_job((await engine.system_vm_action(router, "reboot")).id, 30)
    assert job.state == "failed"
    assert f"cannot reboot {router}: it is Stopped (possible when Running)" in job.error
    with pytest.raises(InvalidInput) as err:
        await engine.system_vm_action(router, "explode")
    assert err.value.field == "action"
    with pytest.raises(NotFound, match="no system VM named"):
        await engine.system_vm_action("s-999-VM", "start")
    with pytest.raises(InvalidInput) as err:
        await engine.guest_vm_deploy("zone1-net1", "bad;name && rm -rf /")
    assert err.value.field == "name"
    with pytest.raises(Conflict, match="already exists"):
        await engine.guest_vm_deploy("zone1-net1", "zone1-net1-vm1")


async def test_conflicting_actions_on_one_vm_are_serialized(make_engine: MakeEngine) -> None:
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=1, hosts=1, networks=1, vms=1)
    router = (await engine.status())["zones"][0]["networks"][0]["router"]["name"]
    mark = await _last_event_id(engine)
    jobs = [await engine.system_vm_action(router, a) for a in ("reboot", "reboot", "stop")]
    done = [await engine.wait_job(j.id, 30) for j in jobs]
    assert [j.state for j in done] == ["succeeded", "succeeded", "succeeded"]
    states = await _states_of(engine, router, mark)
    # one action at a time: the two reboots and the stop never interleave
    assert states == ["Stopping", "Starting", "Running"] * 2 + ["Stopping", "Stopped"]


async def test_network_restart_with_cleanup_replaces_its_router(make_engine: MakeEngine) -> None:
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=1, hosts=1, networks=1, vms=1)
    old = (await engine.status())["zones"][0]["networks"][0]["router"]["name"]
    job = await engine.wait_job((await engine.network_restart("zone1-net1", cleanup=True)).id, 30)
    assert job.state == "succeeded", job.error
    new = (await engine.status())["zones"][0]["networks"][0]["router"]
    assert job.result == {"old_router": old, "router": new["name"]}
    assert new["name"] != old and new["state"] == "Running"


async def test_lost_host_goes_alert_its_ssvm_moves_and_the_duplicate_goes_when_it_returns(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=1, hosts=2, networks=0, vms=0)
    (ssvm,) = await zone_vm(engine, "zone1", "ssvm")
    lost = ssvm["host"]
    await engine.lab_host(lost, up=False)

    async def host_state() -> str:
        hosts = (await engine.status())["zones"][0]["hosts"]
        return next(h["state"] for h in hosts if h["name"] == lost)

    await wait_for(lambda: _eq(host_state(), "Alert"), 5, "lost host goes Alert")
    moved = await wait_for(
        lambda: _running_elsewhere(engine, ssvm["name"], lost), 10, "SSVM running on the other host"
    )
    assert moved["host"] != lost
    await engine.lab_host(lost, up=True)
    await wait_for(lambda: _eq(host_state(), "Up"), 5, "host back Up")
    lost_domains = await engine.hypervisors.get(await engine._host_id(lost)).domain_states()
    assert ssvm["name"] not in lost_domains, "the stale copy on the returned host was removed"
    copies = 0
    for host_id in engine.hypervisors.known:
        copies += (await engine.hypervisors.get(host_id).domain_states()).get(
            ssvm["name"]
        ) == "running"
    assert copies == 1


async def _running_elsewhere(engine: Engine, name: str, lost: str) -> dict[str, Any] | None:
    vm = await engine.system_vm(name)
    return vm if vm["state"] == "Running" and vm["host"] != lost else None


async def test_add_host_that_does_not_answer_stores_nothing(
    make_engine: MakeEngine, tmp_path: Any
) -> None:
    from backend.hypervisor.connection import HypervisorError

    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    with pytest.raises(HypervisorError) as err:
        await engine.host_add("zone1", "ghost", f"test://{tmp_path}/absent.xml")
    assert "ghost" in str(err.value) and "absent.xml" in str(err.value)
    with pytest.raises(InvalidInput) as bad:
        await engine.host_add("zone1", "ghost", "http://example.invalid/")
    assert bad.value.field == "uri"
    hosts = (await engine.status())["zones"][0]["hosts"]
    assert [h["name"] for h in hosts] == ["zone1-host1"]


def test_scaling_rules_follow_cloudstack() -> None:
    assert required_cpvms(0, 50, 10) == 1
    assert required_cpvms(41, 50, 10) == 2  # 41 sessions + 10 standby need a second proxy
    assert required_cpvms(90, 50, 10) == 2 and required_cpvms(91, 50, 10) == 3
    assert (
        required_ssvms(0, 10) == 1 and required_ssvms(10, 10) == 1 and required_ssvms(11, 10) == 2
    )


async def test_surplus_console_proxies_scale_down_after_the_idle_period(
    make_engine: MakeEngine,
) -> None:
    engine = await make_engine(
        SYSVM_SYSTEMVM_SCALE_DOWN_AFTER="0.5", SYSVM_RECONCILE_INTERVAL="0.2", **FAST
    )
    await converge_lab(engine, zones=1, hosts=2, networks=0, vms=0)
    engine.reconciler.console_sessions[1] = 45  # load that needs two proxies
    await engine.reconciler.reconcile_zone(1)
    assert len(await running(engine, "zone1", "cpvm")) == 2
    engine.reconciler.console_sessions[1] = 0
    await wait_for(
        lambda: _eq(_count(running(engine, "zone1", "cpvm")), 1), 10, "back to one proxy"
    )


async def test_a_pass_reconciles_only_the_zones_with_something_to_do(
    make_engine: MakeEngine,
) -> None:
    """A pass reads every zone in one go and reconciles (on fresh rows, under the zone's lock)
    only a zone that lacks a system VM or runs more than it needs: a quiet cloud costs one read."""
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=3, hosts=1, networks=0, vms=0)
    reconciled: list[int] = []
    reconcile_zone = engine.reconciler.reconcile_zone

    async def spy(zone_id: int) -> None:
        reconciled.append(zone_id)
        await reconcile_zone(zone_id)

    engine.reconciler.reconcile_zone = spy  # type: ignore[method-assign]
    await engine.reconciler.reconcile_once()
    assert reconciled == [], "every zone has what it needs"
    engine.reconciler.console_sessions[2] = 45  # load that needs a second proxy in zone2
    await engine.reconciler.reconcile_once()
    assert set(reconciled) == {2}
    assert len(await running(engine, "zone2", "cpvm")) == 2


async def test_a_disabled_zone_gets_no_system_vms(make_engine: MakeEngine) -> None:
    engine = await make_engine(**FAST)
    await converge_lab(engine, zones=2, hosts=1, networks=0, vms=0)

    def disable(s: Session) -> None:
        s.execute(update(Zone).where(Zone.name == "zone2").values(state=ZoneState.DISABLED.value))

    await engine.db.run_write(disable)
    engine.reconciler.console_sessions[2] = 45  # load that would need a second proxy
    await engine.reconciler.reconcile_zone(2)
    await engine.reconciler.reconcile_once()
    assert len(await running(engine, "zone2", "cpvm")) == 1


async def test_host_checks_waiting_for_their_turn_end_when_the_monitor_stops(
    make_engine: MakeEngine,
) -> None:
    """Checks of one round are spread over the ping interval; one still waiting for its turn
    when the monitor stops is cancelled, not left to ping a stopped engine's hosts."""
    engine = await make_engine(SYSVM_HOST_PING_INTERVAL="3", SYSVM_HOST_PING_TIMEOUT="1")
    await converge_lab(engine, zones=2, hosts=2, networks=0, vms=0)

    def pending() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name().startswith("ping-host-")]

    deadline = time.monotonic() + 10
    while len(pending()) < 2 and time.monotonic() < deadline:  # a round under way
        await asyncio.sleep(0.05)
    assert len(pending()) >= 2, "no round of host checks started"
    await engine.host_monitor.stop()
    assert pending() == []


async def _count(coro: Awaitable[list[Any]]) -> int:
    return len(await coro)

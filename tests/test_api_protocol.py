"""One EngineAPI suite, run against the in-process engine and over the websocket unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import unix_connect
from websockets.asyncio.server import unix_serve

from backend.api.client import RemoteEngine
from backend.api.protocol import EngineAPI
from backend.api.server import ApiServer
from backend.engine.core import Engine
from backend.errors import InvalidInput, NotFound, ReadOnly
from tests.conftest import make_config


@pytest.fixture(params=["in-process", "websocket"])
async def api(
    request: pytest.FixtureRequest, engine: Engine, home: Path
) -> AsyncIterator[EngineAPI]:
    if request.param == "in-process":
        yield engine
        return
    sock = home / "test.sock"
    server = await unix_serve(ApiServer(engine).handle, str(sock))
    client = await RemoteEngine.connect_unix(sock)
    try:
        yield client
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_both_implementations_satisfy_the_protocol(api: EngineAPI) -> None:
    assert isinstance(api, EngineAPI)
    info = await api.engine_info()
    assert info["schema"] and info["read_only"] is False


async def test_lab_up_job_converges_to_the_documented_status_shape(api: EngineAPI) -> None:
    job = await api.lab_up(zones=1, hosts=1, networks=1, vms=2)
    assert job.kind == "lab.up" and job.state in ("queued", "running")
    job = await api.wait_job(job.id, timeout=60)
    assert job.state == "succeeded", job.error
    assert job.progress == 100.0
    tree = await api.status()
    assert [z["name"] for z in tree["zones"]] == ["zone1"]
    zone = tree["zones"][0]
    assert set(zone) == {"id", "name", "state", "hosts", "system_vms", "networks"}
    types = {v["type"]: v for v in zone["system_vms"]}
    assert types["ssvm"]["state"] == "Running" and types["cpvm"]["state"] == "Running"
    assert types["ssvm"]["control_ip"].startswith("169.254.")
    assert set(types["ssvm"]) == {"id", "name", "type", "state", "host", "control_ip"}
    (net,) = zone["networks"]
    assert set(net) == {"id", "name", "cidr", "router", "vms"}
    assert net["router"] is not None and net["router"]["state"] == "Running"
    assert [(v["name"], v["state"]) for v in net["vms"]] == [
        ("zone1-net1-vm1", "Running"),
        ("zone1-net1-vm2", "Running"),
    ]


async def test_events_record_each_system_vm_reaching_running(api: EngineAPI) -> None:
    job = await api.wait_job((await api.lab_up(zones=1, hosts=1, networks=0, vms=0)).id, 60)
    assert job.state == "succeeded"
    events = await api.events(entity="system_vm", limit=1000)
    running = {e.name for e in events if e.fields.get("state") == "Running"}
    assert len(running) == 2 and all(n.endswith("-VM") for n in running)
    assert all(e.entity == "system_vm" for e in events)


async def test_subscription_delivers_live_job_events(api: EngineAPI) -> None:
    seen: list[str] = []

    async def listen() -> None:
        async for event in api.subscribe(["job"]):
            seen.append(event.fields["state"])
            if event.fields["state"] == "succeeded":
                return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.1)
    job = await api.lab_up(zones=1, hosts=1, networks=0, vms=0)
    await asyncio.wait_for(listener, 60)
    assert seen[0] == "queued" and "running" in seen and seen[-1] == "succeeded"
    assert (await api.job(job.id)).state == "succeeded"


async def test_bad_lab_size_is_refused_naming_the_field(api: EngineAPI) -> None:
    with pytest.raises(InvalidInput) as err:
        await api.lab_up(zones=0)
    assert err.value.field == "zones" and "between 1 and" in str(err.value)
    assert await api.jobs() == []


async def test_unknown_job_is_not_found(api: EngineAPI) -> None:
    with pytest.raises(NotFound, match="job 424242"):
        await api.job(424242)


async def test_cancelled_job_stops_promptly(api: EngineAPI, engine: Engine) -> None:
    engine.guests.boot_delay = 30  # system VMs take long to boot: the job is still running
    job = await api.lab_up(zones=1, hosts=1, networks=0, vms=0)
    await asyncio.sleep(0.5)
    started = asyncio.get_running_loop().time()
    job = await api.cancel_job(job.id)
    assert job.state == "cancelled"
    assert asyncio.get_running_loop().time() - started < 2


async def test_wrong_parameter_types_over_the_wire_name_the_field(
    engine: Engine, home: Path
) -> None:
    sock = home / "raw.sock"
    server = await unix_serve(ApiServer(engine).handle, str(sock))
    try:
        async with unix_connect(str(sock), uri="ws://localhost/") as ws:
            for params, field in (({"zones": "many"}, "zones"), ({"bogus": 1}, "params")):
                await ws.send(
                    json.dumps({"jsonrpc": "2.0", "id": 7, "method": "lab_up", "params": params})
                )
                reply = json.loads(await ws.recv())
                assert reply["id"] == 7 and reply["error"]["code"] == "invalid"
                assert reply["error"]["field"] == field
            await ws.send("this is not json")
            assert json.loads(await ws.recv())["error"]["code"] == "parse"
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 8, "method": "drop_tables"}))
            assert "unknown method" in json.loads(await ws.recv())["error"]["message"]
    finally:
        server.close()
        await server.wait_closed()
    assert await engine.jobs() == []


async def test_read_only_engine_refuses_changes_in_process_and_over_the_wire(home: Path) -> None:
    engine = Engine(make_config(home, SYSVM_READ_ONLY="true"))
    await engine.start()
    sock = home / "ro.sock"
    server = await unix_serve(ApiServer(engine, read_only=True).handle, str(sock))
    client = await RemoteEngine.connect_unix(sock)
    try:
        for api in (engine, client):
            with pytest.raises(ReadOnly, match="read-only"):
                await api.lab_up()
            assert (await api.status())["zones"] == []
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
        await engine.stop()

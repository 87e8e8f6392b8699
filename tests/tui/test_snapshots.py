"""SVG snapshots (pytest-textual-snapshot) of the console at 80x24 against a live engine.

`snap_compare` runs the app with `App.run()`, i.e. on an event loop of its own, while the
engine (and libvirt's one event implementation) lives on the test session's loop. So the
engine serves its EngineAPI on a unix socket, as the daemon does, and the app talks to it
through the real websocket client, from a worker thread.

Determinism: one zone with one host, network and guest VM; the SSVM and CPVM, which the
reconciler creates concurrently (so their ids race), are destroyed one after the other and
replaced, which gives them fixed names (s-4-VM, v-5-VM). Shots avoid what still varies
(their addresses), and the console runs with `clock=False` (no uptime, no times).
Update with `pytest tests/tui/test_snapshots.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input
from websockets.asyncio.server import unix_serve

from backend.api.client import RemoteEngine
from backend.api.server import ApiServer
from backend.api.types import EventRecord
from backend.config import load_config
from backend.engine.core import Engine
from tests.test_template_transfers import _Origin, origin, url
from tui_app.app import SysvmApp
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.help import HelpScreen
from tui_app.screens.jobs import JobsScreen
from tui_app.screens.router_rules import RouterRulesScreen
from tui_app.screens.templates import TemplatesScreen

SnapCompare = Callable[..., bool]
__all__ = ["origin"]  # the loopback HTTP server fixture, shared with the transfer tests


class SocketEngine:
    """EngineAPI through the real websocket client, connected on first use from whatever
    event loop the app runs on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._remote: RemoteEngine | None = None

    async def _client(self) -> RemoteEngine:
        if self._remote is None:
            self._remote = await RemoteEngine.connect_unix(self.path)
        return self._remote

    async def subscribe(self, entities: Any = None) -> AsyncIterator[EventRecord]:
        remote = await self._client()
        async for event in remote.subscribe(entities):
            yield event

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await getattr(await self._client(), name)(*args, **kwargs)

        return call


async def _replace(engine: Engine, vm_type: str) -> str:
    """Destroy the zone's VM of `vm_type`; return the name of the reconciler's replacement."""
    [old] = [v["name"] for v in await engine.system_vms_list() if v["type"] == vm_type]
    job = await engine.wait_job((await engine.system_vm_action(old, "destroy")).id, 30)
    assert job.state == "succeeded", job.error
    for _ in range(300):
        new = [
            v
            for v in await engine.system_vms_list()
            if v["type"] == vm_type and v["name"] != old and v["state"] == "Running"
        ]
        if new:
            return str(new[0]["name"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no new {vm_type} replaced {old}")


@pytest.fixture(scope="module")
async def snapshot_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """A fixed little cloud, served on a unix socket; yields the socket's path."""
    root = tmp_path_factory.mktemp("snapshots")
    home = root / "home"
    engine = Engine(load_config(home=home, env={"SYSVM_HOME": str(home)}))
    await engine.start()
    server = None
    try:
        job = await engine.wait_job(
            (await engine.lab_up(zones=1, hosts=1, networks=1, vms=1)).id, 60
        )
        assert job.state == "succeeded", job.error
        assert await _replace(engine, "ssvm") == "s-4-VM"
        assert await _replace(engine, "cpvm") == "v-5-VM"
        for action in ("stop", "start"):  # jobs 4 and 5, for the jobs screen
            job = await engine.guest_vm_action("zone1-net1-vm1", action)
            assert (await engine.wait_job(job.id, 30)).state == "succeeded"
        sock = root / "engine.sock"
        # close_timeout: the apps' loops are gone by then, no client answers a closing handshake
        server = await unix_serve(ApiServer(engine).handle, str(sock), close_timeout=0.2)
        yield sock
    finally:
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        await engine.stop()


async def _until(pilot: Pilot[None], condition: Callable[[], object], timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await pilot.pause(0.02)


async def _ready(pilot: Pilot[None]) -> SysvmApp:
    """The first snapshot is in and the tree is open all the way down."""
    app: SysvmApp = pilot.app  # type: ignore[assignment]
    await _until(pilot, lambda: app.main_screen.is_mounted and app.main_screen.inventory.loaded)
    tree = app.main_screen.inventory
    for item in tree.objects():
        tree.expand_path(*item.key)
    await pilot.pause()
    return app


async def _snap(snap_compare: SnapCompare, sock: Path, run_before: Any) -> bool:
    app = SysvmApp(SocketEngine(sock), clock=False)
    return await asyncio.to_thread(snap_compare, app, terminal_size=(80, 24), run_before=run_before)


async def test_main_screen_80x24(snapshot_engine: Path, snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        app = await _ready(pilot)
        tree = app.main_screen.inventory
        network = tree.item("network", "zone1-net1")
        assert network is not None
        tree.jump_to(network)
        await pilot.pause()

    assert await _snap(snap_compare, snapshot_engine, run_before)


async def test_help_screen_80x24(snapshot_engine: Path, snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        app = await _ready(pilot)
        await pilot.press("question_mark")
        await _until(pilot, lambda: isinstance(app.screen, HelpScreen))

    assert await _snap(snap_compare, snapshot_engine, run_before)


async def test_confirm_destroy_80x24(snapshot_engine: Path, snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        app = await _ready(pilot)
        tree = app.main_screen.inventory
        guest = tree.item("guest_vm", "zone1-net1-vm1")
        assert guest is not None
        tree.jump_to(guest)
        # A guest VM's details come from the tree's item, nothing is read from the engine.
        details = app.main_screen.details
        await _until(pilot, lambda: details.item is guest)
        await pilot.press("D")
        await _until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()

    assert await _snap(snap_compare, snapshot_engine, run_before)


async def test_jobs_screen_80x24(snapshot_engine: Path, snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        app = await _ready(pilot)
        app.run_command("jobs")
        await _until(pilot, lambda: isinstance(app.screen, JobsScreen) and app.screen.loaded)
        # The SSVM/CPVM destroy jobs name VMs whose ids raced; show the guest VM's jobs.
        await pilot.press("slash", *"zone1-net1-vm1", "enter")
        await pilot.pause()

    assert await _snap(snap_compare, snapshot_engine, run_before)


async def test_command_prompt_80x24(snapshot_engine: Path, snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        app = await _ready(pilot)
        await pilot.press("colon")
        await pilot.pause()
        app.screen.query_one(Input).cursor_blink = False
        await pilot.press("z", "o")

    assert await _snap(snap_compare, snapshot_engine, run_before)


async def test_templates_screen_80x24(
    snapshot_engine: Path, origin: _Origin, snap_compare: SnapCompare
) -> None:
    """Finished transfers only (no speed or ETA that varies): stored, refused, abandoned."""
    remote = await RemoteEngine.connect_unix(snapshot_engine)
    try:
        job = await remote.template_register("zone1", "ubuntu-22.04", url(origin), "RAW")
        assert (await remote.wait_job(job.id, 60)).state == "succeeded"
        job = await remote.template_register("zone1", "liar", url(origin), "QCOW2")
        assert (await remote.wait_job(job.id, 60)).state == "failed"
        origin.rate = 256 * 1024
        job = await remote.template_register("zone1", "stopped-early", url(origin), "RAW")
        while not await _transferring(remote, "stopped-early"):
            await asyncio.sleep(0.05)
        await remote.cancel_job(job.id)
        assert (await remote.wait_job(job.id, 30)).state == "cancelled"
    finally:
        await remote.close()

    async def run_before(pilot: Pilot[None]) -> None:
        app = await _ready(pilot)
        await pilot.press("t")
        await _until(pilot, lambda: isinstance(app.screen, TemplatesScreen) and app.screen.loaded)
        await pilot.pause(0.2)

    assert await _snap(snap_compare, snapshot_engine, run_before)


async def _transferring(api: RemoteEngine, name: str) -> bool:
    [row] = [t for t in await api.templates_list() if t["name"] == name]
    return bool(row["transfer"] and row["transfer"]["bytes_done"])


async def test_rule_editor_80x24(snapshot_engine: Path, snap_compare: SnapCompare) -> None:
    remote = await RemoteEngine.connect_unix(snapshot_engine)
    try:
        if not (await remote.router_show("zone1-net1"))["rules"]:
            pf = {"public_ip": "203.0.113.10", "private_ip": "10.1.101.10", "protocol": "tcp"}
            for ports in ((8080, 80), (2222, 22)):
                fields = pf | {"public_port": ports[0], "private_port": ports[1]}
                await remote.router_rule_add("zone1-net1", "port-forward", fields)
    finally:
        await remote.close()

    async def run_before(pilot: Pilot[None]) -> None:
        app = await _ready(pilot)
        app.run_command("rules zone1-net1")
        await _until(pilot, lambda: isinstance(app.screen, RouterRulesScreen))
        screen = app.screen
        assert isinstance(screen, RouterRulesScreen)
        await _until(pilot, lambda: screen.loaded and screen.rule_type == "port-forward")
        await pilot.pause(0.2)

    assert await _snap(snap_compare, snapshot_engine, run_before)

"""`:` and ctrl+p at 80x24 against a real lab: go anywhere by name, with completion."""

from __future__ import annotations

from typing import Any

from textual import events
from textual.command import CommandPalette

from backend.engine.core import Engine
from tui_app.app import SysvmApp
from tui_app.screens.command_prompt import CommandPromptScreen
from tui_app.screens.events import EventsScreen
from tui_app.screens.jobs import JobsScreen
from tui_app.screens.main import MainScreen
from tui_app.widgets.filter_input import FilterInput

from .driving import SIZE, loaded, shown_leaves, system_vms_of, toasts
from .rendered import screen_text


async def run_line(pilot: Any, app: SysvmApp, wait_until: Any, line: str) -> None:
    await pilot.press("colon")
    await wait_until(pilot, lambda: isinstance(app.screen, CommandPromptScreen))
    await pilot.press(*line, "enter")
    await pilot.pause(0.1)


async def test_colon_zone_goes_to_the_zone(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        await run_line(pilot, app, wait_until, "zone zone2")
        assert isinstance(app.screen, MainScreen)
        assert tree.selected is tree.item("zone", "zone2") and tree.has_focus


async def test_colon_name_jumps_to_any_object_opening_the_way(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        network = tree.item("network", "zone2-net2")
        assert network is not None and network.node is None, "not opened yet"
        await run_line(pilot, app, wait_until, "zone2-net2-vm3")
        assert tree.selected is tree.item("guest_vm", "zone2-net2-vm3")
        assert network.node.is_expanded
        line = tree.selected.node.line
        assert tree.scroll_offset.y <= line < tree.scroll_offset.y + tree.size.height, "in view"

        await run_line(pilot, app, wait_until, "no-such-thing")
        assert "no object named no-such-thing" in toasts(app)
        assert tree.selected is tree.item("guest_vm", "zone2-net2-vm3")


async def test_colon_router_net_goes_to_the_networks_router(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        network = tree.item("network", "zone1-net2")
        assert network is not None
        router = next(c for c in network.children if c.kind == "router")
        await run_line(pilot, app, wait_until, "router zone1-net2")
        assert tree.selected is router


async def test_colon_ssvm_and_cpvm_show_only_those(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvms = [
            v.name
            for z in ("zone1", "zone2")
            for v in system_vms_of(tree, z)
            if v.data["type"] == "ssvm"
        ]
        await run_line(pilot, app, wait_until, "ssvm")
        assert sorted(shown_leaves(tree)) == sorted(ssvms)
        box = app.query_one("#filter", FilterInput)
        assert box.value == "ssvm" and box.display, "the filter shows, so Esc clears it"
        await pilot.press("escape")
        await pilot.pause()
        assert len(shown_leaves(tree)) > len(ssvms)

        await run_line(pilot, app, wait_until, "router")
        assert shown_leaves(tree) and all(n.startswith("r-") for n in shown_leaves(tree))

        # Jumping to something the filter hides clears the filter.
        await run_line(pilot, app, wait_until, "zone1-host2")
        assert tree.selected is tree.item("host", "zone1-host2")
        assert not box.value


async def test_tab_completes_commands_and_names(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        await pilot.press("colon", "z", "o")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPromptScreen))
        prompt = app.screen
        assert isinstance(prompt, CommandPromptScreen)
        assert [c.text for c in prompt.completions][:3] == ["zone ", "zone1", "zone2"]
        assert "go to a zone" in screen_text(app)
        await pilot.press("tab")
        assert prompt.line == "zone "
        await pilot.press("z")
        await pilot.pause()
        assert [c.text for c in prompt.completions] == ["zone zone1", "zone zone2"]
        await pilot.press("down", "tab", "enter")
        await pilot.pause()
        assert tree.selected is tree.item("zone", "zone2")

        # Enter on a half-typed line with one completion takes it ("s-2" for "s-2-VM").
        ssvm = next(v for v in system_vms_of(tree, "zone1") if v.data["type"] == "ssvm")
        await pilot.press("colon", *ssvm.name[:3], "enter")
        await pilot.pause(0.1)
        assert tree.selected is ssvm


async def test_esc_cancels_the_prompt(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        before = tree.selected
        await pilot.press("colon", *"zone zone2")
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, MainScreen) and tree.selected is before


async def test_colon_jobs_events_and_q(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        await run_line(pilot, app, wait_until, "jobs")
        assert isinstance(app.screen, JobsScreen)
        await run_line(pilot, app, wait_until, "events")
        assert isinstance(app.screen, EventsScreen)
        assert len(app.screen_stack) == 2, "views replace each other over the main screen"
        await run_line(pilot, app, wait_until, "zone1")
        assert isinstance(app.screen, MainScreen), "a name goes back to the tree"
        await run_line(pilot, app, wait_until, "q")
        await wait_until(pilot, lambda: not app.is_running, what="the app to quit")


async def test_ctrl_p_palette_finds_any_object_by_name(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: CommandPalette.is_open(app), what="the palette")
        await pilot.press(*"zone2-net1-vm2")
        await wait_until(
            pilot, lambda: "guest VM in zone2" in screen_text(app), what="the palette's hit"
        )
        await pilot.press("enter")
        await wait_until(pilot, lambda: not CommandPalette.is_open(app))
        await pilot.pause(0.1)
        assert tree.selected is tree.item("guest_vm", "zone2-net1-vm2")

        # Views are there too.
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: CommandPalette.is_open(app))
        await pilot.press(*"Jobs")
        await wait_until(pilot, lambda: "recent jobs" in screen_text(app))
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen), what="jobs screen")


async def test_a_line_typed_at_once_after_colon_is_not_lost(lab: Engine, wait_until: Any) -> None:
    """As tmux send-keys or a fast typist delivers `:zone zone2⏎`: all keys before the prompt
    has even been drawn."""
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        keys = [("colon", ":"), *((c, c) for c in "zone"), ("space", " ")]
        keys += [*((c, c) for c in "zone2"), ("enter", "\r")]
        for key, char in keys:
            app._driver.send_message(events.Key(key, char))  # noqa: SLF001 - as the terminal
        await wait_until(pilot, lambda: tree.selected is tree.item("zone", "zone2"))
        assert isinstance(app.screen, MainScreen)

        # In an input, `:` is just a character.
        await pilot.press("slash", "colon")
        assert app.query_one("#filter", FilterInput).value == ":"
        assert isinstance(app.screen, MainScreen)

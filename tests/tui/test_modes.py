"""Read-only and ASCII modes, and keys remapped from config, at 80x24 against a real lab."""

from __future__ import annotations

from typing import Any

from textual.command import CommandPalette

from backend.engine.core import Engine
from tui_app.app import SysvmApp, binding_ids
from tui_app.screens.command_prompt import CommandPromptScreen
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.events import EventsScreen
from tui_app.screens.help import HelpScreen
from tui_app.screens.host_picker import HostPickerScreen
from tui_app.screens.job_details import JobDetailsScreen
from tui_app.screens.jobs import JobsScreen
from tui_app.screens.main import MainScreen

from .driving import SIZE, loaded, select, toasts, zone_vm
from .rendered import screen_text

MUTATING_KEYS = {"s", "r", "D", "m", "x"}


def footer_keys(app: SysvmApp) -> set[str]:
    return {b.binding.key for b in app.screen.active_bindings.values() if b.binding.show}


async def open_help(pilot: Any, app: SysvmApp, wait_until: Any) -> HelpScreen:
    await pilot.press("question_mark")
    await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
    assert isinstance(app.screen, HelpScreen)
    return app.screen


async def test_read_only_removes_every_mutating_key(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab, read_only=True)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = zone_vm(tree, "zone1", "ssvm")
        await select(pilot, tree, ssvm)
        assert not MUTATING_KEYS & footer_keys(app)
        assert "D Destroy" not in screen_text(app)

        help_screen = await open_help(pilot, app, wait_until)
        ids = {i for e in help_screen.entries for i in e.binding_ids}
        # Only `e` (router rules, viewed) and `c` (where the console is) are left of the object
        # keys: they change nothing.
        assert {i for i in ids if i.startswith("object.")} <= {
            "object.edit_rules",
            "object.console",
        }
        assert "Destroy" not in screen_text(app)
        await pilot.press("escape")

        jobs_before = await lab.jobs(limit=500)
        for key in ("D", "s", "r", "m", "x"):
            await pilot.press(key)
            await pilot.pause(0.05)
            assert isinstance(app.screen, MainScreen), f"{key} opened something"
        await pilot.pause(0.3)
        assert await lab.jobs(limit=500) == jobs_before, "no job was created"
        assert ssvm.state == "Running" and tree.item("system_vm", ssvm.name) is ssvm

        # The jobs screen has no cancel key either.
        app.run_command("jobs")
        await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen) and app.screen.loaded)
        assert "c" not in footer_keys(app)
        help_screen = await open_help(pilot, app, wait_until)
        assert "jobs.cancel" not in {i for e in help_screen.entries for i in e.binding_ids}


async def test_help_lists_object_actions_even_where_they_do_not_apply(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)  # the cursor is on a zone: no action applies
        assert not MUTATING_KEYS & footer_keys(app)
        help_screen = await open_help(pilot, app, wait_until)
        by_id = {i: e for e in help_screen.entries for i in e.binding_ids}
        assert by_id["object.destroy"].keys == ("D",)
        assert by_id["object.start_stop"].keys == ("s",)
        assert by_id["object.migrate"].section == "Objects"
        assert "Restart net" in screen_text(app)


def assert_ascii(app: SysvmApp, where: str) -> None:
    text = screen_text(app)
    bad = sorted({c for c in text if ord(c) > 126})
    assert not bad, f"{where}: non-ASCII {bad!r} on screen:\n{text}"


async def test_ascii_mode_draws_every_screen_in_ascii(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab, ascii=True)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = zone_vm(tree, "zone1", "ssvm")
        await select(pilot, tree, ssvm)
        await wait_until(
            pilot, lambda: (c := app.main_screen.details.cached(ssvm.name)) and c.details
        )
        await pilot.pause(0.2)
        assert_ascii(app, "main")
        assert str(ssvm.node.label).startswith("[R] ")
        await pilot.press("J", "J", "J")
        assert_ascii(app, "main, details scrolled")

        await pilot.press("D")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.pause()
        assert_ascii(app, "confirm")
        await pilot.press("escape")

        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, HostPickerScreen))
        await pilot.pause()
        assert_ascii(app, "host picker")
        await pilot.press("escape")

        await open_help(pilot, app, wait_until)
        assert_ascii(app, "help")
        await pilot.press("escape")

        await pilot.press("colon", "z")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPromptScreen))
        await pilot.pause()
        assert_ascii(app, "command prompt")
        await pilot.press("escape")

        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: CommandPalette.is_open(app))
        await pilot.press(*"zone1")
        await wait_until(pilot, lambda: "host in zone1" in screen_text(app))
        assert_ascii(app, "command palette")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not CommandPalette.is_open(app))

        app.run_command("no-such-object")  # a toast
        await wait_until(pilot, lambda: "no object named no-such-object" in screen_text(app))
        assert_ascii(app, "toast")

        app.run_command("jobs")
        await wait_until(pilot, lambda: isinstance(app.screen, JobsScreen) and app.screen.loaded)
        await pilot.pause()
        assert_ascii(app, "jobs")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobDetailsScreen))
        await wait_until(pilot, lambda: app.screen.job is not None)
        await pilot.pause()
        assert_ascii(app, "job details")
        await pilot.press("escape")

        app.run_command("events")
        await wait_until(pilot, lambda: isinstance(app.screen, EventsScreen) and app.screen.loaded)
        await pilot.pause()
        assert_ascii(app, "events")

        # A job in the activity strip draws its bar with # and -.
        app.run_command("zone1")
        await wait_until(pilot, lambda: isinstance(app.screen, MainScreen))
        job = await lab.lab_up(zones=6, hosts=2, networks=2, vms=2)
        strip = app.main_screen.strip
        await wait_until(pilot, lambda: job.id in strip.jobs, what="the lab.up row")
        await pilot.pause(0.1)
        assert_ascii(app, "activity strip")
        await lab.wait_job(job.id, 60)


async def test_keys_remapped_from_config(lab: Engine, wait_until: Any) -> None:
    keymap = {"object.destroy": "X", "main.filter": "f", "app.command": "semicolon"}
    app = SysvmApp(lab, keymap=keymap)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = zone_vm(tree, "zone2", "ssvm")
        await select(pilot, tree, ssvm)
        keys = footer_keys(app)
        assert {"X", "f", "semicolon"} <= keys and not {"D", "slash", "colon"} & keys
        await wait_until(pilot, lambda: "X Destroy" in screen_text(app), what="the footer")

        await pilot.press("D")  # the old key does nothing now
        await pilot.pause(0.1)
        assert isinstance(app.screen, MainScreen)
        await pilot.press("X")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert f"Destroy SSVM {ssvm.name} in zone2?" in screen_text(app)
        await pilot.press("escape")

        await pilot.press("semicolon")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPromptScreen))
        await pilot.press("escape")

        help_screen = await open_help(pilot, app, wait_until)
        by_id = {i: e for e in help_screen.entries for i in e.binding_ids}
        assert by_id["object.destroy"].keys == ("X",) and by_id["main.filter"].keys == ("f",)
        assert by_id["app.command"].keys == (";",)


async def test_an_unknown_binding_id_in_the_keymap_is_reported(
    lab: Engine, wait_until: Any
) -> None:
    assert {"object.destroy", "app.quit", "jobs.cancel", "tree.top"} <= binding_ids()
    app = SysvmApp(lab, keymap={"object.explode": "e", "app.quit": "Q"})
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        assert any("object.explode" in t for t in toasts(app))
        await pilot.press("q")
        assert app.is_running, "q is not quit any more"
        await pilot.press("Q")
        await wait_until(pilot, lambda: not app.is_running)

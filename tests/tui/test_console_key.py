"""`c` on a VM says where its console is (or why there is none); the footer keeps fitting 80x24
when an object has many keys (the general keys give way, never the object's)."""

from __future__ import annotations

from typing import Any

from backend.engine.core import Engine
from tui_app.app import SysvmApp
from tui_app.screens.console_info import ConsoleInfoScreen
from tui_app.screens.main import MainScreen

from .driving import SIZE, loaded, select, zone_vm
from .rendered import screen_lines, screen_text


async def test_c_shows_where_the_console_is_and_esc_closes_it(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab, read_only=True)  # looking, not changing: read-only keeps it
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = zone_vm(tree, "zone1", "ssvm")
        await select(pilot, tree, ssvm)
        await wait_until(pilot, lambda: "c Console" in screen_text(app), what="c in the footer")
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConsoleInfoScreen), what="modal")
        await pilot.pause()
        text = screen_text(app)
        assert f"Console of {ssvm.name}" in text
        assert "No console:" in text and "test-driver host" in text
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, MainScreen), what="back")


async def test_the_footer_fits_80_columns_on_a_router_keeping_its_own_keys(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        router = next(i for i in tree.objects() if i.kind == "router")
        await select(pilot, tree, router)
        want = ("s Start/stop", "D Destroy", "x Restart net", "e Rules", "c Console", "? Help")
        await wait_until(
            pilot, lambda: all(w in screen_lines(app)[-1] for w in want), what="router keys"
        )
        footer = screen_lines(app)[-1]
        assert len(footer.rstrip()) <= SIZE[0]
        assert "/ Filter" not in footer  # gave way; still bound, and listed by ?
        await pilot.press("slash")
        await wait_until(pilot, lambda: app.focused is not None and app.focused.id == "filter")

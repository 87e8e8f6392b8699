"""The console photographs itself: SVGs of the main and help screens, for `screenshots/`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from tui_app.app import SysvmApp
from tui_app.screens.help import HelpScreen
from tui_app.widgets.inventory_tree import InventoryTree

if TYPE_CHECKING:
    from backend.api.protocol import EngineAPI

SIZES = ((80, 24), (160, 48))


async def save_screenshots(
    api: EngineAPI, out_dir: Path, *, ascii: bool = False, read_only: bool = False
) -> list[Path]:
    """Run the console headless against `api` and save `main-80x24.svg`, `main-160x48.svg`
    and `help-80x24.svg` in `out_dir` (created if missing); returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for width, height in SIZES:
        app = SysvmApp(api, ascii=ascii, read_only=read_only)
        async with app.run_test(size=(width, height)) as pilot:
            tree = await _wait_for_inventory(app, pilot)
            _arrange(tree, show_networks=height >= 40)
            await pilot.pause(0.2)
            written.append(_save(app, out_dir, f"main-{width}x{height}.svg"))
            if (width, height) == SIZES[0]:
                await pilot.press("question_mark")
                await _wait_until(pilot, lambda a=app: isinstance(a.screen, HelpScreen))
                await pilot.pause(0.1)
                written.append(_save(app, out_dir, f"help-{width}x{height}.svg"))
    return written


def _arrange(tree: InventoryTree, *, show_networks: bool) -> None:
    """Open the first zone and its system VMs (and, on a tall screen, its first network), and
    put the cursor on its first system VM."""
    first = tree.zones[0] if tree.zones else None
    if first is None:
        return
    groups = {g.data.get("group"): g for g in first.children}
    tree.expand_path(*first.key)
    svms = groups.get("system_vms")
    if svms is not None:
        tree.expand_path(*svms.key)
    nets = groups.get("networks")
    if show_networks and nets is not None and nets.children:
        tree.expand_path(*nets.children[0].key)
    target = svms.children[0] if svms is not None and svms.children else first
    if target.node is not None:
        tree.last_line  # noqa: B018 - node lines must be current before moving the cursor
        tree.move_cursor(target.node)


def _save(app: SysvmApp, out_dir: Path, name: str) -> Path:
    app.save_screenshot(filename=name, path=str(out_dir))
    return out_dir / name


async def _wait_for_inventory(app: SysvmApp, pilot: object, timeout: float = 10.0) -> InventoryTree:
    """The inventory tree once the first snapshot is in (or after `timeout` seconds)."""
    tree = app.screen.query_one(InventoryTree)
    await _wait_until(pilot, lambda: tree.loaded or app.connected is False, timeout)
    return tree


async def _wait_until(pilot: object, condition: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:  # type: ignore[operator]
        await pilot.pause(0.05)  # type: ignore[attr-defined]


async def _main(out_dir: Path) -> None:
    """Build a fresh lab in a throw-away home and photograph the console against it."""
    import tempfile

    from backend.config import load_config
    from backend.engine.core import Engine

    home = Path(tempfile.mkdtemp(prefix="sysvm-screenshots-"))
    engine = Engine(load_config(home=home, env={"SYSVM_HOME": str(home)}))
    await engine.start()
    try:
        job = await engine.wait_job((await engine.lab_up()).id, 120)
        if job.state != "succeeded":
            raise SystemExit(f"the lab did not come up: {job.error}")
        for path in await save_screenshots(engine, out_dir):
            print(path)
    finally:
        await engine.stop()


if __name__ == "__main__":
    import sys

    asyncio.run(_main(Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")))

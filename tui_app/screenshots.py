"""The console photographs itself: SVGs of its main screens, for `screenshots/`.

`make screenshots` runs `_main`: a fresh lab in a throw-away home, a few jobs so the jobs
screen has something to show, template transfers from a throttled HTTP server on loopback
(so the templates screen shows them in progress), then the console headless at 80x24 and
160x48. Uptimes and times are left out (`clock=False`), so two runs differ only where the
lab's ids raced, and in the transfers' bytes and speeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.widgets import Input

from backend.router.rule_types import RuleType
from tui_app.app import SysvmApp
from tui_app.screens.command_prompt import CommandPromptScreen
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.help import HelpScreen
from tui_app.screens.jobs import JobsScreen
from tui_app.screens.router_rules import RouterRulesScreen
from tui_app.screens.templates import TemplatesScreen
from tui_app.widgets.inventory_tree import InventoryItem, InventoryTree

if TYPE_CHECKING:
    from backend.api.protocol import EngineAPI

SIZES = ((80, 24), (160, 48))
Shot = Callable[[SysvmApp, Any], Awaitable[None]]


async def save_screenshots(
    api: EngineAPI, out_dir: Path, *, ascii: bool = False, read_only: bool = False
) -> list[Path]:
    """Run the console headless against `api` and save, in `out_dir` (created if missing):
    main-80x24, main-160x48, help-80x24, jobs-80x24, templates-80x24 (with the transfers
    under way, if any), rule-editor-80x24 (the first network's router rules),
    confirm-destroy-80x24 and command-prompt-80x24 (.svg); returns the
    files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for width, height in SIZES:
        app = SysvmApp(api, ascii=ascii, read_only=read_only, clock=False)
        async with app.run_test(size=(width, height)) as pilot:
            tree = await _wait_for_inventory(app, pilot)
            _arrange(tree, show_networks=height >= 40)
            await _settle(app, pilot)
            written.append(_save(app, out_dir, f"main-{width}x{height}.svg"))
            if (width, height) != SIZES[0]:
                continue
            for name, shot in (
                ("help", _help),
                ("jobs", _jobs),
                ("templates", _templates),
                ("rule-editor", _rule_editor),
                ("confirm-destroy", _confirm_destroy),
                ("command-prompt", _command_prompt),
            ):
                if read_only and name == "confirm-destroy":
                    continue  # no destroy key in read-only mode
                await shot(app, pilot)
                await pilot.pause(0.2)
                written.append(_save(app, out_dir, f"{name}-{width}x{height}.svg"))
                app.back_to_main()
                await pilot.pause(0.1)
    return written


async def _help(app: SysvmApp, pilot: Any) -> None:
    await pilot.press("question_mark")
    await _wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))


async def _jobs(app: SysvmApp, pilot: Any) -> None:
    app.run_command("jobs")
    await _wait_until(pilot, lambda: isinstance(app.screen, JobsScreen) and app.screen.loaded)


async def _templates(app: SysvmApp, pilot: Any) -> None:
    """The templates screen, once the transfers have a speed and the first is well under way;
    the cursor on the first of them."""
    await pilot.press("t")
    await _wait_until(pilot, lambda: isinstance(app.screen, TemplatesScreen) and app.screen.loaded)
    screen = app.screen
    assert isinstance(screen, TemplatesScreen)

    def under_way() -> bool:
        lines = [line for line in screen.panel.lines if not line.waiting]
        return bool(lines) and all(x.rate > 0 for x in lines) and lines[0].percent >= 30

    await _wait_until(pilot, under_way, timeout=20)
    rows = [screen.templates[int(str(k.value))] for k in screen.table.rows]
    moving = [i for i, row in enumerate(rows) if row["state"].endswith("IN_PROGRESS")]
    if moving:
        screen.table.move_cursor(row=moving[0])


async def _rule_editor(app: SysvmApp, pilot: Any) -> None:
    """The router rules of the first network, on its port forwarding tab."""
    network = next(i.name for i in app.main_screen.inventory.objects() if i.kind == "network")
    app.run_command(f"rules {network}")
    await _wait_until(
        pilot, lambda: isinstance(app.screen, RouterRulesScreen) and app.screen.loaded
    )
    screen = app.screen
    assert isinstance(screen, RouterRulesScreen)
    await pilot.pause(0.1)
    screen.show_type(RuleType.PORT_FORWARD)
    await pilot.pause(0.6)  # the tab's underline slides over


async def _confirm_destroy(app: SysvmApp, pilot: Any) -> None:
    tree = app.main_screen.inventory
    target = _first_system_vm(tree)
    if target is not None:
        tree.jump_to(target)
        await pilot.pause()
    await pilot.press("D")
    await _wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))


async def _command_prompt(app: SysvmApp, pilot: Any) -> None:
    await pilot.press("colon")
    await _wait_until(pilot, lambda: isinstance(app.screen, CommandPromptScreen))
    app.screen.query_one(Input).cursor_blink = False
    await pilot.press("z", "o")


def _first_system_vm(tree: InventoryTree) -> InventoryItem | None:
    for zone in tree.zones:
        for group in zone.children:
            if group.data.get("group") == "system_vms" and group.children:
                return group.children[0]
    return None


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
    tree.jump_to(target)


async def _settle(app: SysvmApp, pilot: Any) -> None:
    """Let the details pane read what it shows before the picture is taken."""
    pane = app.main_screen.details
    item = pane.item
    if item is not None and item.kind in ("system_vm", "router"):
        await _wait_until(
            pilot,
            lambda: (c := pane.cached(item.name)) is not None and c.details is not None,
        )
    await pilot.pause(0.2)


def _save(app: SysvmApp, out_dir: Path, name: str) -> Path:
    app.save_screenshot(filename=name, path=str(out_dir))
    return out_dir / name


async def _wait_for_inventory(app: SysvmApp, pilot: object, timeout: float = 10.0) -> InventoryTree:
    """The inventory tree once the first snapshot is in (or after `timeout` seconds)."""
    await _wait_until(pilot, lambda: app.main_screen.is_mounted, timeout)
    tree = app.main_screen.inventory
    await _wait_until(pilot, lambda: tree.loaded or app.connected is False, timeout)
    return tree


async def _wait_until(pilot: object, condition: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:  # type: ignore[operator]
        await pilot.pause(0.05)  # type: ignore[attr-defined]


async def _some_history(api: EngineAPI) -> None:
    """A few real jobs, so the jobs screen shows more than the lab's own."""
    status = await api.status()
    zone = status["zones"][0]
    cpvm = next((v["name"] for v in zone["system_vms"] if v["type"] == "cpvm"), None)
    if cpvm is not None:
        await api.wait_job((await api.system_vm_action(cpvm, "reboot")).id, 30)
    guest = zone["networks"][0]["vms"][0]["name"] if zone["networks"] else None
    if guest is not None:
        for action in ("stop", "start"):
            await api.wait_job((await api.guest_vm_action(guest, action)).id, 30)


class _SlowImages(http.server.ThreadingHTTPServer):
    """Serves `/NAME.raw`, zero bytes on 127.0.0.1, of the size and at the rate given for NAME."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SlowImageHandler)
        self.images: dict[str, tuple[int, int]] = {}

    def url(self, name: str, size: int, rate: int) -> str:
        """Where NAME is served: `size` bytes at `rate` bytes a second."""
        self.images[f"/{name}.raw"] = (size, rate)
        return f"http://127.0.0.1:{self.server_address[1]}/{name}.raw"


class _SlowImageHandler(http.server.BaseHTTPRequestHandler):
    server: _SlowImages

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path not in self.server.images:
            self.send_error(404)
            return
        (size, rate), step = self.server.images[self.path], 64 * 1024
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            for off in range(0, size, step):
                self.wfile.write(bytes(min(step, size - off)))
                time.sleep(step / rate)
        except OSError:
            pass  # the transfer was cancelled, or the lab went down


@contextlib.contextmanager
def _serving(server: _SlowImages) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()


async def _some_transfers(api: EngineAPI, server: _SlowImages) -> None:
    """One template stored, one refused, two transfers under way (in the first zone)."""
    zone = (await api.status())["zones"][0]["name"]
    for name, fmt in (("alpine-3.20", "RAW"), ("windows-2022", "ISO")):  # zeros: not an ISO
        url = server.url(name, 48 * 2**20, 256 * 2**20)
        await api.wait_job((await api.template_register(zone, name, url, fmt)).id, 60)
    for name, rate in (("ubuntu-24.04-server", 12 * 2**20), ("debian-12-generic", 5 * 2**20)):
        await api.template_register(zone, name, server.url(name, 256 * 2**20, rate), "RAW")
    # Under way, so the console opens on transfers that already have a speed.
    while not all(
        (t["transfer"] or {}).get("bytes_done")
        for t in await api.templates_list(zone)
        if t["state"] in ("NOT_DOWNLOADED", "DOWNLOAD_IN_PROGRESS")
    ):
        await asyncio.sleep(0.1)


async def _some_rules(api: EngineAPI) -> None:
    """Rules on the first network's router: some applied, one added since (pending)."""
    net = (await api.status())["zones"][0]["networks"][0]
    public_ip = (await api.router_show(net["name"]))["public_ip"]
    guests = [vm["ip"] for vm in net["vms"] if vm["ip"]]
    web, db = guests[0], guests[-1]
    for rule_type, fields in (
        ("firewall-ingress", {"public_ip": public_ip, "protocol": "tcp", "start_port": 22,
                              "source_cidrs": ["198.51.100.0/24"]}),
        ("port-forward", {"public_ip": public_ip, "public_port": 8080, "private_ip": web,
                          "private_port": 80, "protocol": "tcp"}),
        ("port-forward", {"public_ip": public_ip, "public_port": 2222, "private_ip": web,
                          "private_port": 22, "protocol": "tcp", "open_firewall": False}),
        ("dhcp-entry", {"mac": "02:00:00:00:01:0a", "ip": web, "hostname": "web"}),
    ):  # fmt: skip
        await api.router_rule_add(net["name"], rule_type, fields)
    await api.wait_job((await api.router_apply(net["name"])).id, 60)
    await api.router_rule_add(
        net["name"],
        "port-forward",
        {"public_ip": public_ip, "public_start_port": 5432, "private_ip": db,
         "private_start_port": 5432, "protocol": "tcp"},
    )  # fmt: skip


async def _main(out_dir: Path) -> None:
    """Build a fresh lab in a throw-away home and photograph the console against it."""
    import shutil
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
        await _some_history(engine)
        await _some_rules(engine)
        slow = _SlowImages()
        with _serving(slow):
            await _some_transfers(engine, slow)
            for path in await save_screenshots(engine, out_dir):
                print(path)
    finally:
        await engine.stop()
        shutil.rmtree(home, ignore_errors=True)  # the lab's image store holds the transfers


if __name__ == "__main__":
    import sys

    asyncio.run(_main(Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")))

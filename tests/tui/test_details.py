"""The details pane at 80x24: what it shows of each kind of object, live, against a real lab."""

from __future__ import annotations

import io
import re
from typing import Any

from rich.console import Console

from backend.engine.core import Engine
from tui_app.app import SysvmApp
from tui_app.widgets.details_pane import DetailsPane
from tui_app.widgets.inventory_tree import InventoryItem

from .driving import SIZE, loaded, select, zone_vm
from .rendered import text_of

UPTIME = re.compile(r"uptime\s+\d+m \d\ds")


def pane_text(pane: DetailsPane, item: InventoryItem) -> str:
    """Everything the pane holds for `item`, at the pane's width (also what is scrolled off)."""
    console = Console(width=pane.content_width, file=io.StringIO(), record=True)
    console.print(pane.render_item(item))
    return console.export_text()


async def fetched(pilot: Any, pane: DetailsPane, name: str, wait_until: Any) -> None:
    await wait_until(
        pilot,
        lambda: (c := pane.cached(name)) is not None and c.details is not None,
        what=f"details of {name}",
    )
    await pilot.pause()


async def test_system_vm_details_show_placement_nics_boot_args_and_events(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        pane = app.main_screen.details
        ssvm = zone_vm(tree, "zone1", "ssvm")
        await select(pilot, tree, ssvm)
        await fetched(pilot, pane, ssvm.name, wait_until)
        vm = await lab.system_vm(ssvm.name)

        # What is on screen without scrolling: name, type, state, zone, host, control IP, uptime.
        visible = text_of(pane)
        for words in (ssvm.name, "SSVM", "Running", "zone1", vm["host"], vm["control_ip"]):
            assert words in visible, f"{words!r} not visible in the details pane"
        assert UPTIME.search(visible), visible
        assert "last error" in visible

        # The rest is there to scroll to: every NIC, the recent events, the boot args.
        full = pane_text(pane, ssvm)
        assert len(vm["nics"]) == 4
        for nic in vm["nics"]:
            for field in ("device", "role", "ip", "mac"):
                assert nic[field] in full, f"NIC {nic['device']} {field} missing"
        assert "Recent events" in full and "Running" in full.split("Recent events")[1]
        boot = full.split("Boot args")[1]
        assert f"name={ssvm.name}" in boot and "type=secstorage" in boot
        assert all(len(line) <= pane.content_width for line in full.splitlines())

        # J scrolls the pane; the tree keeps the focus and the cursor.
        assert pane.max_scroll_y > 0, "an SSVM's details are longer than the pane at 80x24"
        await pilot.press("J", "J")
        assert pane.scroll_y > 0
        assert tree.has_focus and tree.selected is ssvm


async def test_details_are_read_again_when_the_vm_changes(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        pane = app.main_screen.details
        cpvm = zone_vm(tree, "zone2", "cpvm")
        await select(pilot, tree, cpvm)
        await fetched(pilot, pane, cpvm.name, wait_until)
        fetches = pane.fetches
        entry = pane.cached(cpvm.name)
        assert entry is not None
        before = [e.id for e in entry.events]

        job = await lab.system_vm_action(cpvm.name, "reboot")
        assert (await lab.wait_job(job.id, 30)).state == "succeeded"
        await wait_until(pilot, lambda: pane.fetches > fetches, what="a fresh read")
        await wait_until(
            pilot,
            lambda: (
                [e.fields.get("state") for e in entry.events if e.id not in before][-1:]
                == ["Running"]
            ),
            what="the reboot's events",
        )
        await pilot.pause(0.3)
        recent = pane_text(pane, cpvm).split("Recent events")[1]
        assert "Stopping" in recent or "Starting" in recent
        assert len(entry.events) <= 5, "only the last five events are kept"


async def test_clock_off_leaves_uptime_and_times_out(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab, clock=False)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        pane = app.main_screen.details
        ssvm = zone_vm(tree, "zone1", "ssvm")
        await select(pilot, tree, ssvm)
        await fetched(pilot, pane, ssvm.name, wait_until)
        full = pane_text(pane, ssvm)
        assert "uptime" not in full
        assert not re.search(r"(?<![:\w])\d\d:\d\d:\d\d(?![:\w])", full), "no clock text"
        assert re.search(r"#\d+ ", full.split("Recent events")[1]), "events go by id instead"


async def test_network_details_show_cidr_router_and_vm_count(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        network = tree.item("network", "zone2-net1")
        assert network is not None
        router = next(c for c in network.children if c.kind == "router")
        await select(pilot, tree, network)
        text = text_of(app.main_screen.details)
        assert "zone2-net1" in text and "10.2.101.0/24" in text
        assert router.name in text and "Running" in text
        assert re.search(r"guest VMs\s+3\b", text), text

        # A stopped guest VM shows in the count.
        job = await lab.guest_vm_action("zone2-net1-vm2", "stop")
        assert (await lab.wait_job(job.id, 30)).state == "succeeded"
        await wait_until(
            pilot,
            lambda: "3 (2 running)" in text_of(app.main_screen.details),
            what="the count to follow",
        )


async def test_details_of_hosts_zones_and_guest_vms(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        pane = app.main_screen.details
        host = tree.item("host", "zone1-host1")
        assert host is not None
        await select(pilot, tree, host)
        text = text_of(pane)
        assert "Up" in text and "zone1" in text and "test:///" in text
        assert re.search(r"system VMs\s+\d", text)

        await select(pilot, tree, tree.zones[1])
        text = text_of(pane)
        assert re.search(r"hosts\s+2\b", text) and re.search(r"networks\s+2\b", text)
        assert re.search(r"guest VMs\s+6\b", text)

        guest = tree.item("guest_vm", "zone1-net2-vm3")
        assert guest is not None
        await select(pilot, tree, guest)
        text = text_of(pane)
        assert "guest VM" in text and guest.data["ip"] in text and "zone1-net2" in text


async def test_pane_drops_its_scrollbar_when_the_next_item_fits(
    lab: Engine, wait_until: Any
) -> None:
    """Textual re-decides scrollbars when a region changes, not when the text does: the SSVM's
    scrollbar must not stay over the short text of a guest VM (its gutter in the bar's colour)."""
    app = SysvmApp(lab, clock=False)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        pane = app.main_screen.details
        ssvm = zone_vm(tree, "zone1", "ssvm")
        await select(pilot, tree, ssvm)
        await fetched(pilot, pane, ssvm.name, wait_until)
        assert len(pane.text_lines) > pane.scrollable_content_region.height
        assert pane.show_vertical_scrollbar

        guest = tree.item("guest_vm", "zone1-net1-vm1")
        assert guest is not None
        await select(pilot, tree, guest)
        await pilot.pause()
        assert len(pane.text_lines) < pane.scrollable_content_region.height
        assert not pane.show_vertical_scrollbar
        assert not pane.show_horizontal_scrollbar

        await select(pilot, tree, ssvm)
        await pilot.pause()
        assert pane.show_vertical_scrollbar


async def test_narrowed_pane_has_no_sideways_scrollbar(lab: Engine, wait_until: Any) -> None:
    """Text drawn at the old, wider width until the repaint must not leave a horizontal bar
    across the pane's last row (it did when the narrowing came in one layout pass, as when
    the console starts at 80 columns and the first jobs arrive early)."""
    app = SysvmApp(lab, clock=False)
    async with app.run_test(size=(130, 30)) as pilot:
        tree = await loaded(pilot, app, wait_until)
        pane = app.main_screen.details
        guest = tree.item("guest_vm", "zone1-net1-vm1")
        assert guest is not None
        await select(pilot, tree, guest)
        wide = pane.scrollable_content_region.width
        await pilot.resize_terminal(*SIZE)
        await wait_until(
            pilot, lambda: pane.scrollable_content_region.width < wide, what="the narrower pane"
        )
        await pilot.pause()
        assert pane.virtual_size.width == pane.scrollable_content_region.width
        assert not pane.show_horizontal_scrollbar
        assert not pane.show_vertical_scrollbar

"""The main screen at 80x24, driven by Pilot against a real engine and lab (no fake API)."""

from __future__ import annotations

from typing import Any

from textual.widgets import Static

from backend.engine.core import Engine
from backend.errors import EngineUnavailable
from tui_app.app import SysvmApp
from tui_app.screens.help import HelpScreen
from tui_app.screens.main import MainScreen
from tui_app.widgets.activity_strip import ActivityStrip, JobRow
from tui_app.widgets.filter_input import FilterInput

from .driving import SIZE, all_leaves, inventory, loaded, shown_leaves, system_vms_of
from .rendered import text_of


async def system_vm_id(engine: Engine, name: str) -> int:
    """The engine id of a system VM, read back from its events (the status tree has names only)."""
    for event in await engine.events(entity="system_vm", limit=1000):
        if event.name == name:
            return event.entity_id
    raise AssertionError(f"no event names system VM {name}")


async def test_tree_shows_both_zones_with_their_ssvm_and_cpvm_running(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        assert [z.name for z in tree.zones] == ["zone1", "zone2"]
        for zone in ("zone1", "zone2"):
            vms = {vm.data["type"]: vm for vm in system_vms_of(tree, zone)}
            assert set(vms) == {"ssvm", "cpvm"}
            for vm in vms.values():
                assert vm.state == "Running"
                assert vm.node is not None and vm.node.parent is not None
                assert vm.node.parent.is_expanded, "system VMs are shown without a keypress"
                label = str(vm.node.label)
                assert label.startswith("● ") and vm.name in label and "Running" in label
        # The cursor starts on the first zone and the details pane describes it.
        assert tree.cursor_node is tree.zones[0].node
        details = app.query_one("#details")
        assert "zone1" in text_of(details)
        assert not app.query_one("#banner").has_class("-shown")


async def test_cursor_keys_move_and_details_follow(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = next(v for v in system_vms_of(tree, "zone1") if v.data["type"] == "ssvm")
        await pilot.press("j", "j", "j")  # zone1 -> Hosts -> System VMs -> first system VM
        assert tree.cursor_node is system_vms_of(tree, "zone1")[0].node
        await pilot.press("k")
        assert tree.cursor_node is tree.item("group", "zone1/system_vms").node
        await pilot.press("G")
        assert tree.cursor_line == tree.last_line
        await pilot.press("g")
        assert tree.cursor_line == 0
        tree.move_cursor(ssvm.node)
        await pilot.pause()
        text = text_of(app.query_one("#details"))
        assert ssvm.name in text and ssvm.data["control_ip"] in text and "SSVM" in text


async def test_slash_filter_narrows_the_tree_and_esc_restores_it(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        everything = shown_leaves(tree)
        zone2_before = tree.zones[1].node

        await pilot.press("slash")
        box = app.query_one("#filter", FilterInput)
        assert box.has_focus and box.display
        await pilot.press(*"cpvm")
        await pilot.pause()
        cpvms = [
            v.name
            for z in ("zone1", "zone2")
            for v in system_vms_of(tree, z)
            if v.data["type"] == "cpvm"
        ]
        assert sorted(shown_leaves(tree)) == sorted(cpvms)
        assert tree.cursor_node is not None and tree.cursor_node.data.name == cpvms[0]

        # By address: only zone2's second network and what is in it.
        await pilot.press(*["backspace"] * 4, *"10.2.102.")
        await pilot.pause()
        shown = shown_leaves(tree)
        assert shown and all(tree.item("system_vm", n) or n.startswith("zone2-net2") for n in shown)
        assert not any(n.startswith("zone1") for n in shown)

        # A leading ! inverts: everything except what matches.
        await pilot.press("ctrl+u", *"!cpvm")
        await pilot.pause()
        assert sorted(shown_leaves(tree)) == sorted(set(all_leaves(tree)) - set(cpvms))

        await pilot.press("escape")
        await pilot.pause()
        assert box.value == "" and not box.display
        assert sorted(shown_leaves(tree)) == sorted(everything)
        assert tree.has_focus
        assert tree.zones[1].node is zone2_before, "zones that stayed shown keep their node"


async def test_question_mark_opens_help_generated_from_live_bindings(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help screen")
        help_screen = app.screen
        assert isinstance(help_screen, HelpScreen)
        by_id = {i: e for e in help_screen.entries for i in e.binding_ids}
        assert by_id["main.filter"].keys == ("/",)
        assert {"↓", "j"} <= set(by_id["tree.cursor_down_vi"].keys)
        assert by_id["tree.top"].keys == ("g", "home")
        assert by_id["tree.bottom"].keys == ("G", "end")
        assert by_id["app.quit"].keys[0] == "q"
        assert by_id["app.help"].keys == ("?",)
        text = text_of(help_screen.query_one("#help-table", Static))
        assert "Filter" in text and "Quit" in text and "Top" in text
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)

        # Remapped keys show up as they really are.
        app.set_keymap({"main.filter": "f"})
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help screen")
        remapped = {i: e for e in app.screen.entries for i in e.binding_ids}  # type: ignore[attr-defined]
        assert remapped["main.filter"].keys == ("f",)
        await pilot.press("question_mark")
        assert isinstance(app.screen, MainScreen)
        await pilot.press("f")
        assert app.query_one("#filter", FilterInput).has_focus


async def test_router_stop_relabels_its_node_in_place(lab: Engine, wait_until: Any) -> None:
    """Real state changes (guest VMs, then their router, stopped through EngineAPI) patch
    labels in place: same nodes, same ids, selection and expansion kept."""
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        network = tree.item("network", "zone1-net1")
        assert network is not None
        router = next(c for c in network.children if c.kind == "router")
        guests = [c for c in network.children if c.kind == "guest_vm"]
        tree.expand_path(*router.key)
        await pilot.pause()
        tree.move_cursor(router.node)
        await pilot.pause()
        node, node_id = router.node, router.node.id
        before = {key: item.node for key, item in tree._items.items()}  # noqa: SLF001
        batches = tree.batches

        # With no guest VM running, the reconciler leaves a stopped router stopped.
        for guest in guests:
            job = await lab.guest_vm_action(guest.name, "stop")
            assert (await lab.wait_job(job.id, 30)).state == "succeeded"
        job = await lab.system_vm_action(router.name, "stop")
        assert (await lab.wait_job(job.id, 30)).state == "succeeded"
        await wait_until(pilot, lambda: "Stopped" in str(node.label), what="router label Stopped")
        await wait_until(pilot, lambda: all(g.state == "Stopped" for g in guests), what="guests")

        assert tree.node_for("system_vm", router.name) is node and node.id == node_id
        assert tree.get_node_by_id(node_id) is node
        assert all(tree._items[k].node is n for k, n in before.items())  # noqa: SLF001
        assert tree.cursor_node is node, "selection survives the update"
        assert network.node.is_expanded, "expansion survives the update"
        assert tree.batches > batches
        assert str(node.label).startswith("○ ")
        details = app.query_one("#details")
        await wait_until(pilot, lambda: "Stopped" in text_of(details), what="details to follow")


async def test_system_vm_event_relabels_only_that_node(lab: Engine, wait_until: Any) -> None:
    # A published event stands for a real SSVM stop: the zone reconciler restarts a really
    # stopped SSVM at once, so this keeps the test deterministic; the tree cannot tell.
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = next(v for v in system_vms_of(tree, "zone2") if v.data["type"] == "ssvm")
        cpvm = next(v for v in system_vms_of(tree, "zone2") if v.data["type"] == "cpvm")
        node, node_id = ssvm.node, ssvm.node.id
        cpvm_label = cpvm.node.label
        zone_nodes = [z.node for z in tree.zones]

        lab.bus.publish(
            "system_vm",
            await system_vm_id(lab, ssvm.name),
            "updated",
            ssvm.name,
            state="Stopped",
            type="ssvm",
        )
        await wait_until(pilot, lambda: "Stopped" in str(node.label), what="SSVM label Stopped")

        assert tree.node_for("system_vm", ssvm.name) is node and node.id == node_id
        assert cpvm.node.label is cpvm_label, "other nodes are not relabelled"
        assert [z.node for z in tree.zones] == zone_nodes
        title = app.query_one("#title-bar")
        await wait_until(pilot, lambda: "1 VM not running" in text_of(title), what="title bar")


async def test_a_burst_of_events_is_applied_in_a_few_frames(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        cpvm = system_vms_of(tree, "zone1")[1]
        vm_id = await system_vm_id(lab, cpvm.name)
        batches, applied = tree.batches, tree.applied_events
        states = ["Stopping", "Stopped", "Starting", "Running"]
        for i in range(2000):
            lab.bus.publish("system_vm", vm_id, "updated", cpvm.name, state=states[i % 4])
        lab.bus.publish("system_vm", vm_id, "updated", cpvm.name, state="Error")
        await wait_until(pilot, lambda: tree.applied_events >= applied + 2001, what="the burst")
        assert tree.batches - batches <= 3, "events are coalesced, not applied one by one"
        assert cpvm.state == "Error" and str(cpvm.node.label).startswith("✖ ")


async def test_new_guest_vm_gets_one_new_node(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        tree.expand_path("network", "zone1-net2")
        await pilot.pause()
        before = {key: item.node for key, item in tree._items.items()}  # noqa: SLF001
        job = await lab.guest_vm_deploy("zone1-net2", "zone1-net2-extra")
        assert (await lab.wait_job(job.id, 30)).state == "succeeded"
        await wait_until(pilot, lambda: tree.node_for("guest_vm", "zone1-net2-extra") is not None)
        new = tree.item("guest_vm", "zone1-net2-extra")
        assert new is not None and new.parent is tree.item("network", "zone1-net2")
        await wait_until(pilot, lambda: new.state == "Running", what="the new VM to run")
        assert all(tree._items[k].node is n for k, n in before.items())  # noqa: SLF001
        assert "Running" in str(new.node.label)
        assert app.main_screen.status_rereads == 0, "placed from its event alone"


async def test_nodes_are_made_when_their_parent_is_first_opened(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        network = tree.item("network", "zone2-net1")
        assert network is not None and network.node is None, "under a closed Networks group"
        assert all(c.node is None for c in network.children)

        # A VM deployed there meanwhile is known to the tree, without a node yet.
        job = await lab.guest_vm_deploy("zone2-net1", "zone2-net1-late")
        assert (await lab.wait_job(job.id, 30)).state == "succeeded"
        await wait_until(pilot, lambda: tree.item("guest_vm", "zone2-net1-late") is not None)
        late = tree.item("guest_vm", "zone2-net1-late")
        assert late is not None and late.node is None

        # Opening the group, then the network (Enter), makes their nodes, in order.
        group = tree.item("group", "zone2/networks")
        assert group is not None and group.node is not None
        tree.move_cursor(group.node)
        await pilot.press("enter")
        assert network.node is not None and not network.node.is_expanded
        tree.move_cursor(network.node)
        await pilot.press("enter")
        await pilot.pause()
        names = [n.data.name for n in network.node.children]
        assert names == [c.name for c in network.children]
        assert names[0].startswith("r-") and names[-1] == "zone2-net1-late"
        await wait_until(pilot, lambda: "Running" in str(late.node.label))


async def test_running_job_shows_in_the_activity_strip(
    console_engine: Engine, wait_until: Any
) -> None:
    app = SysvmApp(console_engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: inventory(app).loaded, what="the first snapshot")
        strip = app.query_one("#activity", ActivityStrip)
        assert app.query_one("#no-jobs").display
        await wait_until(
            pilot,
            lambda: app.query_one("#empty-hint").has_class("-shown"),
            what="the empty-cloud hint",
        )
        job = await console_engine.lab_up(zones=1, hosts=1, networks=1, vms=1)
        await wait_until(pilot, lambda: job.id in strip.jobs, what="the lab.up job row")
        await pilot.pause(0.1)
        row = app.query_one(f"#job-{job.id}", JobRow)
        assert row.kind == "lab.up"
        await console_engine.wait_job(job.id, 60)
        await wait_until(pilot, lambda: not strip.jobs, what="the job to leave the strip")
        await pilot.pause(0.1)
        assert app.query_one("#no-jobs").display
        assert [z.name for z in inventory(app).zones] == ["zone1"]
        assert not app.query_one("#empty-hint").has_class("-shown")


async def test_engine_going_away_shows_the_banner_not_a_traceback(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    app.reconnect_seconds = 60
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        await lab.bus.stop()  # the event stream ends, as when the engine exits
        banner = app.query_one("#banner", Static)
        await wait_until(pilot, lambda: banner.has_class("-shown"), what="the banner")
        assert "engine disconnected — reconnecting…" in text_of(banner)
        assert app.is_running
        assert "Traceback" not in app.export_screenshot()


class FlakyEngine:
    """The real engine behind a link that drops: status() raises EngineUnavailable once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.failures_left = 1

    async def status(self) -> Any:
        if self.failures_left:
            self.failures_left -= 1
            raise EngineUnavailable("no engine answers on /tmp/sysvm.sock")
        return await self.engine.status()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


async def test_engine_unavailable_shows_banner_then_reconnects(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(FlakyEngine(lab))  # type: ignore[arg-type]
    app.reconnect_seconds = 0.2
    async with app.run_test(size=SIZE) as pilot:
        banner = app.query_one("#banner", Static)
        await wait_until(pilot, lambda: banner.has_class("-shown"), what="the banner")
        await wait_until(pilot, lambda: inventory(app).loaded, what="the reconnect")
        await wait_until(pilot, lambda: not banner.has_class("-shown"), what="banner hidden")
        assert [z.name for z in inventory(app).zones] == ["zone1", "zone2"]


async def test_ascii_mode_uses_no_glyphs(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab, ascii=True, read_only=True)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = system_vms_of(tree, "zone1")[0]
        assert str(ssvm.node.label).startswith("[R] ")
        assert tree.ICON_NODE == "+ " and tree.ICON_NODE_EXPANDED == "- "
        shot = app.export_screenshot()
        for glyph in ("●", "○", "◐", "✖", "▶", "▼", "├", "└", "│", "━"):
            assert glyph not in shot, f"{glyph!r} drawn in ASCII mode"
        assert "read-only" in text_of(app.query_one("#title-bar"))


async def test_lab_down_empties_the_tree_and_shows_the_hint(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        job = await lab.lab_down()
        assert (await lab.wait_job(job.id, 60)).state == "succeeded"
        await wait_until(pilot, lambda: not tree.zones, what="the zones to go")
        await pilot.pause(0.1)
        assert not tree.root.children
        assert app.query_one("#empty-hint").has_class("-shown")
        assert "Select an object" in text_of(app.query_one("#details"))


async def test_filter_stays_live_as_states_change(lab: Engine, wait_until: Any) -> None:
    # Published events stand for real state changes (the reconciler would undo a real stop).
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        await pilot.press("slash", *"stopped", "enter")
        await pilot.pause()
        assert shown_leaves(tree) == []
        assert tree.has_focus and app.query_one("#filter", FilterInput).display

        cpvm = next(v for v in system_vms_of(tree, "zone2") if v.data["type"] == "cpvm")
        vm_id = await system_vm_id(lab, cpvm.name)
        lab.bus.publish("system_vm", vm_id, "updated", cpvm.name, state="Stopped")
        await wait_until(pilot, lambda: shown_leaves(tree) == [cpvm.name], what="CPVM to match")
        lab.bus.publish("system_vm", vm_id, "updated", cpvm.name, state="Running")
        await wait_until(pilot, lambda: shown_leaves(tree) == [], what="CPVM to stop matching")

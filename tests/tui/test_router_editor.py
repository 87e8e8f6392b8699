"""The router rules editor at 80x24 against a real engine and lab: open it with `e`, add a rule in
the form, see the engine's field errors beside the field (nothing stored), delete after a
confirmation naming the rule, diff, apply with commit-confirm, drift shown and cleared,
read-only mode without the mutating keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.command import CommandPalette

from backend.engine.core import Engine
from tui_app.app import SysvmApp
from tui_app.command_line import ObjectName, complete
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.help import HelpScreen
from tui_app.screens.main import MainScreen
from tui_app.screens.router_diff import RouterDiffScreen
from tui_app.screens.router_rules import RouterRulesScreen
from tui_app.screens.rule_form import RuleFormScreen

from .driving import SIZE, loaded, select, toasts
from .rendered import screen_text

NET = "zone1-net1"
PF = {
    "public_ip": "203.0.113.10",
    "public_port": 8080,
    "private_ip": "10.1.101.10",
    "private_port": 80,
    "protocol": "tcp",
}


@pytest.fixture(autouse=True)
def router_state_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The lab's guest host keeps each router's state under TMPDIR: here, so a test can
    tamper with what a router has live (as drift would)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


@pytest.fixture
async def net_lab(console_engine: Engine) -> Engine:
    """One zone, one network with its router and one guest VM, all running."""
    job = await console_engine.lab_up(zones=1, hosts=1, networks=1, vms=1)
    job = await console_engine.wait_job(job.id, 60)
    assert job.state == "succeeded", job.error
    return console_engine


def footer_keys(app: SysvmApp) -> set[str]:
    return {
        b.binding.key for b in app.screen.active_bindings.values() if b.binding.show and b.enabled
    }


async def open_editor(pilot: Any, app: SysvmApp, wait_until: Any) -> RouterRulesScreen:
    """`e` on the network in the tree; the editor is up once it has read the rules."""
    tree = await loaded(pilot, app, wait_until)
    network = tree.item("network", NET)
    assert network is not None
    await select(pilot, tree, network)
    await pilot.press("e")
    await wait_until(pilot, lambda: isinstance(app.screen, RouterRulesScreen), what="editor")
    screen = app.screen
    assert isinstance(screen, RouterRulesScreen)
    await wait_until(pilot, lambda: screen.loaded, what="the rules")
    return screen


async def to_port_forwarding(pilot: Any, screen: RouterRulesScreen, wait_until: Any) -> None:
    while screen.rule_type.value != "port-forward":
        await pilot.press("right_square_bracket")
        await pilot.pause()
    await wait_until(pilot, lambda: "Port fwd" in screen_text(screen.app), what="the tab")


async def rules(engine: Engine) -> list[dict[str, Any]]:
    return list((await engine.router_show(NET))["rules"])


async def test_e_opens_the_editor_and_a_port_forward_added_in_the_form_shows_in_the_table(
    net_lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_editor(pilot, app, wait_until)
        assert f"Router rules · {NET}" in screen_text(app)
        await to_port_forwarding(pilot, screen, wait_until)
        await pilot.press("a")
        await wait_until(pilot, lambda: isinstance(app.screen, RuleFormScreen), what="the form")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        assert form.typed()["public_ip"] == "203.0.113.10", "the network's public IP is offered"
        # public start port, (end port left empty), private IP, private start port, protocol
        await pilot.press("tab", *"8080", "tab", "tab", *"10.1.101.10", "tab", *"80")
        await pilot.press("tab", "tab", "enter", "down", "enter")
        await wait_until(pilot, lambda: form.typed()["protocol"] == "tcp", what="tcp chosen")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is screen, what="the form to close")
        await wait_until(pilot, lambda: len(screen.rules) == 1, what="the rule in the table")
        text = screen_text(app)
        assert "203.0.113.10" in text and "8080" in text and "10.1.101.10" in text
        assert "Port fwd 1" in text, "the tab counts its rules"
        [stored] = await rules(net_lab)
        assert stored["public_start_port"] == 8080 and stored["private_start_port"] == 80
        assert "changes not applied" in text


async def test_a_bad_field_shows_the_engines_error_beside_it_and_nothing_is_stored(
    net_lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_editor(pilot, app, wait_until)
        await to_port_forwarding(pilot, screen, wait_until)
        await pilot.press("a")
        await wait_until(pilot, lambda: isinstance(app.screen, RuleFormScreen), what="the form")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        await pilot.press("tab", *"8080", "tab", "tab", *"192.0.2.5", "tab", *"80", "enter")
        await wait_until(pilot, lambda: "private_ip" in form.errors, what="the field's error")
        text = screen_text(app)
        assert "Private IP: 192.0.2.5 is outside the network" in text  # under its row
        assert form.errors["private_ip"] == "192.0.2.5 is outside the network 10.1.101.0/24"
        assert app.screen is form, "the form stays open to fix the field"
        assert await rules(net_lab) == []
        # fixed, it goes through; a port out of range is named next
        await pilot.press("ctrl+u", *"10.1.101.10", "shift+tab", "shift+tab")
        await pilot.press("ctrl+u", *"99999", "enter")
        await wait_until(pilot, lambda: "public_start_port" in form.errors, what="port error")
        assert "Public start port:" in screen_text(app)
        assert "private_ip" not in form.errors, "the old error is gone"
        assert await rules(net_lab) == []
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is screen, what="the form to close")
        assert await rules(net_lab) == []


async def test_edit_keeps_the_rule_when_the_change_is_refused(
    net_lab: Engine, wait_until: Any
) -> None:
    added = await net_lab.router_rule_add(NET, "port-forward", PF)
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_editor(pilot, app, wait_until)
        await to_port_forwarding(pilot, screen, wait_until)
        await wait_until(pilot, lambda: screen.selected_rule is not None, what="the row")
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, RuleFormScreen), what="the form")
        form = app.screen
        assert isinstance(form, RuleFormScreen)
        assert form.typed()["public_start_port"] == "8080" and form.rule_id == added["id"]
        form.query_one("#f-private-ip").focus()
        await pilot.press("ctrl+u", *"10.9.9.9", "enter")
        await wait_until(pilot, lambda: "private_ip" in form.errors, what="the field's error")
        [kept] = await rules(net_lab)
        assert kept == added, "a refused change leaves the old rule as it was"
        await pilot.press("ctrl+u", *"10.1.101.11", "enter")
        await wait_until(pilot, lambda: app.screen is screen, what="the form to close")
        [changed] = await rules(net_lab)
        assert changed["id"] == added["id"] and changed["private_ip"] == "10.1.101.11"
        await wait_until(pilot, lambda: "10.1.101.11" in screen_text(app), what="the new row")


async def test_delete_asks_naming_the_rule_then_removes_it(
    net_lab: Engine, wait_until: Any
) -> None:
    added = await net_lab.router_rule_add(NET, "port-forward", PF)
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        app.run_command(f"rules {NET}")
        await wait_until(pilot, lambda: isinstance(app.screen, RouterRulesScreen), what="editor")
        screen = app.screen
        assert isinstance(screen, RouterRulesScreen)
        await wait_until(pilot, lambda: screen.loaded, what="the rules")
        await to_port_forwarding(pilot, screen, wait_until)
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        question = f"Delete port-forward {added['id']}: 203.0.113.10:8080 -> 10.1.101.10:80/tcp?"
        assert isinstance(app.screen, ConfirmScreen) and app.screen.question == question
        assert f"Delete port-forward {added['id']}: 203.0.113.10:8080" in screen_text(app)
        await pilot.press("n")
        await wait_until(pilot, lambda: app.screen is screen)
        assert len(await rules(net_lab)) == 1, "n keeps it"
        await pilot.press("delete")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not screen.rules, what="the row to go")
        assert await rules(net_lab) == []
        assert "No port forwarding rules. Press a to add one." in screen_text(app)


def _tamper(tmp: Path, router: str) -> None:
    """Put a foreign rule into what the router has live (its recorded ruleset)."""
    [tables] = list(tmp.glob(f"sysvm-routers-*/{router}/applier/tables.rules"))
    text = tables.read_text()
    tables.write_text(text.replace("COMMIT", "-A SYSVM_INPUT -j ACCEPT\nCOMMIT", 1))


async def test_diff_then_apply_completes_and_drift_shows_on_the_tree_and_clears(
    net_lab: Engine, wait_until: Any, router_state_in_tmp: Path
) -> None:
    added = await net_lab.router_rule_add(NET, "port-forward", PF)
    router = (await net_lab.router_show(NET))["router"]
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_editor(pilot, app, wait_until)
        assert "changes not applied (nothing applied yet)" in screen_text(app)
        await pilot.press("D")
        await wait_until(pilot, lambda: isinstance(app.screen, RouterDiffScreen), what="diff")
        diff = app.screen
        assert isinstance(diff, RouterDiffScreen)
        await wait_until(pilot, lambda: diff.diff is not None, what="the diff")
        text = screen_text(app)
        assert f"+ port-forward {added['id']}: 203.0.113.10:8080 -> 10.1.101.10:80/tcp" in text
        assert "desired (stored) rules vs nothing applied yet" in text
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is screen)

        async def apply(version: int) -> None:
            await pilot.press("A")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="ask")
            assert f"as version {version}?" in screen_text(app)
            assert "rolls back to version" in screen_text(app)
            await pilot.press("enter")
            await wait_until(
                pilot,
                lambda: screen.job.get("state") == "succeeded" and "result" in screen.job,
                timeout=30,
                what=f"apply of version {version}",
            )
            await wait_until(
                pilot,
                lambda: f"version {version} applied, live matches it" in screen_text(app),
                what="in sync",
            )
            assert f"version {version} applied and confirmed" in screen_text(app)

        await apply(1)
        assert (await net_lab.router_show(NET))["drift"] is False

        # Something changes the router behind the engine's back: `c` reads it back.
        _tamper(router_state_in_tmp, router)
        await pilot.press("c")
        await wait_until(
            pilot,
            lambda: (
                "live rules differ from desired (drift) — press A to reapply" in screen_text(app)
            ),
            what="drift in words",
        )
        node = app.main_screen.inventory.item("system_vm", router)
        assert node is not None
        await wait_until(pilot, lambda: node.data.get("drift") is True, what="drift on the tree")
        assert "drift" in str(app.main_screen.inventory.render_item(node))

        await apply(2)
        await wait_until(pilot, lambda: node.data.get("drift") is False, what="drift cleared")
        assert "drift" not in str(app.main_screen.inventory.render_item(node))
        assert (await net_lab.router_check(NET))["drift"] is False

        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, MainScreen), what="back")


async def test_read_only_hides_the_keys_that_change_rules(net_lab: Engine, wait_until: Any) -> None:
    await net_lab.router_rule_add(NET, "port-forward", PF)
    app = SysvmApp(net_lab, read_only=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_editor(pilot, app, wait_until)
        await to_port_forwarding(pilot, screen, wait_until)
        await wait_until(pilot, lambda: screen.selected_rule is not None, what="the row")
        keys = footer_keys(app)
        assert {"a", "E", "d,delete", "A"}.isdisjoint(keys), keys
        assert {"D", "c"} <= keys
        for key in ("a", "E", "d", "enter", "A"):
            await pilot.press(key)
            await pilot.pause(0.1)
            assert app.screen is screen, f"{key} did something in read-only mode"
        assert len(await rules(net_lab)) == 1


async def test_help_lists_the_editor_keys_and_colon_rules_completes_networks(
    net_lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        await open_editor(pilot, app, wait_until)
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        text = screen_text(app)
        for words in ("Add", "Edit", "Delete", "Diff", "Apply", "Check"):
            assert words in text, words
    objects = [ObjectName(NET, "network", "network", "zone1"), ObjectName("zone1", "zone", "", "")]
    assert [c.text for c in complete("rules z", objects)] == [f"rules {NET}"]
    assert any(c.text == "rules " for c in complete("ru", objects))


async def test_e_on_the_router_node_opens_its_networks_rules_and_esc_goes_back(
    net_lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        router = app.main_screen.find_router(NET)
        assert router is not None
        await select(pilot, tree, router)
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, RouterRulesScreen), what="editor")
        assert isinstance(app.screen, RouterRulesScreen) and app.screen.network == NET
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, MainScreen), what="back")
        assert tree.selected is router, "the cursor is where it was"
        app.run_command("rules no-such-net")
        await pilot.pause(0.2)
        assert isinstance(app.screen, MainScreen)
        assert any("no network no-such-net" in t for t in toasts(app))


async def test_an_apply_the_router_cannot_take_fails_in_words(
    net_lab: Engine, wait_until: Any
) -> None:
    router = (await net_lab.router_show(NET))["router"]
    job = await net_lab.wait_job((await net_lab.system_vm_action(router, "stop")).id, 30)
    assert job.state == "succeeded", job.error
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_editor(pilot, app, wait_until)
        assert f"router {router} is Stopped: A applies once it runs again" in screen_text(app)
        await pilot.press("A")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="ask")
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.job.get("state") == "failed", what="the failure")
        await wait_until(
            pilot,
            lambda: f"apply failed: {NET} has no Running router" in screen_text(app),
            what="the failure in words",
        )
        assert "Traceback" not in screen_text(app)


async def test_the_palette_finds_a_networks_router_rules(net_lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(net_lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: CommandPalette.is_open(app), what="the palette")
        await pilot.press(*"rules zone1-net1")
        await wait_until(
            pilot, lambda: "edit its router's rules" in screen_text(app), what="the hit"
        )
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, RouterRulesScreen), what="editor")
        assert isinstance(app.screen, RouterRulesScreen) and app.screen.network == NET


async def test_editor_keys_can_be_remapped_by_binding_id(net_lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(net_lab, keymap={"rules.add": "n", "rules.diff": "v"})
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_editor(pilot, app, wait_until)
        keys = footer_keys(app)
        assert "n" in keys and "v" in keys and "a" not in keys
        await pilot.press("v")
        await wait_until(pilot, lambda: isinstance(app.screen, RouterDiffScreen), what="diff")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is screen)
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, RuleFormScreen), what="the form")

"""Object actions at 80x24 against a real engine: start/stop, reboot, destroy (confirmed),
migrate (host picker), restart network; each becomes a job, refusals show in words."""

from __future__ import annotations

from typing import Any

from backend.engine.core import Engine
from tui_app.app import SysvmApp
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.host_picker import HostPickerScreen
from tui_app.screens.main import MainScreen

from .driving import SIZE, loaded, select, system_vms_of, toasts, zone_vm
from .rendered import screen_text


async def jobs_of(engine: Engine, kind: str) -> list[Any]:
    return [j for j in await engine.jobs(limit=500) if j.kind == kind]


def footer_keys(app: SysvmApp) -> set[str]:
    """The keys the footer of the current screen offers."""
    return {
        b.binding.key for b in app.screen.active_bindings.values() if b.binding.show and b.enabled
    }


async def test_confirmed_destroy_of_an_ssvm_brings_a_replacement_into_the_tree(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = zone_vm(tree, "zone1", "ssvm")
        old = ssvm.name
        await select(pilot, tree, ssvm)

        await pilot.press("D")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the modal")
        question = screen_text(app)
        assert f"Destroy SSVM {old} in zone1?" in question
        assert "reconciler starts a new SSVM" in question
        await pilot.press("enter")
        assert isinstance(app.screen, MainScreen)

        def replacement() -> Any:
            return next(
                (
                    v
                    for v in system_vms_of(tree, "zone1")
                    if v.data["type"] == "ssvm" and v.name != old and v.state == "Running"
                ),
                None,
            )

        await wait_until(pilot, lambda: tree.item("system_vm", old) is None, what="the old SSVM")
        await wait_until(pilot, lambda: replacement() is not None, timeout=15, what="a new SSVM")
        new = replacement()
        assert new.name.startswith("s-") and new.name.endswith("-VM")
        assert new.node is not None and "Running" in str(new.node.label)
        [destroy] = await jobs_of(lab, "systemvm.destroy")
        assert destroy.target_name == old and destroy.state == "succeeded"
        assert destroy.id in app.main_screen.strip.history, "the job showed in the strip"


async def test_escape_or_n_cancels_a_destroy(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        guest = tree.item("guest_vm", "zone1-net1-vm1")
        assert guest is not None
        await select(pilot, tree, guest)
        for key in ("escape", "n"):
            await pilot.press("D")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            assert "Destroy guest VM zone1-net1-vm1 in zone1?" in screen_text(app)
            await pilot.press(key)
            await wait_until(pilot, lambda: isinstance(app.screen, MainScreen))
        await pilot.pause(0.3)
        assert tree.item("guest_vm", "zone1-net1-vm1") is guest
        assert await jobs_of(lab, "vm.destroy") == []

        # y confirms, like Enter.
        await pilot.press("D")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_until(pilot, lambda: tree.item("guest_vm", "zone1-net1-vm1") is None)
        assert [j.state for j in await jobs_of(lab, "vm.destroy")] == ["succeeded"]


async def test_s_stops_a_running_guest_vm_and_starts_it_again(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        guest = tree.item("guest_vm", "zone2-net2-vm1")
        assert guest is not None
        await select(pilot, tree, guest)
        await pilot.press("s")
        await wait_until(pilot, lambda: guest.state == "Stopped", what="the VM to stop")
        await wait_until(pilot, lambda: "stop guest VM zone2-net2-vm1: done" in toasts(app))
        await pilot.press("s")
        await wait_until(pilot, lambda: guest.state == "Running", what="the VM to start")
        kinds = [j.kind for j in await lab.jobs(limit=5)]
        assert kinds[:2] == ["vm.start", "vm.stop"]
        strip = app.main_screen.strip
        assert {j.id for j in await lab.jobs(limit=2)} <= set(strip.history)


async def test_r_reboots_a_system_vm(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        cpvm = zone_vm(tree, "zone2", "cpvm")
        await select(pilot, tree, cpvm)
        await pilot.press("r")
        await wait_until(pilot, lambda: bool(app.main_screen.strip.history), what="the job")
        job = await lab.wait_job(app.main_screen.strip.history[-1], 30)
        assert (job.kind, job.target_name, job.state) == ("systemvm.reboot", cpvm.name, "succeeded")
        await wait_until(pilot, lambda: cpvm.state == "Running")


async def test_m_migrates_to_the_host_picked(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = zone_vm(tree, "zone2", "ssvm")
        source = ssvm.data["host"]
        target = next(h for h in ("zone2-host1", "zone2-host2") if h != source)
        await select(pilot, tree, ssvm)

        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, HostPickerScreen))
        shown = screen_text(app)
        assert f"Migrate {ssvm.name}" in shown and f"now on {source}" in shown
        assert "least loaded (auto)" in shown and target in shown
        assert f"{source}  " not in shown.split("least loaded")[1], "its own host is not offered"
        await pilot.press("down", "enter")  # from "auto" down to the one other host

        await wait_until(pilot, lambda: ssvm.data.get("host") == target, what="the new host")
        assert (await lab.system_vm(ssvm.name))["host"] == target
        [job] = await jobs_of(lab, "systemvm.migrate")
        assert job.state == "succeeded" and job.result == {"host": target}


async def test_x_restarts_a_network_with_cleanup_from_its_router(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        network = tree.item("network", "zone1-net2")
        assert network is not None
        router = next(c for c in network.children if c.kind == "router")
        await select(pilot, tree, router)
        await pilot.press("x")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        text = screen_text(app)
        assert "Restart network zone1-net2 with cleanup?" in text and router.name in text
        await pilot.press("enter")

        def new_router() -> Any:
            return next(
                (c for c in network.children if c.kind == "router" and c.name != router.name),
                None,
            )

        await wait_until(pilot, lambda: new_router() is not None, timeout=15, what="new router")
        await wait_until(pilot, lambda: new_router().state == "Running", timeout=15)
        [job] = await jobs_of(lab, "network.restart")
        assert job.params == {"name": "zone1-net2", "cleanup": True}


async def test_action_keys_follow_what_the_cursor_is_on(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        assert not {"s", "r", "D", "m", "x"} & footer_keys(app), "a zone has no object actions"

        await select(pilot, tree, zone_vm(tree, "zone1", "ssvm"))
        assert {"s", "r", "D", "m"} <= footer_keys(app) and "x" not in footer_keys(app)

        network = tree.item("network", "zone1-net1")
        assert network is not None
        await select(pilot, tree, network)
        assert "x" in footer_keys(app) and "D" not in footer_keys(app)

        # D on a network does nothing.
        await pilot.press("D")
        await pilot.pause(0.1)
        assert isinstance(app.screen, MainScreen)


async def test_a_failed_job_and_a_refused_request_show_in_words(
    console_engine: Engine, wait_until: Any
) -> None:
    job = await console_engine.lab_up(zones=1, hosts=1, networks=1, vms=1)
    assert (await console_engine.wait_job(job.id, 60)).state == "succeeded"
    app = SysvmApp(console_engine)
    async with app.run_test(size=SIZE) as pilot:
        tree = await loaded(pilot, app, wait_until)
        ssvm = zone_vm(tree, "zone1", "ssvm")
        await select(pilot, tree, ssvm)

        # One host only: the picker says so, and the engine's "no other host" comes back.
        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, HostPickerScreen))
        assert "no other host of its zone is Up" in screen_text(app)
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: any("no other host in state Up" in t for t in toasts(app)),
            what="the failure toast",
        )
        assert "Traceback" not in screen_text(app)

        # A stopping VM cannot be started or stopped yet: said at once, nothing asked.
        jobs_before = len(await console_engine.jobs())
        # (A published event stands for the real state change, which would pass too quickly.)
        console_engine.bus.publish(
            "system_vm", ssvm.data["id"], "updated", ssvm.name, state="Stopping"
        )
        await wait_until(pilot, lambda: ssvm.state == "Stopping")
        await pilot.press("s")
        await wait_until(pilot, lambda: any("once it has settled" in t for t in toasts(app)))
        assert len(await console_engine.jobs()) == jobs_before

"""The jobs and events screens at 80x24, live from a real engine."""

from __future__ import annotations

from typing import Any

from backend.engine.core import Engine
from tui_app.app import SysvmApp
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.events import EventsScreen
from tui_app.screens.job_details import JobDetailsScreen
from tui_app.screens.jobs import JobsScreen
from tui_app.screens.main import MainScreen

from .driving import SIZE, loaded, toasts
from .rendered import screen_text


def table_rows(screen: JobsScreen | EventsScreen) -> list[list[str]]:
    table = screen.table
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def open_view(pilot: Any, app: SysvmApp, wait_until: Any, word: str) -> Any:
    app.run_command(word)
    view = {"jobs": JobsScreen, "events": EventsScreen}[word]
    await wait_until(pilot, lambda: isinstance(app.screen, view) and app.screen.loaded)
    await pilot.pause()
    return app.screen


async def test_jobs_screen_lists_jobs_newest_first_and_follows_new_ones(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        jobs = await open_view(pilot, app, wait_until, "jobs")
        rows = table_rows(jobs)
        assert rows[0][1] == "lab.up" and rows[0][3] == "succeeded" and rows[0][4] == "100%"
        assert "lab converged" in screen_text(app)

        job = await lab.guest_vm_action("zone1-net1-vm2", "stop")
        await wait_until(
            pilot,
            lambda: (
                table_rows(jobs)[0][:4] == [str(job.id), "vm.stop", "zone1-net1-vm2", "succeeded"]
            ),
            what="the new job on top, finished",
        )
        assert jobs.table.cursor_row == 1, "the cursor stays on the job it was on"

        # / filters; Esc clears the filter, a second Esc goes back.
        await pilot.press("slash", *"vm.stop", "enter")
        await pilot.pause()
        assert [r[1] for r in table_rows(jobs)] == ["vm.stop"]
        await pilot.press("escape")
        await pilot.pause()
        assert len(table_rows(jobs)) == 2 and isinstance(app.screen, JobsScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_enter_shows_a_job_in_full(lab: Engine, wait_until: Any) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        job = await lab.network_restart("zone2-net1", cleanup=True)
        done = await lab.wait_job(job.id, 30)
        jobs = await open_view(pilot, app, wait_until, "jobs")
        assert jobs.selected_job_id == job.id
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, JobDetailsScreen))
        await wait_until(pilot, lambda: app.screen.job is not None, what="the job read")
        await pilot.pause()
        text = screen_text(app)
        assert (
            f"Job {job.id}" in text and "network.restart" in text and "network zone2-net1" in text
        )
        assert '"cleanup": true' in text and done.result["router"] in text
        await pilot.press("escape")
        assert isinstance(app.screen, JobsScreen)


async def test_c_cancels_a_running_job_after_asking(
    console_engine: Engine, wait_until: Any
) -> None:
    app = SysvmApp(console_engine)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        jobs = await open_view(pilot, app, wait_until, "jobs")
        job = await console_engine.lab_up(zones=8, hosts=2, networks=2, vms=3)
        await wait_until(
            pilot,
            lambda: jobs.selected_job_id == job.id and jobs.jobs[job.id]["state"] == "running",
            what="the running lab.up on top",
        )
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert f"Cancel job {job.id} (lab.up lab)?" in screen_text(app)
        await pilot.press("enter")
        await wait_until(
            pilot, lambda: jobs.jobs[job.id]["state"] == "cancelled", timeout=30, what="cancelled"
        )
        assert (await console_engine.job(job.id)).state == "cancelled"
        await pilot.pause()
        assert "c" not in {b.binding.key for b in app.screen.active_bindings.values()}, (
            "a finished job cannot be cancelled: the key leaves the footer"
        )


async def test_cancelling_a_job_that_ended_meanwhile_says_so(
    console_engine: Engine, wait_until: Any
) -> None:
    app = SysvmApp(console_engine)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        jobs = await open_view(pilot, app, wait_until, "jobs")
        job = await console_engine.lab_up(zones=8, hosts=2, networks=2, vms=3)
        await wait_until(pilot, lambda: jobs.jobs.get(job.id, {}).get("state") == "running")
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await console_engine.cancel_job(job.id)  # someone else was quicker
        # The engine's cancel waits up to 10 s for the job to end; under load (the lab's
        # reconciler writing for 8 zones) recording the end can take longer: the job must
        # have ended before the console's own cancel goes out.
        await wait_until(
            pilot, lambda: jobs.jobs[job.id]["state"] == "cancelled", timeout=60, what="cancelled"
        )
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: any("nothing to cancel" in t for t in toasts(app)),
            what="the engine's refusal in words",
        )


async def test_events_screen_shows_the_log_live_and_filters_it(
    lab: Engine, wait_until: Any
) -> None:
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        events = await open_view(pilot, app, wait_until, "events")
        rows = table_rows(events)
        backlog = await lab.events(limit=200)
        assert [r[0] for r in rows] == [str(e.id) for e in backlog], "the kept log to start with"
        newest = max(e.id for e in events.events)
        assert events.table.cursor_row == len(rows) - 1, "newest at the bottom, selected"

        job = await lab.guest_vm_action("zone2-net2-vm2", "stop")
        await lab.wait_job(job.id, 30)
        await wait_until(
            pilot,
            lambda: any(
                e.name == "zone2-net2-vm2" and e.fields.get("state") == "Stopped"
                for e in events.events
                if e.id > newest
            ),
            what="the live events",
        )
        await pilot.pause(0.1)
        last = table_rows(events)[-1]
        assert events.table.cursor_row == events.table.row_count - 1, "it follows the log"
        assert any("zone2-net2-vm2" in " ".join(r) for r in table_rows(events)[-6:]), last

        await pilot.press("slash", *"zone2-net2-vm2", "enter")
        await pilot.pause()
        rows = table_rows(events)
        assert rows and all("zone2-net2-vm2" in " ".join(r) for r in rows)
        assert {r[2] for r in rows} == {"guest_vm", "job"}, "its own events and its jobs'"
        await pilot.press("slash", "ctrl+u", *"guest_vm zone2-net2-vm2", "enter")
        await pilot.pause()
        assert {r[2] for r in table_rows(events)} == {"guest_vm"}
        # Enter on an event goes to its object.
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, MainScreen))
        assert app.main_screen.inventory.selected.name == "zone2-net2-vm2"


async def test_events_arriving_while_the_screen_is_taken_down_are_dropped(
    lab: Engine, wait_until: Any
) -> None:
    """A screen's widgets are removed before its timers stop: a batch of engine events due in
    between found no table and crashed the app (seen once in CI). It is dropped now."""
    app = SysvmApp(lab)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        events = await open_view(pilot, app, wait_until, "events")
        shown = events.applied_batches
        await events.table.remove()  # as while the screen is taken down
        lab.bus.publish("job", 1, "updated", "after the table", state="running")
        await pilot.pause(0.2)  # several frames: the batch is due
        assert events.applied_batches == shown, "the batch was dropped, not applied"
        assert app.is_running and app._exception is None

"""The Templates screen at 80x24: a real engine on a one-zone lab, a real HTTP server on
loopback serving the template (throttled where a test needs to watch it move)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from backend.config import load_config
from backend.engine.core import Engine
from tests.test_template_transfers import BLOB, SHA256, _Origin, origin, url
from tui_app.app import SysvmApp
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.help import HelpScreen
from tui_app.screens.job_details import JobDetailsScreen
from tui_app.screens.main import MainScreen
from tui_app.screens.template_form import RegisterTemplateScreen, UploadTemplateScreen
from tui_app.screens.templates import TemplatesScreen
from tui_app.widgets.activity_strip import ActivityStrip

from .driving import SIZE, loaded
from .rendered import screen_text, text_of

__all__ = ["origin"]  # the loopback HTTP server fixture, shared with the transfer tests

MakeLab = Callable[..., Awaitable[Engine]]
MUTATING_KEYS = {"r", "u", "c", "D"}


@pytest.fixture
async def make_lab(sysvm_home: Path) -> AsyncIterator[MakeLab]:
    """Started engines with a one-zone, one-host lab (settings as SYSVM_* variables)."""
    made: list[Engine] = []

    async def make(wait: bool = True, **env: str) -> Engine:
        engine = Engine(load_config(home=sysvm_home, env={"SYSVM_HOME": str(sysvm_home), **env}))
        await engine.start()
        made.append(engine)
        job = await engine.lab_up(zones=1, hosts=1, networks=0, vms=0)
        if wait:
            job = await engine.wait_job(job.id, 60)
            assert job.state == "succeeded", job.error
        return engine

    yield make
    for engine in made:
        await engine.stop()


def footer_keys(app: SysvmApp) -> set[str]:
    return {b.binding.key for b in app.screen.active_bindings.values() if b.binding.show}


def row_of(screen: TemplatesScreen, name: str) -> dict[str, Any] | None:
    return next((r for r in screen.templates.values() if r["name"] == name), None)


def cells_of(screen: TemplatesScreen, name: str) -> list[str]:
    """The table row of template `name` as text: zone, name, format, state, size/progress."""
    row = row_of(screen, name)
    if row is None or str(row["id"]) not in screen.table.rows:
        return []
    return [str(c) for c in screen.table.get_row(str(row["id"]))]


async def open_templates(pilot: Any, app: SysvmApp, wait_until: Any) -> TemplatesScreen:
    await loaded(pilot, app, wait_until)
    await pilot.press("t")
    await wait_until(
        pilot,
        lambda: isinstance(app.screen, TemplatesScreen) and app.screen.loaded,
        what="the templates screen, loaded",
    )
    await pilot.pause()
    assert isinstance(app.screen, TemplatesScreen)
    return app.screen


async def open_form(pilot: Any, app: SysvmApp, wait_until: Any, key: str, form: type) -> Any:
    """Press `key` on the templates screen; the form it opens."""
    await pilot.press(key)
    await wait_until(pilot, lambda: isinstance(app.screen, form), what=form.__name__)
    return app.screen


async def reaches(
    pilot: Any, screen: TemplatesScreen, wait_until: Any, name: str, state: str, timeout: float
) -> None:
    """Wait until the table shows template `name` in `state`."""
    await wait_until(
        pilot,
        lambda: cells_of(screen, name)[3:4] == [state],
        timeout=timeout,
        what=f"{name} {state} in the table",
    )


async def type_into(pilot: Any, field: str, text: str) -> None:
    pilot.app.screen.query_one(f"#field-{field}").focus()
    await pilot.pause()
    await pilot.press(*text)


async def test_t_opens_the_templates_of_every_zone_and_esc_goes_back(
    make_lab: MakeLab, wait_until: Any
) -> None:
    engine = await make_lab()
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_templates(pilot, app, wait_until)
        zone, _name, fmt, state, _size = cells_of(screen, "systemvm-template")
        assert (zone, fmt, state) == ("zone1", "QCOW2", "DOWNLOADED")
        text = screen_text(app)
        assert "Templates" in text and "systemvm-template" in text and "DOWNLOADED" in text
        assert {"r", "u"} <= footer_keys(app)
        assert "D" not in footer_keys(app), "the system VM template cannot be deleted"

        # / filters (! inverts); Esc clears the filter, a second Esc goes back.
        await pilot.press("slash", *"!systemvm", "enter")
        await pilot.pause()
        assert screen.table.row_count == 0
        await pilot.press("escape")
        await pilot.pause()
        assert screen.table.row_count == 1 and isinstance(app.screen, TemplatesScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)

        await pilot.press("colon", *"templates", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, TemplatesScreen), what=":templates")


async def test_a_template_registered_from_the_form_reaches_downloaded(
    make_lab: MakeLab, origin: _Origin, wait_until: Any
) -> None:
    engine = await make_lab()
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_templates(pilot, app, wait_until)
        form = await open_form(pilot, app, wait_until, "r", RegisterTemplateScreen)
        assert form.query_one("#field-zone").value == "zone1", "the only zone is the default"
        await type_into(pilot, "name", "blob")
        await type_into(pilot, "url", url(origin))
        assert form._value("format") == "RAW", "the .raw URL chose the format"
        await type_into(pilot, "checksum", SHA256)
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is screen, what="the form to close")
        await reaches(pilot, screen, wait_until, "blob", "DOWNLOADED", 60)
        assert cells_of(screen, "blob")[4] == "6.0 MiB"
        [stored] = [t for t in await engine.templates_list() if t["name"] == "blob"]
        assert stored["state"] == "DOWNLOADED" and stored["size"] == len(BLOB)
        assert "blob" in screen_text(app)

        # Enter shows its transfer's job in full.
        screen.table.move_cursor(row=screen.table.get_row_index(str(stored["id"])))
        await pilot.pause()
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: isinstance(app.screen, JobDetailsScreen) and app.screen.job is not None,
            what="the transfer's job",
        )
        assert "template.download" in screen_text(app) and "succeeded" in screen_text(app)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is screen)

        # D deletes it, after a question naming it.
        await pilot.press("D")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "Delete template blob in zone1?" in screen_text(app)
        await pilot.press("enter")
        await wait_until(pilot, lambda: row_of(screen, "blob") is None, what="blob gone")
        assert [t["name"] for t in await engine.templates_list()] == ["systemvm-template"]


async def test_a_slow_transfer_shows_bar_percent_speed_and_eta_and_cancel_abandons_it(
    make_lab: MakeLab, origin: _Origin, wait_until: Any
) -> None:
    engine = await make_lab(SYSVM_JOB_PROGRESS_INTERVAL="0.2")
    origin.rate = 256 * 1024  # 24 s for the whole blob
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        job = await engine.template_register("zone1", "slow", url(origin), "RAW", SHA256)

        # The activity strip of the main screen: percent, speed and ETA of the transfer.
        strip = app.main_screen.query_one(ActivityStrip)
        await wait_until(
            pilot,
            lambda: "MiB/s" in text_of(strip) or "KiB/s" in text_of(strip),
            timeout=30,
            what="a speed in the activity strip",
        )
        line = next(ln for ln in text_of(strip).splitlines() if "slow" in ln)
        assert "%" in line and "ETA " in line and "ETA --" not in line, line

        screen = await open_templates(pilot, app, wait_until)
        panel = screen.panel

        def moving() -> bool:
            lines = panel.lines
            return bool(lines) and lines[0].done > 0 and lines[0].rate > 0

        await wait_until(pilot, moving, timeout=30, what="a moving transfer line")
        await pilot.pause(0.1)
        shown = text_of(panel)
        assert "slow" in shown and "%" in shown and "KiB/s" in shown and "ETA " in shown, shown
        assert "/6.0 MiB" in shown, shown
        assert cells_of(screen, "slow")[3] == "DOWNLOAD_IN_PROGRESS"
        assert "1 transferring" in screen_text(app)

        row = row_of(screen, "slow")
        assert row is not None
        screen.table.move_cursor(row=screen.table.get_row_index(str(row["id"])))
        await pilot.pause()
        assert "via s-" in text_of(screen.query_one("#templates-detail")), "the SSVM at work"
        assert "c" in footer_keys(app)
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "Cancel the transfer of template slow in zone1?" in screen_text(app)
        await pilot.press("enter")
        await reaches(pilot, screen, wait_until, "slow", "ABANDONED", 15)
        assert not panel.lines, "no transfer line once it is abandoned"
        assert (await engine.job(job.id)).state == "cancelled"
        [stored] = [t for t in await engine.templates_list() if t["name"] == "slow"]
        assert stored["state"] == "ABANDONED"


async def test_bad_url_or_checksum_is_shown_under_its_field_and_nothing_is_registered(
    make_lab: MakeLab, origin: _Origin, wait_until: Any
) -> None:
    engine = await make_lab()
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_templates(pilot, app, wait_until)
        form = await open_form(pilot, app, wait_until, "r", RegisterTemplateScreen)

        await pilot.press("enter")  # nothing typed: the required fields say so
        await pilot.pause()
        assert "name: required" in text_of(form.query_one("#error-name"))
        assert "url: required" in text_of(form.query_one("#error-url"))

        await type_into(pilot, "name", "bad")
        await type_into(pilot, "url", "ftp://127.0.0.1/x.raw")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: form.query_one("#error-url").has_class("-shown"),
            what="the url error",
        )
        assert "url: only http and https are allowed" in text_of(form.query_one("#error-url"))
        assert app.focused is form.query_one("#field-url"), "the cursor goes to the field"

        form.query_one("#field-url").value = url(origin)
        await type_into(pilot, "checksum", "{SHA-256}abc")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: form.query_one("#error-checksum").has_class("-shown"),
            what="the checksum error",
        )
        assert text_of(form.query_one("#error-checksum")).strip().startswith("checksum:")
        assert not form.query_one("#error-url").has_class("-shown")
        assert isinstance(app.screen, RegisterTemplateScreen), "the form stays open"
        assert "Traceback" not in screen_text(app)

        assert [t["name"] for t in await engine.templates_list()] == ["systemvm-template"]
        assert all(not j.kind.startswith("template.") for j in await engine.jobs())
        await pilot.press("escape")
        assert app.screen is screen and row_of(screen, "bad") is None


async def test_a_failed_download_says_why_in_words(
    make_lab: MakeLab, origin: _Origin, wait_until: Any
) -> None:
    engine = await make_lab()
    wrong = "{SHA-256}" + "0" * 64
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_templates(pilot, app, wait_until)
        await engine.template_register("zone1", "corrupt", url(origin), "RAW", wrong)
        await reaches(pilot, screen, wait_until, "corrupt", "DOWNLOAD_ERROR", 60)
        assert cells_of(screen, "corrupt")[4].startswith("checksum mismatch")
        row = row_of(screen, "corrupt")
        assert row is not None
        screen.table.move_cursor(row=screen.table.get_row_index(str(row["id"])))
        await pilot.pause()
        detail = text_of(screen.query_one("#templates-detail")).replace("\n", " ")
        assert "expected" in detail and "0" * 16 in detail, detail
        assert SHA256[9:25] in detail.replace(" ", ""), "what the file really has"
        assert "Traceback" not in screen_text(app)


async def test_a_local_file_uploaded_from_the_form_reaches_uploaded(
    make_lab: MakeLab, tmp_path: Path, wait_until: Any
) -> None:
    engine = await make_lab()
    source = tmp_path / "local disk.raw"
    source.write_bytes(BLOB)
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_templates(pilot, app, wait_until)
        form = await open_form(pilot, app, wait_until, "u", UploadTemplateScreen)
        await type_into(pilot, "file", str(source))
        assert form._value("name") == "local-disk" and form._value("format") == "RAW"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is screen, what="the form to close")
        await wait_until(pilot, lambda: row_of(screen, "local-disk") is not None)
        first = row_of(screen, "local-disk")
        assert first is not None and first["state"].startswith(("NOT_UPLOADED", "UPLOAD")), first
        await reaches(pilot, screen, wait_until, "local-disk", "UPLOADED", 60)


async def test_a_transfer_waiting_for_an_ssvm_says_so(
    make_lab: MakeLab, origin: _Origin, wait_until: Any
) -> None:
    engine = await make_lab(wait=False, SYSVM_LAB_BOOT_DELAY="3")
    while not await engine.templates_list():  # the zone is there, its SSVM still booting
        await asyncio.sleep(0.05)
    await engine.template_register("zone1", "early", url(origin), "RAW", SHA256)
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = await open_templates(pilot, app, wait_until)
        await wait_until(
            pilot,
            lambda: "waiting: no Running SSVM in zone1" in text_of(screen.panel),
            what="the waiting reason",
        )
        assert "waiting: no Running SSVM in zone1" in cells_of(screen, "early")[4]
        await reaches(pilot, screen, wait_until, "early", "DOWNLOADED", 60)


async def test_read_only_hides_register_upload_cancel_and_delete(
    make_lab: MakeLab, wait_until: Any
) -> None:
    engine = await make_lab()
    app = SysvmApp(engine, read_only=True)
    async with app.run_test(size=SIZE) as pilot:
        await open_templates(pilot, app, wait_until)
        assert not MUTATING_KEYS & footer_keys(app)
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        ids = {i for e in app.screen.entries for i in e.binding_ids}
        assert "templates.back" in ids
        assert not ids & {
            "templates.register",
            "templates.upload",
            "templates.cancel",
            "templates.delete",
        }
        await pilot.press("escape")
        for key in ("r", "u", "c", "D"):
            await pilot.press(key)
            await pilot.pause(0.05)
            assert isinstance(app.screen, TemplatesScreen), f"{key} opened something"
        assert all(not j.kind.startswith("template.") for j in await engine.jobs())


async def test_help_lists_every_templates_key_with_its_binding_id(
    make_lab: MakeLab, wait_until: Any
) -> None:
    engine = await make_lab()
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await open_templates(pilot, app, wait_until)
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        by_id = {i: e for e in app.screen.entries for i in e.binding_ids}
        for binding_id, key in (
            ("templates.register", "r"),
            ("templates.upload", "u"),
            ("templates.cancel", "c"),
            ("templates.delete", "D"),
            ("templates.back", "esc"),
        ):
            assert binding_id in by_id and by_id[binding_id].keys == (key,), binding_id
        text = screen_text(app)
        assert "Register" in text and "Upload" in text and "Cancel" in text and "Delete" in text


async def test_templates_keys_follow_the_keymap(make_lab: MakeLab, wait_until: Any) -> None:
    engine = await make_lab()
    app = SysvmApp(engine, keymap={"main.templates": "T", "templates.register": "R"})
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        await pilot.press("t")
        await pilot.pause(0.1)
        assert isinstance(app.screen, MainScreen), "t is no longer the key"
        await pilot.press("T")
        await wait_until(pilot, lambda: isinstance(app.screen, TemplatesScreen))
        await pilot.press("r")
        await pilot.pause(0.1)
        assert isinstance(app.screen, TemplatesScreen), "r is no longer the key"
        assert "R" in footer_keys(app) and "r" not in footer_keys(app)
        await open_form(pilot, app, wait_until, "R", RegisterTemplateScreen)


async def test_ascii_mode_draws_the_form_without_box_glyphs(
    make_lab: MakeLab, wait_until: Any
) -> None:
    engine = await make_lab()
    app = SysvmApp(engine, ascii=True)
    async with app.run_test(size=SIZE) as pilot:
        await open_templates(pilot, app, wait_until)
        await open_form(pilot, app, wait_until, "r", RegisterTemplateScreen)
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "Register a template from a URL" in text
        assert not set(text) & set("▼▲╭╮╰╯─│━"), "box drawing or triangles at 80x24"


async def test_activity_strip_counts_the_transfers_it_has_no_room_for(
    make_lab: MakeLab, origin: _Origin, wait_until: Any
) -> None:
    engine = await make_lab()
    origin.rate = 256 * 1024
    app = SysvmApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app, wait_until)
        for i in range(4):
            await engine.template_register("zone1", f"t{i}", url(origin), "RAW")
        strip = app.main_screen.query_one(ActivityStrip)
        await wait_until(
            pilot, lambda: "+2 more running" in text_of(strip), what="the count of the rest"
        )
        assert len([ln for ln in text_of(strip).splitlines() if "download t" in ln]) == 2

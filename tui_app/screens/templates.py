"""The Templates screen (`t`, `:templates`): every zone's templates with state, kept live.

Below the table, each running transfer has a line with a progress bar, percent, bytes, speed
and ETA; a waiting one says why. `r` registers a template from a URL, `u` uploads a local
file, `c` cancels the selected transfer, `D` deletes a template (both after asking), Enter
opens the transfer's job, `/` filters (zone, name, format, state, error), Esc goes back.
Read-only mode removes r/u/c/D.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Static

from backend.errors import Conflict
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.filtered_table import FilteredTableScreen
from tui_app.screens.job_details import JobDetailsScreen
from tui_app.screens.template_form import RegisterTemplateScreen, UploadTemplateScreen
from tui_app.transfer_progress import TransferMeter, bytes_of, human_bytes, waiting_words
from tui_app.widgets.filter_input import FilterInput
from tui_app.widgets.record_table import RecordTable
from tui_app.widgets.transfer_panel import TransferLine, TransferPanel

if TYPE_CHECKING:
    from backend.api.protocol import EngineAPI
    from backend.api.types import EventRecord, JobInfo, StatusTree

RELOAD_SECONDS = 0.3
IN_PROGRESS = frozenset({"DOWNLOAD_IN_PROGRESS", "UPLOAD_IN_PROGRESS"})
NOT_STARTED = frozenset({"NOT_DOWNLOADED", "NOT_UPLOADED"})
FINAL = frozenset({"DOWNLOADED", "UPLOADED", "DOWNLOAD_ERROR", "UPLOAD_ERROR", "ABANDONED"})
STATE_STYLES = {
    "DOWNLOADED": "green",
    "UPLOADED": "green",
    "DOWNLOAD_IN_PROGRESS": "bold yellow",
    "UPLOAD_IN_PROGRESS": "bold yellow",
    "DOWNLOAD_ERROR": "bold red",
    "UPLOAD_ERROR": "bold red",
    "ABANDONED": "dim",
    "NOT_DOWNLOADED": "dim",
    "NOT_UPLOADED": "dim",
}
REASON_WORDS = {
    "format": "wrong format",
    "checksum": "checksum",
    "backing_file": "backing file",
    "corrupt": "corrupt image",
    "too_large": "too large",
    "disk_full": "disk full",
    "timeout": "timed out",
    "refused_address": "address refused",
    "redirects": "redirect loop",
    "connection": "connection lost",
    "bad_url": "bad URL",
}
"""The agent's reason for a failure, in the words the table starts its error with."""
# (key, label, width); the last column ("size / progress") takes what is left.
COLUMNS = (("zone", "zone", 7), ("name", "name", 18), ("format", "fmt", 5), ("state", "state", 20))
LAST = ("progress", "size / progress")


def is_transferring(row: dict[str, Any]) -> bool:
    """A transfer that is queued, waiting for an SSVM or moving bytes (cancellable)."""
    transfer = row.get("transfer")
    if not transfer:
        return False
    return row["state"] in IN_PROGRESS or (
        row["state"] in NOT_STARTED and transfer.get("state") not in FINAL
    )


def failure_words(row: dict[str, Any]) -> str:
    """Why a transfer failed, what first: "wrong format: the template was registered as ..."."""
    reason = str((row.get("transfer") or {}).get("reason") or "")
    error = str(row.get("error") or "")
    word = REASON_WORDS.get(reason.partition(":")[0], "")
    message = error or reason.partition(": ")[2] or reason
    return f"{word}: {message}" if word and not message.startswith(word) else message


class TemplatesScreen(FilteredTableScreen):
    """Templates of every zone; live from "template" events, coalesced once a frame."""

    SCOPED_CSS = False  # so the `.-ascii` rule (a class of the app) reaches it

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="templates.back"),
        Binding("slash", "filter", "Filter", show=False, id="templates.filter"),
        Binding("r", "register_template", "Register", id="templates.register"),
        Binding("u", "upload_template", "Upload", id="templates.upload"),
        Binding("c", "cancel_transfer", "Cancel", id="templates.cancel"),
        Binding("D", "delete_template", "Delete", id="templates.delete"),
    ]

    DEFAULT_CSS = """
    TemplatesScreen {
        & > #templates-title { height: 1; padding: 0 1; background: $panel; text-style: bold; }
        & > #templates-empty { display: none; padding: 1 2; color: $text-muted; }
        & > #templates-empty.-shown { display: block; }
        & > #templates-detail {
            height: auto; max-height: 6; padding: 0 1; color: $text-muted;
            border-top: solid $panel-lighten-2;
        }
    }
    .-ascii TemplatesScreen > #templates-detail { border-top: ascii $panel; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.templates: dict[int, dict[str, Any]] = {}
        self.loaded = False
        self.listing_help = False
        self._reload_armed = False
        self._meters: dict[int, TransferMeter] = {}
        self._last_width = 0
        self._keys_state: tuple[bool, bool] = (False, False)

    def compose(self) -> ComposeResult:
        yield Static("Templates", id="templates-title")
        yield FilterInput(
            placeholder="filter: zone, name, format, state, error", id="templates-filter"
        )
        yield Static("No templates yet. r registers one from a URL.", id="templates-empty")
        yield RecordTable(id="templates-table")
        yield TransferPanel(ascii=self.sysvm.ascii, id="templates-transfers")
        yield Static(id="templates-detail")
        yield Footer(compact=True, show_command_palette=False)

    @property
    def panel(self) -> TransferPanel:
        return self.query_one("#templates-transfers", TransferPanel)

    # -- data ---------------------------------------------------------------------------------

    @work(group="templates-load", exclusive=True, exit_on_error=False)
    async def _load(self) -> None:
        """Read the whole list; events that arrive meanwhile wait and are applied after it."""
        self._batch.hold()
        try:
            rows = await self.sysvm.api.templates_list()
        except Exception as exc:
            self.sysvm.report_engine_error(exc, "templates")
            if self.loaded:
                self._batch.release()  # go on patching the list already shown
            return
        self.templates = {int(r["id"]): dict(r) for r in rows}
        self.loaded = True
        self._rebuild()
        self._batch.release()

    def _schedule_reload(self) -> None:
        if not self._reload_armed:
            self._reload_armed = True
            self.set_timer(RELOAD_SECONDS, self._reload)

    def _reload(self) -> None:
        self._reload_armed = False
        self._load()

    def _on_snapshot(self, status: StatusTree, jobs: list[JobInfo]) -> None:
        if self.loaded:  # after a reconnect: read the list again
            self._load()

    def _on_event(self, event: EventRecord) -> None:
        if event.entity == "template":
            self._batch.add(event)

    def _apply_events(self, events: list[EventRecord]) -> None:
        changed: set[int] = set()
        structural = False
        for event in events:
            template_id = event.entity_id
            if event.kind == "deleted":
                structural = structural or self.templates.pop(template_id, None) is not None
                self._meters.pop(template_id, None)
                continue
            row = self.templates.get(template_id)
            if row is None:
                # A new template: shown at once from the event, completed by a re-read.
                f = event.fields
                row = self.templates[template_id] = {
                    "id": template_id,
                    "name": event.name,
                    "zone": f.get("zone", ""),
                    "format": f.get("format", ""),
                    "state": f.get("state", ""),
                    "size": 0,
                    "error": "",
                    "url": "",
                    "system": False,
                    "transfer": {"state": f.get("state", ""), "reason": "queued"},
                }
                structural = True
                self._schedule_reload()
            self._apply_update(row, event)
            changed.add(template_id)
        if structural or self._filter.active:
            self._rebuild()
        else:
            self._update_rows(changed)
        self._refresh_panel()
        self._refresh_keys()

    def _apply_update(self, row: dict[str, Any], event: EventRecord) -> None:
        f = event.fields
        if "state" in f:
            row["state"] = f["state"]
        if "error" in f:
            row["error"] = f["error"] or ""
        transfer = row.get("transfer") or {}
        row["transfer"] = transfer
        for key in ("bytes_done", "bytes_total", "reason"):
            if key in f:
                transfer[key] = f[key]
        if row["state"] in IN_PROGRESS | FINAL | NOT_STARTED:
            transfer["state"] = row["state"]
        if row["state"] in ("DOWNLOADED", "UPLOADED") and transfer.get("bytes_total"):
            row["size"] = transfer["bytes_total"]
        if "bytes_done" in f:
            meter = self._meters.setdefault(row["id"], TransferMeter())
            meter.add(event.ts, int(f.get("bytes_done") or 0))
        if "rate" in f:
            row["rate"] = float(f["rate"] or 0)
        if row["state"] in FINAL:
            self._meters.pop(row["id"], None)
            row.pop("rate", None)

    # -- the table ----------------------------------------------------------------------------

    def _sorted_ids(self) -> list[int]:
        def key(template_id: int) -> tuple[int, str, int]:
            zone = str(self.templates[template_id].get("zone", ""))
            digits = "".join(c for c in zone if c.isdigit())
            return (int(digits) if digits else 0, zone, template_id)

        return sorted(self.templates, key=key)

    def _width_of(self, key: str, least: int, most: int) -> int:
        longest = max((len(str(r.get(key, ""))) for r in self.templates.values()), default=0)
        return max(least, min(most, longest))

    def _rebuild(self) -> None:
        """Fill the table again (a template came or went, the width changed), keeping the cursor."""
        table = self.table
        keep, keep_row = self.selected_id, table.cursor_row
        table.clear(columns=True)
        widths = dict((k, w) for k, _l, w in COLUMNS) | {
            "zone": self._width_of("zone", 4, 10),
            "name": self._width_of("name", 8, 20),
        }
        for key, label, _w in COLUMNS:
            table.add_column(label, key=key, width=widths[key])
        used = sum(w + 2 for w in widths.values())
        table.add_column(LAST[1], key=LAST[0], width=max(12, self.size.width - used - 3))
        self._last_width = self.size.width
        for template_id in self._sorted_ids():
            row = self.templates[template_id]
            if self._matches(row):
                table.add_row(*self._cells(row), key=str(template_id))
        self.query_one("#templates-empty").set_class(self.loaded and not self.templates, "-shown")
        if keep is not None and str(keep) in table.rows:
            table.move_cursor(row=table.get_row_index(str(keep)), animate=False)
        elif table.row_count:  # it was deleted: stay where it was
            table.move_cursor(row=min(keep_row, table.row_count - 1), animate=False)
        self._refresh_panel()
        self._refresh_detail()
        self._refresh_keys()

    def _matches(self, row: dict[str, Any]) -> bool:
        return self.filter_matches(
            row.get(k, "") for k in ("zone", "name", "format", "state", "error")
        )

    def _update_rows(self, template_ids: set[int]) -> None:
        table = self.table
        keys = [k for k, _l, _w in COLUMNS] + [LAST[0]]
        for template_id in template_ids:
            if str(template_id) not in table.rows:
                continue
            cells = self._cells(self.templates[template_id])
            for key, value in zip(keys, cells, strict=True):
                table.update_cell(str(template_id), key, value)
        if self.selected_id in template_ids:
            self._refresh_detail()

    def _cells(self, row: dict[str, Any]) -> list[Any]:
        state = str(row.get("state", ""))
        return [
            row.get("zone", ""),
            Text(str(row.get("name", "")), no_wrap=True, overflow="ellipsis"),
            str(row.get("format", "")),
            Text(state, style=STATE_STYLES.get(state, "")),
            self._progress_cell(row),
        ]

    def _progress_cell(self, row: dict[str, Any]) -> Text:
        """Size when stored; percent and bytes while moving; the reason while waiting or
        after a failure."""
        state = row["state"]
        transfer = row.get("transfer") or {}
        done = int(transfer.get("bytes_done") or 0)
        total = int(transfer.get("bytes_total") or 0)
        if state in IN_PROGRESS:
            if total:
                return Text(f"{100 * done / total:.0f}% {bytes_of(done, total)}", no_wrap=True)
            return Text(f"{human_bytes(done)}", no_wrap=True)
        if state in ("DOWNLOAD_ERROR", "UPLOAD_ERROR"):
            return Text(failure_words(row), style="red", no_wrap=True, overflow="ellipsis")
        if is_transferring(row):
            reason = str(transfer.get("reason") or "queued")
            words = waiting_words(reason, str(row.get("zone", ""))) or reason
            return Text(words, style="yellow", no_wrap=True, overflow="ellipsis")
        if state == "ABANDONED":
            return Text(str(transfer.get("reason") or "cancelled"), style="dim")
        size = int(row.get("size") or 0)
        return Text(human_bytes(size) if size else "-", no_wrap=True)

    def _refresh_panel(self) -> None:
        lines = []
        for template_id in self._sorted_ids():
            row = self.templates[template_id]
            if not is_transferring(row):
                continue
            transfer = row.get("transfer") or {}
            reason = str(transfer.get("reason") or "")
            waiting = ""
            if row["state"] not in IN_PROGRESS:
                waiting = waiting_words(reason, str(row.get("zone", ""))) or reason or "queued"
            rate = row.get("rate")
            if rate is None:
                meter = self._meters.get(template_id)
                rate = meter.rate if meter is not None else 0.0
            lines.append(
                TransferLine(
                    name=str(row.get("name", "")),
                    done=int(transfer.get("bytes_done") or 0),
                    total=int(transfer.get("bytes_total") or 0),
                    rate=float(rate),
                    waiting=waiting,
                )
            )
        self.panel.show(lines)
        moving = sum(1 for line in lines if not line.waiting)
        title = "Templates" + (f"  ({moving} transferring)" if moving else "")
        self.query_one("#templates-title", Static).update(title)

    def _refresh_detail(self) -> None:
        """The selected template's source and, in full, why it failed or waits."""
        row = self.selected
        detail = self.query_one("#templates-detail", Static)
        if row is None:
            detail.update("")
            return
        transfer = row.get("transfer") or {}
        source = row.get("url") or ("system VM template" if row.get("system") else "")
        where = f"{row.get('zone', '')}/{row.get('name', '')}"
        text = Text.assemble((where, "bold"), "  ", source, no_wrap=False)
        reason = str(transfer.get("reason") or "")
        if row["state"] in IN_PROGRESS:
            # "on s-2-VM" as the engine says it (events name the SSVM only so), or what
            # happened to it ("s-2-VM was lost ...; resuming on a Running SSVM").
            if reason.startswith("on "):
                text.append(f"  via {reason[3:]}")
            elif reason:
                text.append("\n")
                text.append(reason, style="yellow")
            elif transfer.get("ssvm"):
                text.append(f"  via {transfer['ssvm']}")
        if row.get("error"):
            text.append("\n")
            text.append(str(row["error"]), style="red")
        detail.update(text)

    def on_resize(self) -> None:
        if self.loaded and self.size.width != self._last_width:
            self._rebuild()

    @property
    def selected_id(self) -> int | None:
        table = self.table
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return int(key) if key is not None else None

    @property
    def selected(self) -> dict[str, Any] | None:
        template_id = self.selected_id
        return self.templates.get(template_id) if template_id is not None else None

    # -- keys ---------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        row = self.selected
        if action in ("register_template", "upload_template"):
            return self.sysvm.gate(self, action, True)
        if action == "cancel_transfer":
            return self.sysvm.gate(self, action, row is not None and is_transferring(row))
        if action == "delete_template":
            deletable = row is not None and not row.get("system") and not is_transferring(row)
            return self.sysvm.gate(self, action, deletable)
        return True

    @on(DataTable.RowHighlighted, "#templates-table")
    def _moved(self) -> None:
        self._refresh_detail()
        self._refresh_keys()

    def _refresh_keys(self) -> None:
        """Redraw the footer only when `c` or `D` starts or stops applying."""
        row = self.selected
        state = (
            row is not None and is_transferring(row),
            row is not None and not row.get("system") and not is_transferring(row),
        )
        if state != self._keys_state:
            self._keys_state = state
            self.refresh_bindings()

    @on(DataTable.RowSelected, "#templates-table")
    def _open(self, event: DataTable.RowSelected) -> None:
        """Enter: the transfer's job in full (when the template has one)."""
        row = self.selected
        if row is not None:
            self._open_job(str(row["zone"]), str(row["name"]), row.get("transfer") or {})

    @work(group="templates-open", exclusive=True, exit_on_error=False)
    async def _open_job(self, zone: str, name: str, transfer: dict[str, Any]) -> None:
        job_id = transfer.get("job_id")
        if not job_id:  # a transfer that started after the list was read: ask the engine
            try:
                job_id = await _transfer_job(self.sysvm.api, zone, name)
            except Conflict:
                self.app.notify(f"{name} has no transfer job", title="templates", timeout=3)
                return
            except Exception as exc:
                self.sysvm.report_engine_error(exc, f"template {name}")
                return
        self.app.push_screen(JobDetailsScreen(int(job_id), {}))

    def _zones(self) -> list[str]:
        return [z.name for z in self.sysvm.main_screen.inventory.zones]

    def _default_zone(self) -> str:
        row = self.selected
        if row is not None and row.get("zone"):
            return str(row["zone"])
        zones = self._zones()
        return zones[0] if len(zones) == 1 else ""

    def action_register_template(self) -> None:
        form = RegisterTemplateScreen(self._zones(), self._default_zone())
        self.app.push_screen(form, self._submitted)

    def action_upload_template(self) -> None:
        form = UploadTemplateScreen(self._zones(), self._default_zone())
        self.app.push_screen(form, self._submitted)

    def _submitted(self, result: tuple[str, JobInfo] | None) -> None:
        if result is not None:
            words, job = result
            self.sysvm.watch_job(words, job)

    def action_cancel_transfer(self) -> None:
        row = self.selected
        if row is None or not is_transferring(row):
            return
        zone, name = str(row["zone"]), str(row["name"])
        transfer = row.get("transfer") or {}
        done, total = int(transfer.get("bytes_done") or 0), int(transfer.get("bytes_total") or 0)
        how_far = f", {bytes_of(done, total)} done" if done else ""

        def answered(yes: bool | None) -> None:
            if yes:
                self._cancel(zone, name)

        self.app.push_screen(
            ConfirmScreen(
                f"Cancel the transfer of template {name} in {zone}?",
                f"It is {row['state']}{how_far}. It stops at once, becomes ABANDONED, "
                "and its partial file is removed.",
                verb="Cancel transfer",
            ),
            answered,
        )

    @work(group="templates-cancel", exit_on_error=False)
    async def _cancel(self, zone: str, name: str) -> None:
        """Cancel through the jobs API (as `sysvm template cancel`); the row then says
        ABANDONED, and the console that started the transfer says so in a toast."""
        try:
            await self.sysvm.api.cancel_job(await _transfer_job(self.sysvm.api, zone, name))
        except Exception as exc:
            self.sysvm.report_engine_error(exc, f"cancel transfer of template {name}")

    def action_delete_template(self) -> None:
        row = self.selected
        if row is None or row.get("system") or is_transferring(row):
            return
        zone, name = str(row["zone"]), str(row["name"])

        def answered(yes: bool | None) -> None:
            if yes:
                self.sysvm.submit(
                    f"delete template {name}", lambda api: api.template_delete(zone, name)
                )

        self.app.push_screen(
            ConfirmScreen(
                f"Delete template {name} in {zone}?",
                "Its files are removed from the zone's secondary storage, and its record.",
                verb="Delete",
            ),
            answered,
        )


async def _transfer_job(api: EngineAPI, zone: str, name: str) -> int:
    """The job id of a template's transfer, as the engine has it now."""
    for row in await api.templates_list(zone=zone):
        if row["name"] == name:
            job_id = (row.get("transfer") or {}).get("job_id")
            if job_id:
                return int(job_id)
    raise Conflict(f"template {name!r} in {zone} has no transfer job")

"""The jobs screen (`:jobs`): recent jobs, newest first, kept live from job events.

`/` filters, Enter shows one job in full, `c` cancels a queued or running job (after asking),
Esc goes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Static

from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.filtered_table import FilteredTableScreen
from tui_app.screens.job_details import JobDetailsScreen
from tui_app.widgets.filter_input import FilterInput
from tui_app.widgets.record_table import RecordTable

if TYPE_CHECKING:
    from backend.api.types import EventRecord, JobInfo, StatusTree

HISTORY = 200
ACTIVE = frozenset({"queued", "running"})
STATE_STYLES = {
    "queued": "dim",
    "running": "bold yellow",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "dim",
}
# (key, label, width); the message column takes what is left.
COLUMNS = (
    ("id", "id", 4),
    ("kind", "kind", 16),
    ("target", "target", 14),
    ("state", "state", 9),
    ("progress", "done", 4),
)


def job_row(job: JobInfo) -> dict[str, Any]:
    """What the table shows of one job."""
    return {
        "id": job.id,
        "kind": job.kind,
        "target": job.target_name,
        "state": job.state,
        "progress": job.progress,
        "message": job.message,
        "error": job.error,
    }


class JobsScreen(FilteredTableScreen):
    """Recent jobs of the engine; `c` cancels the one under the cursor."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="jobs.back"),
        Binding("slash", "filter", "Filter", id="jobs.filter"),
        Binding("c", "cancel_job", "Cancel job", id="jobs.cancel"),
    ]

    DEFAULT_CSS = """
    JobsScreen {
        & > #jobs-title { height: 1; padding: 0 1; background: $panel; text-style: bold; }
        & > #jobs-empty { display: none; padding: 1 2; color: $text-muted; }
        & > #jobs-empty.-shown { display: block; }
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[int, dict[str, Any]] = {}
        self.loaded = False
        self._message_width = 0
        self._cancellable = False
        self.listing_help = False

    def compose(self) -> ComposeResult:
        yield Static("Jobs", id="jobs-title")
        yield FilterInput(placeholder="filter: id, kind, target, state, message", id="jobs-filter")
        yield Static("No jobs yet.", id="jobs-empty")
        yield RecordTable(id="jobs-table")
        yield Footer(compact=True, show_command_palette=False)

    # -- data ---------------------------------------------------------------------------------

    @work(group="jobs-load", exclusive=True, exit_on_error=False)
    async def _load(self) -> None:
        try:
            jobs = await self.sysvm.api.jobs(limit=HISTORY)
        except Exception as exc:
            self.sysvm.report_engine_error(exc)
            return
        for job in jobs:
            self.jobs.setdefault(job.id, job_row(job))
        self.loaded = True
        self._rebuild()
        self._batch.release()

    def _on_snapshot(self, status: StatusTree, jobs: list[JobInfo]) -> None:
        if self.loaded:  # after a reconnect: read the history again
            self._load()

    def _on_event(self, event: EventRecord) -> None:
        if event.entity == "job":
            self._batch.add(event)

    def _apply_events(self, events: list[EventRecord]) -> None:
        changed: set[int] = set()
        added = False
        for event in events:
            f = event.fields
            row = self.jobs.get(event.entity_id)
            if row is None:
                added = True
                row = self.jobs[event.entity_id] = {"id": event.entity_id}
            row.update(
                kind=event.name,
                target=f.get("target_name", row.get("target", "")),
                state=f.get("state", row.get("state", "")),
                progress=float(f.get("progress") or 0.0),
                message=f.get("message", ""),
                error=f.get("error", ""),
            )
            changed.add(event.entity_id)
        if len(self.jobs) > HISTORY * 2:
            for old in sorted(self.jobs)[: len(self.jobs) - HISTORY]:
                self.jobs.pop(old)
            added = True
        if added or self._filter.active:
            self._rebuild()
        else:
            self._update_rows(changed)
        self._refresh_cancel_key()

    # -- the table ----------------------------------------------------------------------------

    def _cells(self, row: dict[str, Any]) -> list[Any]:
        state = str(row.get("state", ""))
        text = row.get("error") or row.get("message") or ""
        message = Text(str(text), style="red" if row.get("error") else "", no_wrap=True)
        return [
            Text(str(row["id"]), justify="right"),
            row.get("kind", ""),
            row.get("target", ""),
            Text(state, style=STATE_STYLES.get(state, "")),
            Text(f"{float(row.get('progress') or 0):.0f}%", justify="right"),
            message,
        ]

    def _matches(self, row: dict[str, Any]) -> bool:
        keys = ("id", "kind", "target", "state", "message", "error")
        return self.filter_matches(row.get(k, "") for k in keys)

    def _rebuild(self) -> None:
        """Fill the table again (new jobs go on top; a filter changed), keeping the cursor."""
        table = self.table
        keep = self.selected_job_id
        width = max(12, self.size.width - sum(w + 2 for _k, _l, w in COLUMNS) - 4)
        if width != self._message_width or not table.columns:
            table.clear(columns=True)
            for key, label, w in COLUMNS:
                table.add_column(label, key=key, width=w)
            table.add_column("message", key="message", width=width)
            self._message_width = width
        else:
            table.clear()
        for job_id in sorted(self.jobs, reverse=True):
            row = self.jobs[job_id]
            if self._matches(row):
                table.add_row(*self._cells(row), key=str(job_id))
        self.query_one("#jobs-empty").set_class(self.loaded and not self.jobs, "-shown")
        if keep is not None and str(keep) in table.rows:
            table.move_cursor(row=table.get_row_index(str(keep)), animate=False)

    def _update_rows(self, job_ids: set[int]) -> None:
        table = self.table
        keys = [k for k, _l, _w in COLUMNS] + ["message"]
        for job_id in job_ids:
            if str(job_id) not in table.rows:
                continue
            for key, value in zip(keys, self._cells(self.jobs[job_id]), strict=True):
                table.update_cell(str(job_id), key, value)

    def on_resize(self) -> None:
        if self.loaded:
            self._rebuild()

    @property
    def selected_job_id(self) -> int | None:
        table = self.table
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return int(key) if key is not None else None

    # -- keys ---------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel_job":
            job_id = self.selected_job_id
            active = job_id is not None and self.jobs.get(job_id, {}).get("state") in ACTIVE
            return self.sysvm.gate(self, action, active)
        return True

    @on(DataTable.RowHighlighted, "#jobs-table")
    def _moved(self) -> None:
        self._refresh_cancel_key()

    def _refresh_cancel_key(self) -> None:
        """Redraw the footer only when `c` starts or stops applying to the selected job."""
        job_id = self.selected_job_id
        cancellable = job_id is not None and self.jobs.get(job_id, {}).get("state") in ACTIVE
        if cancellable != self._cancellable:
            self._cancellable = cancellable
            self.refresh_bindings()

    @on(DataTable.RowSelected, "#jobs-table")
    def _open(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key is not None:
            self.app.push_screen(JobDetailsScreen(int(key), dict(self.jobs.get(int(key), {}))))

    def action_cancel_job(self) -> None:
        job_id = self.selected_job_id
        if job_id is None:
            return
        row = self.jobs[job_id]
        what = f"{row.get('kind', 'job')} {row.get('target', '')}".strip()

        def answered(yes: bool | None) -> None:
            if yes:
                self.sysvm.submit(f"cancel job {job_id}", lambda api: api.cancel_job(job_id))

        self.app.push_screen(
            ConfirmScreen(
                f"Cancel job {job_id} ({what})?",
                f"It is {row.get('state')}; what it has done so far stays done.",
                verb="Cancel job",
            ),
            answered,
        )

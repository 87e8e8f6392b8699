"""The events screen (`:events`): the engine's event log, live, newest at the bottom.

It starts from the last events the engine kept and follows new ones (coalesced per frame, at
most MAX_ROWS kept). `/` filters; Enter goes to the object an event names; Esc goes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Static

from tui_app.screens.filtered_table import FilteredTableScreen
from tui_app.widgets.filter_input import FilterInput
from tui_app.widgets.record_table import RecordTable

if TYPE_CHECKING:
    from backend.api.types import EventRecord, JobInfo, StatusTree

BACKLOG = 200
MAX_ROWS = 1000
ENTITY_STYLES = {"job": "cyan", "system_vm": "green", "guest_vm": "blue", "host": "magenta"}


def event_fields(event: EventRecord) -> str:
    """The fields of an event as `key=value` words (empty values left out)."""
    return " ".join(f"{k}={v}" for k, v in event.fields.items() if v not in (None, "", [], {}))


class EventsScreen(FilteredTableScreen):
    """Every state change the engine reports, as it happens."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="events.back"),
        Binding("slash", "filter", "Filter", id="events.filter"),
    ]

    DEFAULT_CSS = """
    EventsScreen {
        & > #events-title { height: 1; padding: 0 1; background: $panel; text-style: bold; }
    }
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[EventRecord] = []
        self.loaded = False
        self._fields_width = 0
        self.applied_batches = 0

    def compose(self) -> ComposeResult:
        yield Static("Events", id="events-title")
        yield FilterInput(placeholder="filter: entity, name, fields", id="events-filter")
        yield RecordTable(id="events-table")
        yield Footer(compact=True, show_command_palette=False)

    @work(group="events-load", exclusive=True, exit_on_error=False)
    async def _load(self) -> None:
        try:
            backlog = await self.sysvm.api.events(limit=BACKLOG)
        except Exception as exc:
            self.sysvm.report_engine_error(exc)
            return
        seen = {e.id for e in self.events}
        self.events = sorted([*(e for e in backlog if e.id not in seen), *self.events], key=_id)
        self.loaded = True
        self._rebuild()
        self._batch.release()

    def _on_snapshot(self, status: StatusTree, jobs: list[JobInfo]) -> None:
        """Attached (again): nothing to do; the live stream carries on."""

    def _on_event(self, event: EventRecord) -> None:
        self._batch.add(event)

    def _apply_events(self, batch: list[EventRecord]) -> None:
        known = self.events[-1].id if self.events else 0
        batch = [e for e in batch if e.id > known]
        if not batch:
            return
        self.applied_batches += 1
        table = self.table
        following = not table.row_count or table.cursor_row >= table.row_count - 1
        self.events.extend(batch)
        overflow = len(self.events) - MAX_ROWS
        if overflow > 0:
            gone, self.events = self.events[:overflow], self.events[overflow:]
            for event in gone:
                if str(event.id) in table.rows:
                    table.remove_row(str(event.id))
        for event in batch[-MAX_ROWS:]:
            if self._matches(event):
                table.add_row(*self._cells(event), key=str(event.id))
        if following and table.row_count:
            table.move_cursor(row=table.row_count - 1, animate=False)

    # -- the table ----------------------------------------------------------------------------

    def _columns(self) -> list[tuple[str, int]]:
        columns = [("id", 6)]
        if self.sysvm.clock:
            columns.append(("time", 12))
        columns += [("entity", 9), ("name", 14)]
        return columns

    def _cells(self, event: EventRecord) -> list[object]:
        cells: list[object] = [Text(str(event.id), justify="right")]
        if self.sysvm.clock:
            cells.append(Text(event.ts[11:23], style="dim"))
        cells += [
            Text(event.entity, style=ENTITY_STYLES.get(event.entity, "")),
            event.name or str(event.entity_id),
            Text(f"{event.kind} {event_fields(event)}".strip(), no_wrap=True),
        ]
        return cells

    def _matches(self, event: EventRecord) -> bool:
        return self.filter_matches((event.entity, event.name, event.kind, event_fields(event)))

    def _rebuild(self) -> None:
        table = self.table
        columns = self._columns()
        width = max(12, self.size.width - sum(w + 2 for _c, w in columns) - 4)
        if width != self._fields_width or not table.columns:
            table.clear(columns=True)
            for label, w in columns:
                table.add_column(label, key=label, width=w)
            table.add_column("change", key="change", width=width)
            self._fields_width = width
        else:
            table.clear()
        for event in self.events:
            if self._matches(event):
                table.add_row(*self._cells(event), key=str(event.id))
        if table.row_count:
            table.move_cursor(row=table.row_count - 1, animate=False)

    def on_resize(self) -> None:
        if self.loaded:
            self._rebuild()

    # -- keys ---------------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#events-table")
    def _open(self, event: DataTable.RowSelected) -> None:
        """Enter on an event: go to the object it names in the inventory."""
        key = event.row_key.value
        record = next((e for e in self.events if str(e.id) == key), None)
        if record is not None and record.name and record.entity != "job":
            self.sysvm.jump_to_name(record.name)
        elif record is not None and record.entity == "job":
            self.sysvm.run_command("jobs")


def _id(event: EventRecord) -> int:
    return event.id

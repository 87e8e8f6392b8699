"""A screen of records in one table under a `/` filter box (jobs, events, templates).

`/` opens the box; typing filters as you go (a substring; a leading `!` inverts); Enter keeps
the filter and goes back to the table; Esc clears it; Esc again leaves the screen.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from textual import on
from textual.screen import Screen
from textual.widgets import Input

from tui_app.event_batch import EventBatch
from tui_app.widgets.filter_input import FilterInput
from tui_app.widgets.inventory_tree import InventoryFilter
from tui_app.widgets.record_table import RecordTable

if TYPE_CHECKING:
    from backend.api.types import EventRecord, JobInfo, StatusTree
    from tui_app.app import SysvmApp


class FilteredTableScreen(Screen[None]):
    """Subclasses compose one FilterInput and one RecordTable, read their records in `_load`,
    follow the engine in `_on_snapshot` / `_on_event`, and redraw in `_rebuild`."""

    def __init__(self) -> None:
        super().__init__()
        self._filter = InventoryFilter()
        self._batch = EventBatch(self, self._apply_live)

    def _apply_live(self, events: list[EventRecord]) -> None:
        """A frame's engine events, unless the screen is being taken down: its widgets are
        removed before its timers stop, so a last batch may still come when the table is gone."""
        if self.query(RecordTable):
            self._apply_events(events)

    def _apply_events(self, events: list[EventRecord]) -> None:
        raise NotImplementedError

    @property
    def sysvm(self) -> SysvmApp:
        return self.app  # type: ignore[return-value]

    @property
    def table(self) -> RecordTable:
        return self.query_one(RecordTable)

    def on_mount(self) -> None:
        self.table.focus()
        self.sysvm.add_engine_listener(self._on_snapshot, self._on_event)
        self._load()

    def on_unmount(self) -> None:
        self.sysvm.remove_engine_listener(self._on_snapshot, self._on_event)

    def _load(self) -> object:
        """Start reading the records (a worker)."""
        raise NotImplementedError

    def _on_snapshot(self, status: StatusTree, jobs: list[JobInfo]) -> None:
        raise NotImplementedError

    def _on_event(self, event: EventRecord) -> None:
        raise NotImplementedError

    def _rebuild(self) -> None:
        raise NotImplementedError

    def filter_matches(self, words: Iterable[object]) -> bool:
        """Does a record with these words pass the filter?"""
        f = self._filter
        if not f.active:
            return True
        hit = f.needle in " ".join(str(w) for w in words).lower()
        return hit != f.inverted

    def action_filter(self) -> None:
        self.query_one(FilterInput).open()

    @on(Input.Changed, "FilterInput")
    def _filter_changed(self, event: Input.Changed) -> None:
        new = InventoryFilter.parse(event.value)
        if new != self._filter:
            self._filter = new
            self._rebuild()

    @on(FilterInput.Cleared)
    @on(FilterInput.Kept)
    def _filter_done(self) -> None:
        self.table.focus()

    def action_back(self) -> None:
        """Esc: clear a filter first, then go back."""
        box = self.query_one(FilterInput)
        if box.value:
            box.action_clear_filter()
        else:
            self.app.pop_screen()

"""The main screen: inventory tree on the left, details on the right, running jobs below."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input, Static, Tree

from tui_app.widgets.activity_strip import ActivityStrip
from tui_app.widgets.details_pane import DetailsPane
from tui_app.widgets.filter_input import FilterInput
from tui_app.widgets.inventory_tree import InventoryItem, InventoryTree
from tui_app.widgets.title_bar import TitleBar

if TYPE_CHECKING:
    from backend.api.types import EventRecord, JobInfo, StatusTree
    from tui_app.app import SysvmApp


EMPTY_HINT = "No zones yet. Build a lab with `sysvm lab up`, or add a zone."


class MainScreen(Screen[None]):
    """Zones, system VMs and networks, live; `/` filters, `?` lists the keys."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter", id="main.filter"),
        Binding("escape", "back", "Back", show=False, id="main.back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._refetch_pending = False
        self._completed: set[tuple[str, str]] = set()  # items a refetch was already made for

    @property
    def sysvm(self) -> SysvmApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        app = self.sysvm
        yield TitleBar(app.title, read_only=app.read_only, id="title-bar")
        yield Static(id="banner")
        with Horizontal(id="body"):
            with Vertical(id="tree-column"):
                yield FilterInput(id="filter")
                yield Static(EMPTY_HINT, id="empty-hint")
                yield InventoryTree(ascii=app.ascii, id="inventory")
            yield DetailsPane(ascii=app.ascii, id="details")
        yield ActivityStrip(ascii=app.ascii, id="activity")
        yield Footer()

    def on_mount(self) -> None:
        self._tree = self.query_one("#inventory", InventoryTree)
        self._strip = self.query_one("#activity", ActivityStrip)
        self._tree.focus()
        self.watch(self.app, "connected", self._show_connection)
        self.sysvm.add_engine_listener(self.on_snapshot, self.on_engine_event)

    def on_unmount(self) -> None:
        self.sysvm.remove_engine_listener(self.on_snapshot, self.on_engine_event)

    @property
    def inventory(self) -> InventoryTree:
        return self._tree

    # -- engine -----------------------------------------------------------------------------

    def on_snapshot(self, status: StatusTree, jobs: list[JobInfo]) -> None:
        self._tree.apply_status(status)
        self._strip.load(jobs)

    def on_engine_event(self, event: EventRecord) -> None:
        """Called for every engine event (thousands a second): only queue it."""
        if event.entity == "job":
            self._strip.queue_event(event)
        else:
            self._tree.queue_event(event)

    def _show_connection(self, connected: bool | None) -> None:
        banner = self.query_one("#banner", Static)
        down = connected is False
        banner.set_class(down, "-shown")
        if down:
            dash, dots = ("-", "...") if self.sysvm.ascii else ("—", "…")
            banner.update(f"engine disconnected {dash} reconnecting{dots}")
            banner.tooltip = self.sysvm.disconnect_reason or None

    @on(InventoryTree.NeedsStatus)
    def _refetch_status(self) -> None:
        """An event named something the tree cannot place: read status once more (debounced)."""
        if not self._refetch_pending:
            self._refetch_pending = True
            self.set_timer(0.25, self._start_refetch)

    def _start_refetch(self) -> None:
        self.run_worker(self._refetch(), group="refetch", exit_on_error=False)

    async def _refetch(self) -> None:
        self._refetch_pending = False
        try:
            status = await self.sysvm.api.status()
        except Exception as exc:
            self.sysvm.report_engine_error(exc)
            return
        self.inventory.apply_status(status)

    # -- tree, details, title ---------------------------------------------------------------

    @on(Tree.NodeHighlighted, "#inventory")
    def _highlighted(self, event: Tree.NodeHighlighted[InventoryItem]) -> None:
        item = event.node.data
        self.query_one("#details", DetailsPane).show(item)
        if item is not None and item.incomplete and item.key not in self._completed:
            self._completed.add(item.key)
            self._refetch_status()

    @on(InventoryTree.Changed)
    def _tree_changed(self, event: InventoryTree.Changed) -> None:
        details = self.query_one("#details", DetailsPane)
        shown = details.item
        if shown is not None and event.control.item(*shown.key) is not shown:
            details.show(None)  # it was removed
        else:
            details.refresh_if_showing(event.items)
        tree = event.control
        self.query_one("#title-bar", TitleBar).set_counts(tree.counts())
        self.query_one("#empty-hint").set_class(tree.loaded and not tree.zones, "-shown")
        tree.ensure_cursor()

    # -- filter -----------------------------------------------------------------------------

    def action_filter(self) -> None:
        self.query_one("#filter", FilterInput).open()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.inventory.set_filter(event.value)

    @on(FilterInput.Cleared)
    def _filter_cleared(self) -> None:
        self.inventory.set_filter("")
        self.inventory.focus()

    @on(FilterInput.Kept)
    def _filter_kept(self) -> None:
        self.inventory.focus()

    def action_back(self) -> None:
        """Esc: clear an active filter, else move up to the parent node."""
        box = self.query_one("#filter", FilterInput)
        if box.value:
            box.action_clear_filter()
        else:
            self.inventory.action_cursor_parent()

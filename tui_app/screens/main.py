"""The main screen: inventory tree on the left, details on the right, running jobs below.

Object actions (`s` start/stop, `r` reboot, `D` destroy, `m` migrate, `x` restart network,
`e` router rules) act on the object under the cursor; keys that do not apply to it leave the
footer, and in read-only mode the mutating ones are gone altogether.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Input, Static, Tree

from tui_app import object_actions as actions
from tui_app.object_actions import ActionRequest, NotNow, applies, describe
from tui_app.screens.confirm import ConfirmScreen
from tui_app.screens.console_info import ConsoleInfoScreen
from tui_app.screens.host_picker import HostChoice, HostPickerScreen
from tui_app.widgets.activity_strip import ActivityStrip
from tui_app.widgets.details_pane import DetailsPane
from tui_app.widgets.filter_input import FilterInput
from tui_app.widgets.fitting_footer import FittingFooter
from tui_app.widgets.inventory_tree import (
    GROUP,
    HOST,
    NETWORK,
    ROUTER,
    SYSTEM_VM,
    ZONE,
    InventoryItem,
    InventoryTree,
    system_vms_on,
)
from tui_app.widgets.title_bar import TitleBar

if TYPE_CHECKING:
    from backend.api.types import EventRecord, JobInfo, StatusTree
    from tui_app.app import SysvmApp


EMPTY_HINT = "No zones yet. Build a lab with `sysvm lab up`, or add a zone."
COUNTS_SECONDS = 0.2
REPLACED = {
    "ssvm": "The zone's reconciler starts a new SSVM in its place.",
    "cpvm": "The zone's reconciler starts a new CPVM in its place.",
}


class MainScreen(Screen[None]):
    """Zones, system VMs and networks, live; `/` filters, `:` goes anywhere, `?` lists keys."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter", id="main.filter"),
        Binding("escape", "back", "Back", show=False, id="main.back"),
        Binding("s", "start_stop", "Start/stop", id="object.start_stop"),
        Binding("r", "reboot", "Reboot", id="object.reboot"),
        Binding("D", "destroy", "Destroy", id="object.destroy"),
        Binding("m", "migrate", "Migrate", id="object.migrate"),
        Binding("x", "restart_network", "Restart net", id="object.restart_network"),
        Binding("e", "edit_rules", "Rules", id="object.edit_rules"),
        Binding("c", "console", "Console", id="object.console"),
        Binding("t", "templates", "Templates", show=False, id="main.templates"),
        Binding("J", "scroll_details(3)", "Details down", show=False, id="main.details_down"),
        Binding("K", "scroll_details(-3)", "Details up", show=False, id="main.details_up"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._refetch_pending = False
        self._completed: set[tuple[str, str]] = set()  # items a refetch was already made for
        self._shown_actions: tuple[str, ...] = ()
        self._counts_pending = False
        self.status_rereads = 0  # times an event could not be placed without reading status
        self.listing_help = False

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
            yield DetailsPane(ascii=app.ascii, clock=app.clock, id="details")
        yield ActivityStrip(ascii=app.ascii, id="activity")
        yield FittingFooter()

    def on_mount(self) -> None:
        self._tree = self.query_one("#inventory", InventoryTree)
        self._strip = self.query_one("#activity", ActivityStrip)
        self._details = self.query_one("#details", DetailsPane)
        self._tree.focus()
        self.watch(self.app, "connected", self._show_connection)
        self.sysvm.add_engine_listener(self.on_snapshot, self.on_engine_event)

    def on_unmount(self) -> None:
        self.sysvm.remove_engine_listener(self.on_snapshot, self.on_engine_event)

    @property
    def inventory(self) -> InventoryTree:
        return self._tree

    @property
    def details(self) -> DetailsPane:
        return self._details

    @property
    def strip(self) -> ActivityStrip:
        return self._strip

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
            if event.entity == "system_vm":
                self._details.note_event(event)

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
        self.status_rereads += 1
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
        self._details.show(item)
        if item is not None and item.incomplete and item.key not in self._completed:
            self._completed.add(item.key)
            self._refetch_status()
        self._refresh_action_keys()

    @on(InventoryTree.Changed)
    def _tree_changed(self, event: InventoryTree.Changed) -> None:
        details = self._details
        shown = details.item
        if shown is not None and event.control.item(*shown.key) is not shown:
            details.show(None)  # it was removed
        else:
            details.refresh_if_showing(event.items)
        tree = event.control
        if not self._counts_pending:
            # Counting walks every item: at most a few times a second, not once per batch.
            self._counts_pending = True
            self.set_timer(COUNTS_SECONDS, self._update_counts)
        self.query_one("#empty-hint").set_class(tree.loaded and not tree.zones, "-shown")
        tree.ensure_cursor()
        self._refresh_action_keys()

    def _update_counts(self) -> None:
        self._counts_pending = False
        self.query_one("#title-bar", TitleBar).set_counts(self._tree.counts())

    def _refresh_action_keys(self) -> None:
        """Redraw the footer only when the set of keys that apply here changes."""
        item = self._tree.selected
        shown = tuple(a for a in sorted(actions.OBJECT_ACTIONS) if applies(a, item))
        if shown != self._shown_actions:
            self._shown_actions = shown
            self.refresh_bindings()

    # -- object actions ---------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in actions.OBJECT_ACTIONS:
            return self.sysvm.gate(self, action, applies(action, self._selected()))
        return True

    def _selected(self) -> InventoryItem | None:
        tree = getattr(self, "_tree", None)
        return tree.selected if tree is not None else None

    def _submit(self, make: ActionRequest | None) -> None:
        if make is not None:
            self.sysvm.submit(make.words, make.call)

    def _request(self, build: object, item: InventoryItem) -> ActionRequest | None:
        try:
            return build(item)  # type: ignore[operator,no-any-return]
        except NotNow as exc:
            self.app.notify(str(exc), title="not now", severity="warning", timeout=5)
            return None

    def action_start_stop(self) -> None:
        item = self._selected()
        if applies(actions.START_STOP, item):
            assert item is not None
            self._submit(self._request(actions.start_stop, item))

    def action_reboot(self) -> None:
        item = self._selected()
        if applies(actions.REBOOT, item):
            assert item is not None
            self._submit(self._request(actions.reboot, item))

    def action_destroy(self) -> None:
        item = self._selected()
        if not applies(actions.DESTROY, item):
            return
        assert item is not None
        request = actions.destroy(item)
        vm_type = str(item.data.get("type", ""))
        if item.kind == ROUTER:
            detail = "While guest VMs run on its network, the reconciler makes a new router."
        elif item.kind == SYSTEM_VM:
            detail = REPLACED.get(vm_type, "")
        else:
            detail = "Its disk and address are released."
        question = f"Destroy {describe(item)} in {item.zone}?"

        def answered(yes: bool | None) -> None:
            if yes:
                self._submit(request)

        self.app.push_screen(ConfirmScreen(question, detail, verb="Destroy"), answered)

    def action_migrate(self) -> None:
        item = self._selected()
        if not applies(actions.MIGRATE, item):
            return
        assert item is not None
        current = item.data.get("host")
        choices = [
            HostChoice(h.name, system_vms_on(h))
            for h in self._zone_hosts(item.zone)
            if h.state == "Up" and h.name != current
        ]
        choices.sort(key=lambda c: (c.system_vms, c.name))

        def chosen(host: str | None) -> None:
            if host is not None:
                self._submit(actions.migrate(item, host))

        self.app.push_screen(HostPickerScreen(item.name, current, choices), chosen)

    def action_restart_network(self) -> None:
        item = self._selected()
        if not applies(actions.RESTART_NETWORK, item):
            return
        assert item is not None
        request = actions.restart_network(item)
        network = actions.network_name(item)
        net_item = self._tree.item("network", network)
        router = (
            next((c for c in net_item.children if c.kind == ROUTER), None) if net_item else None
        )
        detail = (
            f"Its router {router.name} is destroyed and a new one is made."
            if router is not None
            else "A new router is made."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self._submit(request)

        self.app.push_screen(
            ConfirmScreen(f"Restart network {network} with cleanup?", detail, verb="Restart"),
            answered,
        )

    def action_edit_rules(self) -> None:
        item = self._selected()
        if applies(actions.EDIT_RULES, item):
            assert item is not None
            self.sysvm.open_rules(actions.network_name(item))

    def action_console(self) -> None:
        item = self._selected()
        if applies(actions.CONSOLE, item):
            assert item is not None
            self.run_worker(self._show_console(item.name), group="console", exclusive=True)

    async def _show_console(self, name: str) -> None:
        try:
            where = await self.sysvm.api.console(name)
        except Exception as exc:  # shown in words, never as a traceback
            self.sysvm.report_engine_error(exc, f"console of {name}")
            return
        self.app.push_screen(ConsoleInfoScreen(where))

    def _zone_hosts(self, zone: str) -> list[InventoryItem]:
        group = self._tree.item(GROUP, f"{zone}/hosts")
        return [h for h in group.children if h.kind == HOST] if group is not None else []

    def action_templates(self) -> None:
        self.sysvm.show_view("templates")

    def action_scroll_details(self, lines: int) -> None:
        self._details.scroll_relative(y=lines, animate=False)

    # -- going places -----------------------------------------------------------------------

    def jump_to(self, item: InventoryItem) -> None:
        """Put the cursor on `item`, clearing a filter that hides it."""
        tree = self._tree
        if item.node is None and tree.filter_text:
            self.query_one("#filter", FilterInput).action_clear_filter()
            tree.set_filter("")
        tree.jump_to(item)
        tree.focus()

    def show_only(self, text: str) -> None:
        """Filter the tree to `text`, as if typed after `/` and kept with Enter."""
        box = self.query_one("#filter", FilterInput)
        box.value = text
        box.add_class("-open")
        self._tree.set_filter(text)
        self._tree.focus()

    def find_router(self, network: str) -> InventoryItem | None:
        net = self._tree.item(NETWORK, network) or self._tree.find(network)
        if net is None or net.kind != NETWORK:
            return None
        return next((c for c in net.children if c.kind == ROUTER), None)

    def find_network(self, name: str) -> str | None:
        """The name of network `name`, or of the network whose router is `name`."""
        item = self._tree.item(NETWORK, name) or self._tree.find(name)
        if item is not None and item.kind == ROUTER and item.parent is not None:
            item = item.parent
        return item.name if item is not None and item.kind == NETWORK else None

    def find_zone(self, name: str) -> InventoryItem | None:
        zone = self._tree.item(ZONE, name)
        if zone is None:
            found = self._tree.find(name)
            zone = found if found is not None and found.kind == ZONE else None
        return zone

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

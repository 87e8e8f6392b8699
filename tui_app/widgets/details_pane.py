"""The right-hand pane: everything about the selected object, scrollable to fit 80x24.

For a system VM it asks the engine (`system_vm(name)`) for what the status tree lacks (NICs,
boot args, start time, last error) and the VM's recent events; answers are cached and read
again when one of the VM's events arrives. Live state always comes from the tree's item.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer

from backend.errors import NotFound
from tui_app.widgets.inventory_tree import (
    GROUP,
    GUEST_VM,
    HOST,
    NETWORK,
    ROUTER,
    SYSTEM_VM,
    ZONE,
    InventoryItem,
    system_vms_on,
)
from tui_app.widgets.state_badge import state_prefix, state_text

if TYPE_CHECKING:
    from backend.api.types import EventRecord
    from tui_app.app import SysvmApp

NONE = Text("-", style="dim")
VM_KINDS = frozenset({SYSTEM_VM, ROUTER})
WIDE = 46  # from this many columns a NIC fits on one line


@dataclass
class VmDetails:
    """What the engine said about one system VM, and its last few events."""

    details: dict[str, Any] | None = None
    events: deque[EventRecord] = field(default_factory=lambda: deque(maxlen=5))
    stale: bool = True
    events_loaded: bool = False
    missing: str = ""


class DetailsPane(ScrollView, can_focus=True):
    """Name, state, placement, NICs, boot args and recent events of the selected item.

    It renders its lines itself (like Textual's Log) rather than holding a Static, so a new
    item costs a repaint of the pane, not a layout of the whole screen: the virtual height
    only changes when the text outgrows the pane."""

    DEFAULT_CSS = """
    DetailsPane {
        height: 1fr;
        padding: 0 1;
        overflow-x: hidden;
        scrollbar-size-vertical: 1;
        scrollbar-gutter: stable;
    }
    """
    # overflow-x: lines are rendered at the pane's width, so there is nothing to scroll sideways
    # (only between a narrowing resize and the repaint is the old, wider text still there).

    FETCH_DELAY = 0.15
    """Seconds the cursor must rest on a VM (or its events settle) before the engine is asked."""
    EVENT_SCAN = 500
    """How many of the newest system VM events are read to find one VM's recent ones."""
    CACHE_SIZE = 256

    def __init__(self, *, ascii: bool = False, clock: bool = True, id: str | None = None) -> None:
        super().__init__(id=id)
        self.ascii = ascii
        self.clock = clock
        self.item: InventoryItem | None = None
        self.border_title = "Details"
        self.fetches = 0
        self._cache: OrderedDict[str, VmDetails] = OrderedDict()
        self._fetch_timer: Timer | None = None
        self._lines: list[Strip] = []
        self._lines_width = 0

    def on_mount(self) -> None:
        self.show(None)
        if self.clock:
            self.set_interval(1.0, self._tick)

    def on_resize(self) -> None:
        self._paint()

    # -- what is shown ------------------------------------------------------------------------

    def show(self, item: InventoryItem | None) -> None:
        """Show `item` (None: a hint how to pick one); a VM's details are fetched soon."""
        if item is not self.item:
            self.scroll_home(animate=False)
        self.item = item
        self._paint()
        if item is not None and item.kind in VM_KINDS:
            entry = self._cache.get(item.name)
            if entry is None or entry.stale:
                self._schedule_fetch()

    def refresh_if_showing(self, items: frozenset[InventoryItem]) -> None:
        """Re-render if the shown item (or, for containers, a child) is among `items`."""
        item = self.item
        if item is None:
            return
        if item in items or any(child in items for child in item.children):
            self._paint()

    def note_event(self, event: EventRecord) -> None:
        """A system VM event: remember it with that VM and read the VM again if it is shown."""
        entry = self._cache.get(event.name)
        if entry is not None:
            if not entry.events or entry.events[-1].id < event.id:
                entry.events.append(event)
            entry.stale = True
        item = self.item
        if item is not None and item.kind in VM_KINDS and item.name == event.name:
            self._schedule_fetch()

    def cached(self, name: str) -> VmDetails | None:
        """What is known of system VM `name` (for tests and the host picker)."""
        return self._cache.get(name)

    # -- fetching -----------------------------------------------------------------------------

    def _schedule_fetch(self) -> None:
        if self._fetch_timer is None:
            self._fetch_timer = self.set_timer(self.FETCH_DELAY, self._start_fetch)

    def _start_fetch(self) -> None:
        self._fetch_timer = None
        item = self.item
        if item is not None and item.kind in VM_KINDS:
            self.run_worker(
                self._fetch(item.name), group="details", exclusive=True, exit_on_error=False
            )

    async def _fetch(self, name: str) -> None:
        app: SysvmApp = self.app  # type: ignore[assignment]
        entry = self._cache.get(name) or VmDetails()
        self._cache[name] = entry
        self._cache.move_to_end(name)
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        entry.stale = False
        try:
            details = await app.api.system_vm(name)
            if not entry.events_loaded:
                backlog = await app.api.events(limit=self.EVENT_SCAN, entity="system_vm")
                known = {e.id for e in entry.events}
                mine = [e for e in backlog if e.name == name and e.id not in known]
                merged = sorted([*mine, *entry.events], key=lambda e: e.id)
                entry.events.clear()
                entry.events.extend(merged)
                entry.events_loaded = True
        except NotFound as exc:
            entry.details, entry.missing = None, str(exc)
        except Exception as exc:
            entry.stale = True
            app.report_engine_error(exc)
            return
        else:
            entry.details, entry.missing = details, ""
        self.fetches += 1
        if self.item is not None and self.item.name == name:
            self._paint()

    def _tick(self) -> None:
        """Once a second: the uptime of a shown running VM moves on."""
        item = self.item
        if item is not None and item.kind in VM_KINDS and item.state == "Running":
            self._paint()

    # -- rendering ----------------------------------------------------------------------------

    @property
    def content_width(self) -> int:
        return max(16, self.scrollable_content_region.width)

    @property
    def text_lines(self) -> list[str]:
        """The pane's whole text, line by line (also what is scrolled out of view)."""
        return [strip.text for strip in self._lines]

    def _paint(self) -> None:
        if not self.is_mounted:
            return
        width = self.scrollable_content_region.width
        if width <= 0:
            return  # not laid out yet; on_resize paints
        console = self.app.console
        options = console.options.update_width(width).update(height=None, highlight=False)
        segments = console.render(self.render_item(self.item), options)
        self._lines = [
            Strip(line).adjust_cell_length(width) for line in Segment.split_lines(segments)
        ]
        self._lines_width = width
        height = max(len(self._lines), self.scrollable_content_region.height)
        if self.virtual_size != Size(width, height):
            self.virtual_size = Size(width, height)
            # Textual decides a ScrollView's scrollbars again only when its region changes, not
            # when its virtual size does, and text that fits gives the very size of the region:
            # a scrollbar shown for a longer item would stay (full thumb, the gutter in its colour).
            self._scroll_update(self.virtual_size)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        index = scroll_y + y
        if index >= len(self._lines):
            return Strip.blank(width, self.rich_style)
        line = self._lines[index].crop_extend(scroll_x, scroll_x + width, self.rich_style)
        return line.apply_style(self.rich_style)

    def render_item(self, item: InventoryItem | None) -> RenderableType:
        if item is None:
            return Text("Select an object in the tree.", style="dim")
        title = Text(item.name, style="bold", overflow="fold")
        if item.kind in VM_KINDS:
            return Group(title, *self._vm_parts(item))
        return Group(title, _grid(self._plain_rows(item)))

    def _plain_rows(self, item: InventoryItem) -> list[tuple[str, Any]]:
        d = item.data
        if item.kind == ZONE:
            groups = {g.data.get("group"): g.children for g in item.children}
            hosts = groups.get("hosts", [])
            svms = groups.get("system_vms", [])
            nets = groups.get("networks", [])
            guests = [c for n in nets for c in n.children if c.kind == GUEST_VM]
            return [
                ("type", "zone"),
                ("state", self._state(item.state)),
                ("hosts", _up_of(hosts, "Up")),
                ("system VMs", _up_of(svms, "Running", "running")),
                ("networks", str(len(nets))),
                ("guest VMs", _up_of(guests, "Running", "running")),
            ]
        if item.kind == GROUP:
            return [("zone", item.zone), ("objects", str(len(item.children)))]
        if item.kind == HOST:
            return [
                ("type", "host"),
                ("state", self._state(item.state)),
                ("zone", item.zone),
                ("system VMs", str(system_vms_on(item))),
                ("uri", Text(str(d.get("uri") or "-"), overflow="fold")),
            ]
        if item.kind == NETWORK:
            router = next((c for c in item.children if c.kind == ROUTER), None)
            vms = [c for c in item.children if c.kind == GUEST_VM]
            return [
                ("type", "guest network"),
                ("cidr", d.get("cidr")),
                ("zone", item.zone),
                ("router", self._router(router)),
                ("guest VMs", _up_of(vms, "Running", "running")),
            ]
        if item.kind == GUEST_VM:
            return [
                ("type", "guest VM"),
                ("state", self._state(item.state)),
                ("ip", d.get("ip")),
                ("network", item.parent.name if item.parent else None),
                ("zone", item.zone),
            ]
        return [("type", item.kind)]

    def _vm_parts(self, item: InventoryItem) -> list[RenderableType]:
        d = item.data
        entry = self._cache.get(item.name)
        full = entry.details if entry is not None and entry.details is not None else {}
        rows: list[tuple[str, Any]] = [
            ("type", item.type_word),
            ("state", self._state(item.state)),
            ("zone", item.zone),
            ("host", d.get("host") or full.get("host")),
            ("control IP", d.get("control_ip") or full.get("control_ip")),
        ]
        if item.kind == ROUTER and item.parent is not None:
            rows.append(("network", item.parent.name))
            rows.append(("rules", _rules_state(d)))
        if self.clock:
            rows.append(("uptime", _uptime(full.get("started_at"), item.state)))
        error = full.get("last_error") or d.get("last_error")
        rows.append(("last error", Text(str(error), style="red") if error else None))
        parts: list[RenderableType] = [_grid(rows)]
        if entry is None or (entry.details is None and not entry.missing):
            parts.append(Text("reading details...", style="dim"))
            return parts
        if entry.missing:
            parts.append(Text(entry.missing, style="dim"))
            return parts
        parts += [_heading("NICs"), self._nics(full.get("nics") or [])]
        parts += [_heading("Recent events"), self._events(entry)]
        parts += [_heading("Boot args"), _boot_args(full.get("boot_args"))]
        return parts

    def _nics(self, nics: list[dict[str, Any]]) -> RenderableType:
        if not nics:
            return NONE
        if self.content_width >= WIDE:
            table = Table.grid(padding=(0, 1))
            for _ in range(4):
                table.add_column(no_wrap=True)
            for n in nics:
                table.add_row(n["device"], n["role"], n["ip"] or "-", Text(n["mac"], style="dim"))
            return table
        lines = Text()
        for i, n in enumerate(nics):
            if i:
                lines.append("\n")
            lines.append(f"{n['device']} ", style="bold").append(str(n["role"]))
            lines.append(f"\n  {n['ip'] or '-'}").append(f"\n  {n['mac']}", style="dim")
        return lines

    def _events(self, entry: VmDetails) -> RenderableType:
        if not entry.events:
            return NONE
        out = Text()
        for i, e in enumerate(entry.events):
            if i:
                out.append("\n")
            when = e.ts[11:19] if self.clock else f"#{e.id}"
            out.append(when + " ", style="dim")
            f = e.fields
            state = f.get("state")
            if e.kind == "created":
                out.append("created")
                if state:
                    out.append(" (").append_text(state_text(state)).append(")")
            elif state:
                out.append_text(state_text(state))
            else:
                out.append(e.kind)
            if f.get("host") and e.kind != "created":
                out.append(f" on {f['host']}")
            if f.get("last_error"):
                out.append(f" {f['last_error']}", style="red")
        return out

    def _state(self, state: str | None) -> Text:
        return Text.assemble(state_prefix(state, ascii=self.ascii), state_text(state))

    def _router(self, router: InventoryItem | None) -> Text:
        if router is None:
            return Text("none yet", style="dim")
        return Text.assemble(router.name, " ", self._state(router.state))


def _rules_state(router: dict[str, Any]) -> Text:
    """Whether what the router has live is what was applied, in words (`e` edits, `A` applies)."""
    if router.get("drift"):
        return Text("drift: e, then A", style="bold red")
    return Text("no drift seen", style="dim")


def _grid(rows: list[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, NONE if value is None or value == "" else value)
    return table


def _heading(words: str) -> Text:
    return Text(f"\n{words}", style="bold")


def _boot_args(args: Any) -> RenderableType:
    if not args:
        return NONE
    if isinstance(args, dict):
        words = [f"{k}={v}" for k, v in args.items()]
    else:
        words = str(args).split()
    return Text(" ".join(words), overflow="fold")


def _up_of(items: list[InventoryItem], good: str, word: str | None = None) -> str:
    up = sum(1 for i in items if i.state == good)
    if up == len(items):
        return str(len(items))
    return f"{len(items)} ({up} {word or good})"


def _uptime(started_at: str | None, state: str | None) -> str | None:
    """ "3m 12s", "2h 05m", "4d 03h" since `started_at` (UTC), for a running VM."""
    if state != "Running" or not started_at:
        return None
    try:
        started = datetime.fromisoformat(started_at)
    except ValueError:
        return None
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    seconds = max(0, int((datetime.now(UTC) - started).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"

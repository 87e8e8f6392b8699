"""The right-hand pane: what the status tree knows about the selected object."""

from __future__ import annotations

from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tui_app.widgets.inventory_tree import (
    GROUP,
    GUEST_VM,
    HOST,
    NETWORK,
    ROUTER,
    SYSTEM_VM,
    ZONE,
    InventoryItem,
)
from tui_app.widgets.state_badge import state_glyph, state_text

NONE = Text("-", style="dim")


class DetailsPane(Static):
    """Name, type, state, host and addresses of the selected item; refreshed when it changes."""

    DEFAULT_CSS = """
    DetailsPane {
        height: 1fr;
        padding: 0 1;
        overflow-y: auto;
    }
    """

    def __init__(self, *, ascii: bool = False, id: str | None = None) -> None:
        super().__init__(id=id)
        self.ascii = ascii
        self.item: InventoryItem | None = None
        self.border_title = "Details"

    def on_mount(self) -> None:
        self.show(None)

    def show(self, item: InventoryItem | None) -> None:
        """Show `item` (None: a hint how to pick one)."""
        self.item = item
        self.update(self._render_item(item))

    def refresh_if_showing(self, items: frozenset[InventoryItem]) -> None:
        """Re-render if the shown item (or, for containers, a child) is among `items`."""
        item = self.item
        if item is None:
            return
        if item in items or any(child in items for child in item.children):
            self.show(item)

    def _render_item(self, item: InventoryItem | None) -> RenderableType:
        if item is None:
            return Text("Select an object in the tree.", style="dim")
        rows: list[tuple[str, Any]] = [("name", Text(item.name, style="bold"))]
        d = item.data
        if item.kind == ZONE:
            counts = {g.data.get("group"): len(g.children) for g in item.children}
            rows += [
                ("type", "zone"),
                ("state", self._state(item.state)),
                ("hosts", str(counts.get("hosts", 0))),
                ("system VMs", str(counts.get("system_vms", 0))),
                ("networks", str(counts.get("networks", 0))),
            ]
        elif item.kind == GROUP:
            rows += [("zone", item.zone), ("objects", str(len(item.children)))]
        elif item.kind == HOST:
            rows += [
                ("type", "host"),
                ("state", self._state(item.state)),
                ("zone", item.zone),
                ("uri", d.get("uri")),
            ]
        elif item.kind in (SYSTEM_VM, ROUTER):
            rows += [
                ("type", item.type_word),
                ("state", self._state(item.state)),
                ("zone", item.zone),
                ("host", d.get("host")),
                ("control IP", d.get("control_ip")),
            ]
            if item.kind == ROUTER and item.parent is not None:
                rows.append(("network", item.parent.name))
            if d.get("last_error"):
                rows.append(("last error", Text(str(d["last_error"]), style="red")))
        elif item.kind == NETWORK:
            router = next((c for c in item.children if c.kind == ROUTER), None)
            vms = [c for c in item.children if c.kind == GUEST_VM]
            rows += [
                ("type", "guest network"),
                ("cidr", d.get("cidr")),
                ("zone", item.zone),
                ("router", self._router(router)),
                ("guest VMs", str(len(vms))),
            ]
        elif item.kind == GUEST_VM:
            rows += [
                ("type", "guest VM"),
                ("state", self._state(item.state)),
                ("ip", d.get("ip")),
                ("network", item.parent.name if item.parent else None),
                ("zone", item.zone),
            ]
        table = Table.grid(padding=(0, 1))
        table.add_column(style="dim", no_wrap=True)
        table.add_column(overflow="fold")
        for label, value in rows:
            if value is None or value == "":
                value = NONE
            table.add_row(label, value)
        return table

    def _state(self, state: str | None) -> Text:
        return Text.assemble(state_glyph(state, ascii=self.ascii), " ", state_text(state))

    def _router(self, router: InventoryItem | None) -> Text:
        if router is None:
            return Text("none yet", style="dim")
        return Text.assemble(router.name, " ", self._state(router.state))

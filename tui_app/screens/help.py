"""The `?` screen: every key that works on the screen below, read from its live bindings.

Because it is generated from the bindings in force (after the user's keymap), a remapped key
or a key removed in read-only mode shows up here as it really is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static


@dataclass(frozen=True)
class HelpEntry:
    """One action and every key bound to it, in one section (Tree, Main, Global ...)."""

    section: str
    keys: tuple[str, ...]
    description: str
    binding_ids: tuple[str, ...]


def collect_help(screen: Screen[object]) -> list[HelpEntry]:
    """The live bindings of `screen` (focused widget first, then screen, then app), merged so
    each action is listed once with all its keys."""
    app = screen.app
    merged: dict[tuple[str, str], tuple[list[str], Binding, list[str]]] = {}
    # Object actions that do not apply to the selected object are still listed: a screen
    # with `listing_help` set reports them as disabled instead of absent. Read-only mode
    # still removes them.
    listing = hasattr(screen, "listing_help")
    if listing:
        screen.listing_help = True  # type: ignore[attr-defined]
    try:
        active_bindings = screen.active_bindings
    finally:
        if listing:
            screen.listing_help = False  # type: ignore[attr-defined]
    for key, active in active_bindings.items():
        binding = active.binding
        if binding.system or not binding.description:
            continue
        section = _section_name(active.node, binding)
        display = app.get_key_display(binding.with_key(key))
        keys, _first, ids = merged.setdefault((section, binding.action), ([], binding, []))
        if display not in keys:
            keys.append(display)
        if binding.id and binding.id not in ids:
            ids.append(binding.id)
    entries = [
        HelpEntry(section, tuple(sorted(keys, key=len)), first.description, tuple(ids))
        for (section, _action), (keys, first, ids) in merged.items()
    ]
    order = {"Tree": 0, "Table": 0, "Objects": 1, "Console": 2, "Global": 3}
    entries.sort(key=lambda e: order.get(e.section, 1))
    return entries


def _section_table(name: str, entries: list[HelpEntry]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True, min_width=10)
    table.add_column(no_wrap=True)
    table.add_row(Text(name, style="bold underline"), "")
    for entry in entries:
        table.add_row(Text(" ".join(entry.keys), style="bold"), entry.description)
    return table


def _spaced(tables: list[Table]) -> list[RenderableType]:
    out: list[RenderableType] = []
    for table in tables:
        if out:
            out.append(Text(""))
        out.append(table)
    return out


def _section_name(node: object, binding: Binding) -> str:
    from textual.app import App
    from textual.screen import Screen as _Screen

    if isinstance(node, App):
        return "Global"
    if binding.id and binding.id.startswith("object."):
        return "Objects"
    if isinstance(node, _Screen):
        return "Console"
    name = type(node).__name__
    return {"InventoryTree": "Tree", "RecordTable": "Table", "RuleTable": "Table"}.get(name, name)


class HelpScreen(Screen[None]):
    """Keys of the screen below, grouped by where they act."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Back", id="help.back"),
        Binding("question_mark", "close", "Close help", id="help.close"),
        Binding("q", "close", "Close help", show=False, id="help.close_q"),
        Binding("j,down", "scroll(1)", "Scroll", show=False, id="help.scroll_down"),
        Binding("k,up", "scroll(-1)", "Scroll", show=False, id="help.scroll_up"),
    ]

    DEFAULT_CSS = """
    HelpScreen {
        & > #help-body { padding: 0 1; }
        & #help-title { text-style: bold; margin-bottom: 1; }
    }
    """

    def __init__(self, entries: list[HelpEntry], *, title: str = "sysvm") -> None:
        super().__init__()
        self.entries = entries
        self.app_title = title

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static(f"{self.app_title}: keys", id="help-title")
            yield Static(id="help-table")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self._paint()

    def on_resize(self) -> None:
        self._paint()

    def _paint(self) -> None:
        sections: dict[str, list[HelpEntry]] = {}
        for entry in self.entries:
            sections.setdefault(entry.section, []).append(entry)
        tables = [_section_table(name, entries) for name, entries in sections.items()]
        body: RenderableType
        if len(tables) > 1 and self.size.width >= 70:
            # The biggest section on the left, the others stacked on the right.
            layout = Table.grid(padding=(0, 4))
            layout.add_row(tables[0], Group(*_spaced(tables[1:])))
            body = layout
        else:
            body = Group(*_spaced(tables))
        self.query_one("#help-table", Static).update(body)

    def action_close(self) -> None:
        self.app.pop_screen()

    def action_scroll(self, lines: int) -> None:
        self.query_one("#help-body", VerticalScroll).scroll_relative(y=lines, animate=False)

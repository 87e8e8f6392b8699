"""The one-line filter box that `/` opens above the inventory tree (and the jobs and events tables)."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import Input


class FilterInput(Input):
    """Typing filters as you go; Enter keeps the filter, Esc clears it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "clear_filter", "Clear filter", id="filter.clear"),
        Binding("enter", "keep_filter", "Keep filter", id="filter.keep"),
    ]

    DEFAULT_CSS = """
    FilterInput, FilterInput:focus {
        height: 1;
        border: none;
        padding: 0 1;
        display: none;
        background: $boost;
        &.-open { display: block; }
    }
    """

    class Cleared(Message):
        """Esc: the filter was emptied and the box closed."""

    class Kept(Message):
        """Enter: keep the filter and go back to the tree."""

    def __init__(
        self,
        *,
        placeholder: str = "filter: name, type, state, IP  (!x inverts, Esc clears)",
        id: str | None = None,
    ) -> None:
        super().__init__(placeholder=placeholder, id=id)

    def open(self) -> None:
        self.add_class("-open")
        self.focus()
        self.action_end()

    def action_clear_filter(self) -> None:
        self.value = ""
        self.remove_class("-open")
        self.post_message(self.Cleared())

    def action_keep_filter(self) -> None:
        if not self.value.strip():
            self.remove_class("-open")
        self.post_message(self.Kept())

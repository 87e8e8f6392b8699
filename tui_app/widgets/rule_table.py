"""The table of one rule type's rules on the router rules screen."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType

from tui_app.widgets.record_table import RecordTable


class RuleTable(RecordTable):
    """A record table whose Enter edits the rule; its moving keys stay out of the footer (the
    screen's own keys need the room at 80 columns)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Edit", show=False, id="rules_table.edit"),
        Binding("j", "cursor_down", "Move", show=False, id="rules_table.down_vi"),
    ]

"""Where a VM's console is: its VNC display and the commands that open it from this jump host.

A terminal cannot show a VM's screen, so `c` says where it is and how to get there (the engine's
`console` answer), or in words why there is none. Esc, Enter or q closes it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static


class ConsoleInfoScreen(ModalScreen[None]):
    """The engine's `console` answer for one VM, in words."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,q", "close", "Close", id="console.close"),
    ]

    DEFAULT_CSS = """
    ConsoleInfoScreen {
        align: center middle;
        & > #console-dialog {
            width: 76;
            max-width: 98%;
            height: auto;
            padding: 0 1;
            border: round $accent;
            border-title-style: bold;
            background: $surface;
        }
        & #console-where { margin: 1 0 0 0; }
        & #console-how { margin: 1 0 0 0; }
        & #console-hint { color: $text-muted; margin: 1 0 0 0; }
    }
    """

    def __init__(self, where: dict[str, Any]) -> None:
        super().__init__()
        self.where = where

    def compose(self) -> ComposeResult:
        where = self.where
        with Vertical(id="console-dialog") as dialog:
            dialog.border_title = f"Console of {where['vm']}"
            vnc = where.get("vnc")
            if vnc is None:
                yield Static(f"No console: {escape(str(where['reason']))}", id="console-where")
            else:
                yield Static(
                    f"VNC display [b]{vnc['listen']}:{vnc['port']}[/b] on host "
                    f"[b]{escape(str(where['host']))}[/b] ({escape(str(where['uri']))})",
                    id="console-where",
                )
                steps = "\n".join(f"  $ {escape(line)}" for line in where["connect"])
                yield Static(f"From this jump host:\n{steps}", id="console-how")
            yield Static("esc closes", id="console-hint")

    def action_close(self) -> None:
        self.dismiss(None)

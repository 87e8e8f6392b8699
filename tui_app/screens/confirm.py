"""A yes/no question about one object, asked before anything that cannot be undone."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    """ "Destroy SSVM s-4-VM?" — Enter or y confirms, Esc or n cancels (dismisses True/False)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter,y", "confirm", "Confirm", id="confirm.yes"),
        Binding("escape,n", "cancel", "Cancel", id="confirm.no"),
    ]

    DEFAULT_CSS = """
    ConfirmScreen {
        align: center middle;
        & > #confirm-dialog {
            width: 64;
            max-width: 95%;
            height: auto;
            padding: 0 1;
            border: round $error;
            border-title-color: $error;
            border-title-style: bold;
            background: $surface;
        }
        & #confirm-question { text-style: bold; margin: 1 0 0 0; }
        & #confirm-detail { color: $text-muted; margin: 1 0 0 0; }
        & #confirm-buttons { height: 1; margin: 1 0 0 0; }
        & #confirm-buttons > Button { margin-right: 2; }
    }
    """

    def __init__(self, question: str, detail: str = "", *, verb: str = "Confirm") -> None:
        super().__init__()
        self.question = question
        self.detail = detail
        self.verb = verb

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog") as dialog:
            dialog.border_title = self.verb
            yield Static(self.question, id="confirm-question")
            if self.detail:
                yield Static(self.detail, id="confirm-detail")
            with Horizontal(id="confirm-buttons"):
                yes = Button(self._label("confirm", self.verb), id="confirm-yes", compact=True)
                no = Button(self._label("cancel", "Cancel"), id="confirm-no", compact=True)
                for button in (yes, no):
                    button.can_focus = False  # keys answer, not focus: Enter is always "yes"
                    yield button

    def _label(self, action: str, words: str) -> str:
        """ "Destroy (enter/y)": the words and the keys really bound (after any keymap)."""
        keys = [
            self.app.get_key_display(b.binding.with_key(key))
            for key, b in self.active_bindings.items()
            if b.binding.action == action
        ]
        return f"{words} ({'/'.join(keys)})" if keys else words

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed, "#confirm-yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#confirm-no")
    def _no(self) -> None:
        self.dismiss(False)

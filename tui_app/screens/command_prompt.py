"""The `:` prompt: one input line at the bottom, completions above it; Esc cancels.

Tab completes to the highlighted completion (up/down move it); Enter runs the line as typed,
or the only completion when what was typed means nothing by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList
from textual.widgets.option_list import Option

from tui_app.command_line import BY_WORD, Completion, ObjectName, complete, parse

ObjectSource = Callable[[], list[ObjectName]]


class CommandInput(Input):
    """The prompt's input: Tab completes, up/down pick a completion."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("tab", "complete", "Complete", id="prompt.complete"),
        Binding("down", "pick(1)", "Next", show=False, id="prompt.next"),
        Binding("up", "pick(-1)", "Previous", show=False, id="prompt.previous"),
    ]

    def action_complete(self) -> None:
        screen = self.screen
        if isinstance(screen, CommandPromptScreen):
            screen.complete_line()

    def action_pick(self, step: int) -> None:
        screen = self.screen
        if isinstance(screen, CommandPromptScreen):
            screen.pick(step)


class CommandPromptScreen(ModalScreen[str | None]):
    """Dismisses with the line to run, or None (Esc, or an empty line)."""

    AUTO_FOCUS = "#prompt-input"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="prompt.cancel"),
    ]

    DEFAULT_CSS = """
    CommandPromptScreen {
        align: left bottom;
        background: $background 40%;
        & > #prompt-box {
            width: 100%;
            height: auto;
            background: $panel;
        }
        & #prompt-completions {
            height: auto;
            max-height: 10;
            border: none;
            padding: 0 1;
            background: $panel;
        }
        & #prompt-completions.-empty { display: none; }
        & #prompt-row { height: 1; padding: 0 0 0 1; }
        & #prompt-colon { width: 1; text-style: bold; }
        & #prompt-input, & #prompt-input:focus {
            height: 1;
            border: none;
            padding: 0;
            background: $panel;
        }
    }
    """

    def __init__(self, objects: ObjectSource, *, initial: str = "") -> None:
        super().__init__()
        self.objects = objects
        self.initial = initial
        self.completions: list[Completion] = []
        self._objects: list[ObjectName] | None = None

    @property
    def object_names(self) -> list[ObjectName]:
        """The objects that can be named, read once per prompt."""
        if self._objects is None:
            self._objects = self.objects()
        return self._objects

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt-box"):
            yield OptionList(id="prompt-completions")
            with Horizontal(id="prompt-row"):
                yield Label(":", id="prompt-colon")
                yield CommandInput(
                    value=self.initial,
                    placeholder="zone NAME, ssvm, cpvm, router NET, jobs, events, q, or a name",
                    id="prompt-input",
                )

    def on_mount(self) -> None:
        box = self.query_one("#prompt-input", CommandInput)
        box.focus()
        self._refresh_completions(box.value)

    def on_key(self, event: events.Key) -> None:
        """Keys typed right after `:`, before the input had the focus (type-ahead, a paste
        through tmux send-keys): they belong to the line all the same."""
        box = self.query_one("#prompt-input", CommandInput)
        if box.has_focus:
            return
        if event.key == "enter":
            event.stop()
            self.dismiss(self.resolve(box.value))
        elif event.is_printable and event.character:
            event.stop()
            box.insert_text_at_cursor(event.character)

    @property
    def line(self) -> str:
        return self.query_one("#prompt-input", CommandInput).value

    @on(Input.Changed, "#prompt-input")
    def _changed(self, event: Input.Changed) -> None:
        self._refresh_completions(event.value)

    def _refresh_completions(self, text: str) -> None:
        self.completions = complete(text, self.object_names)
        shown = self.query_one("#prompt-completions", OptionList)
        shown.clear_options()
        shown.add_options(
            Option(Text.assemble((c.text.rstrip(), "bold"), "  ", (c.hint, "dim")))
            for c in self.completions
        )
        shown.set_class(not self.completions, "-empty")
        if self.completions:
            shown.highlighted = 0

    def pick(self, step: int) -> None:
        shown = self.query_one("#prompt-completions", OptionList)
        if not self.completions:
            return
        current = shown.highlighted if shown.highlighted is not None else -step
        shown.highlighted = (current + step) % len(self.completions)

    def complete_line(self) -> None:
        """Replace the line with the highlighted completion."""
        shown = self.query_one("#prompt-completions", OptionList)
        if not self.completions:
            return
        index = shown.highlighted if shown.highlighted is not None else 0
        box = self.query_one("#prompt-input", CommandInput)
        box.value = self.completions[index].text
        box.action_end()

    @on(OptionList.OptionSelected, "#prompt-completions")
    def _clicked(self, event: OptionList.OptionSelected) -> None:
        box = self.query_one("#prompt-input", CommandInput)
        box.value = self.completions[event.option_index].text
        box.focus()
        box.action_end()

    @on(Input.Submitted, "#prompt-input")
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(self.resolve(event.value))

    def resolve(self, text: str) -> str | None:
        """The line to run: as typed if it means something, else the only completion."""
        text = text.strip()
        if not text:
            return None
        command = parse(text)
        names = {o.name.lower() for o in self.object_names}
        if command.word in BY_WORD or text.lower() in names:
            return text
        if len(self.completions) == 1:
            return self.completions[0].text.strip()
        return text

    def action_cancel(self) -> None:
        self.dismiss(None)

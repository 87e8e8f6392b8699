"""Where to migrate a system VM: the Up hosts of its zone, or "least loaded (auto)"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from tui_app.object_actions import AUTO_HOST

AUTO_OPTION = "--auto--"


@dataclass(frozen=True)
class HostChoice:
    """One Up host the VM could move to, and how loaded it is (system VMs placed on it)."""

    name: str
    system_vms: int


class HostPickerScreen(ModalScreen[str | None]):
    """Dismisses with a host name, AUTO_HOST ("") for the engine's choice, or None (Esc)."""

    AUTO_FOCUS = "#picker-hosts"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="picker.cancel"),
        Binding("j", "cursor(1)", "Down", show=False, id="picker.down"),
        Binding("k", "cursor(-1)", "Up", show=False, id="picker.up"),
    ]

    DEFAULT_CSS = """
    HostPickerScreen {
        align: center middle;
        & > #picker-dialog {
            width: 56;
            max-width: 95%;
            height: auto;
            max-height: 90%;
            padding: 0 1;
            border: round $accent;
            border-title-style: bold;
            background: $surface;
        }
        & #picker-question { margin: 1 0 1 0; }
        & OptionList, & OptionList:focus { border: none; height: auto; max-height: 12; padding: 0; }
        & #picker-keys { color: $text-muted; margin: 1 0 0 0; }
    }
    """

    def __init__(self, vm: str, current_host: str | None, hosts: list[HostChoice]) -> None:
        super().__init__()
        self.vm = vm
        self.current_host = current_host
        self.hosts = hosts

    def compose(self) -> ComposeResult:
        options = [Option(Text("least loaded (auto)", style="bold"), id=AUTO_OPTION)]
        for host in self.hosts:
            load = f"{host.system_vms} system VM" + ("" if host.system_vms == 1 else "s")
            options.append(Option(Text.assemble(host.name, "  ", (load, "dim")), id=host.name))
        with Vertical(id="picker-dialog") as dialog:
            dialog.border_title = f"Migrate {self.vm}"
            where = f"now on {self.current_host}" if self.current_host else "not placed"
            question = f"Move {self.vm} ({where}) to:"
            if not self.hosts:
                question += "\n(no other host of its zone is Up)"
            yield Static(question, id="picker-question")
            yield OptionList(*options, id="picker-hosts")
            yield Static("Enter: migrate   Esc: cancel", id="picker-keys")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def on_key(self, event: events.Key) -> None:
        """Enter typed right after `m`, before the list had the focus: take the highlighted."""
        hosts = self.query_one(OptionList)
        if event.key == "enter" and not hosts.has_focus and hosts.highlighted is not None:
            event.stop()
            choice = hosts.get_option_at_index(hosts.highlighted).id
            self.dismiss(AUTO_HOST if choice in (AUTO_OPTION, None) else choice)

    def action_cursor(self, step: int) -> None:
        hosts = self.query_one(OptionList)
        if step > 0:
            hosts.action_cursor_down()
        else:
            hosts.action_cursor_up()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        choice = event.option.id
        self.dismiss(AUTO_HOST if choice == AUTO_OPTION or choice is None else choice)

    def action_cancel(self) -> None:
        self.dismiss(None)

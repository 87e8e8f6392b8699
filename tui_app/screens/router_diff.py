"""What the next apply would change on a network's router: desired rules vs the applied version,
and whether what is live still matches that version (drift). Esc or Enter closes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from tui_app.rule_forms import summary

if TYPE_CHECKING:
    from tui_app.app import SysvmApp

SIGNS = (("added", "+", "green"), ("removed", "-", "red"), ("changed", "~", "yellow"))


def diff_text(diff: dict[str, Any], shown: dict[str, Any]) -> Text:
    """The diff in words: one line per rule added (+), removed (-) or changed (~)."""
    out = Text()
    version = int(diff.get("from_version") or 0)
    live = shown.get("live_digest") or ""
    desired = "desired (stored) rules"
    applied = f"version {version} (applied)" if version else "nothing applied yet"
    out.append(f"{desired} vs {applied}\n", "bold")
    if shown.get("drift"):
        out.append("live differs from version ", "bold red")
        out.append(f"{version} (drift): the next apply puts it back\n", "bold red")
    elif live:
        out.append(f"live matches version {version} (digest {live[:12]})\n", "dim")
    lines = 0
    for key, sign, style in SIGNS:
        for entry in diff.get(key, []):
            rule = {**(entry.get("fields") or {}), "id": entry.get("id"), "type": entry.get("type")}
            out.append(f"{sign} {summary(rule)}\n", style)
            lines += 1
    if not lines:
        out.append("no changes since the last apply\n", "dim")
    out.rstrip()
    return out


class RouterDiffScreen(ModalScreen[None]):
    """The diff of one network's router rules, read when opened."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter", "close", "Close", id="diff.close"),
    ]

    DEFAULT_CSS = """
    RouterDiffScreen {
        align: center middle;
        & > #diff-dialog {
            width: 78;
            max-width: 100%;
            height: auto;
            max-height: 90%;
            border: round $accent;
            border-title-style: bold;
            background: $surface;
            padding: 0 1;
        }
        & #diff-scroll { height: auto; max-height: 18; }
    }
    """

    def __init__(self, network: str, shown: dict[str, Any]) -> None:
        super().__init__()
        self.network = network
        self.shown = shown
        self.diff: dict[str, Any] | None = None

    @property
    def sysvm(self) -> SysvmApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        with Vertical(id="diff-dialog") as dialog:
            dialog.border_title = f"Diff: {self.network}"
            with VerticalScroll(id="diff-scroll"):
                yield Static("reading the diff...", id="diff-body")
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self._load()

    @work(exclusive=True, exit_on_error=False)
    async def _load(self) -> None:
        body = self.query_one("#diff-body", Static)
        try:
            self.diff = await self.sysvm.api.router_diff(self.network)
        except Exception as exc:
            self.sysvm.report_engine_error(exc, f"diff {self.network}")
            body.update(Text("cannot read the diff", style="red"))
            return
        body.update(diff_text(self.diff, self.shown))

    def action_close(self) -> None:
        self.dismiss(None)

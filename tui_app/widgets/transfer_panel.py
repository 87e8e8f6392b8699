"""Running template transfers, one line each: name, bar, percent, bytes, speed, ETA."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.progress_bar import ProgressBar as RichBar
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tui_app.transfer_progress import bytes_of, eta_text, speed_text

MAX_LINES = 4
BAR_WIDTH = 16


@dataclass(frozen=True)
class TransferLine:
    """One transfer as the panel shows it; `waiting` (words) replaces the bar when set."""

    name: str
    done: int
    total: int
    rate: float
    waiting: str = ""

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total > 0 else 0.0


class AsciiBar:
    """`#####-----`: a bar that reads without colour or block glyphs."""

    def __init__(self, width: int, fraction: float) -> None:
        self.width = width
        self.fraction = max(0.0, min(1.0, fraction))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        done = int(self.width * self.fraction)
        yield Segment("#" * done, Style(bold=True))
        yield Segment("-" * (self.width - done), Style(dim=True))


class TransferPanel(Static):
    """Shows up to MAX_LINES transfers and a count of the rest; hidden when there are none."""

    SCOPED_CSS = False  # so the `.-ascii` rule (a class of the app) reaches it

    DEFAULT_CSS = """
    TransferPanel {
        height: auto;
        padding: 0 1;
        border-top: solid $panel-lighten-2;
        display: none;
    }
    TransferPanel.-shown { display: block; }
    .-ascii TransferPanel { border-top: ascii $panel; }
    """

    def __init__(self, *, ascii: bool = False, id: str | None = None) -> None:
        super().__init__(id=id)
        self.ascii = ascii
        self.lines: list[TransferLine] = []

    def show(self, lines: list[TransferLine]) -> None:
        """Replace what is shown (one refresh, however many transfers changed)."""
        if lines == self.lines:
            return
        self.lines = lines
        self.set_class(bool(lines), "-shown")
        self.update(self._table() if lines else "")

    def _table(self) -> Group:
        shown = self.lines[:MAX_LINES]
        table = Table.grid(padding=(0, 1))
        name_width = min(20, max(len(line.name) for line in shown))
        table.add_column(no_wrap=True, width=name_width, overflow="ellipsis")
        table.add_column(no_wrap=True, width=BAR_WIDTH)
        table.add_column(no_wrap=True, justify="right", width=4)
        table.add_column(no_wrap=True, justify="right")
        table.add_column(no_wrap=True, justify="right")
        table.add_column(no_wrap=True)
        waiting: list[Text] = []
        for line in shown:
            if line.waiting:
                name = Text(line.name, no_wrap=True, overflow="ellipsis")
                name.truncate(name_width, overflow="ellipsis", pad=True)
                waiting.append(Text.assemble(name, " ", (line.waiting, "yellow"), no_wrap=True))
                continue
            fraction = line.percent / 100
            bar = (
                AsciiBar(BAR_WIDTH, fraction)
                if self.ascii
                else RichBar(
                    total=100,
                    completed=line.percent,
                    width=BAR_WIDTH,
                    style="grey37",
                    complete_style="yellow",
                    finished_style="green",
                )
            )
            table.add_row(
                line.name,
                bar,
                f"{line.percent:.0f}%",
                bytes_of(line.done, line.total),
                speed_text(line.rate),
                eta_text(line.done, line.total, line.rate),
            )
        parts: list[Table | Text] = [table] if table.row_count else []
        parts += waiting
        more = len(self.lines) - MAX_LINES
        if more > 0:
            parts.append(Text(f"+{more} more transfers", style="dim"))
        return Group(*parts)

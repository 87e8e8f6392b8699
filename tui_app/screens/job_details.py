"""One job in full: what, on what, how far, why it failed, its parameters and result."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

if TYPE_CHECKING:
    from backend.api.types import JobInfo
    from tui_app.app import SysvmApp


class JobDetailsScreen(ModalScreen[None]):
    """Shows the row it was opened from at once, then the job as the engine has it now."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,q", "close", "Close", id="job.close"),
        Binding("j,down", "scroll(1)", "Scroll", show=False, id="job.scroll_down"),
        Binding("k,up", "scroll(-1)", "Scroll", show=False, id="job.scroll_up"),
    ]

    DEFAULT_CSS = """
    JobDetailsScreen {
        align: center middle;
        & > #job-dialog {
            width: 72;
            max-width: 95%;
            height: auto;
            max-height: 90%;
            padding: 0 1;
            border: round $accent;
            border-title-style: bold;
            background: $surface;
        }
        & #job-body { height: auto; }
        & #job-keys { color: $text-muted; }
    }
    """

    def __init__(self, job_id: int, row: dict[str, Any]) -> None:
        super().__init__()
        self.job_id = job_id
        self.row = row
        self.job: JobInfo | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="job-dialog") as dialog:
            dialog.border_title = f"Job {self.job_id}"
            yield Static(self._render_job(), id="job-body")
            yield Static("Esc: close", id="job-keys")

    def on_mount(self) -> None:
        self._fetch()

    @work(exclusive=True, exit_on_error=False)
    async def _fetch(self) -> None:
        app: SysvmApp = self.app  # type: ignore[assignment]
        try:
            self.job = await app.api.job(self.job_id)
        except Exception as exc:
            app.report_engine_error(exc)
            return
        self.query_one("#job-body", Static).update(self._render_job())

    def _render_job(self) -> Table:
        job, row = self.job, self.row
        rows: list[tuple[str, Any]]
        if job is None:
            rows = [
                ("kind", row.get("kind")),
                ("target", row.get("target")),
                ("state", row.get("state")),
                ("progress", f"{float(row.get('progress') or 0):.0f}%"),
                ("message", row.get("message")),
                ("error", Text(str(row.get("error") or ""), style="red")),
            ]
        else:
            transfer = f"{job.bytes_done} of {job.bytes_total} bytes" if job.bytes_total else None
            rows = [
                ("kind", job.kind),
                ("target", f"{job.target_type} {job.target_name}".strip()),
                ("state", job.state),
                ("progress", f"{job.progress:.0f}%"),
                ("bytes", transfer),
                ("message", job.message),
                ("error", Text(job.error, style="red") if job.error else None),
                ("attempts", str(job.attempts)),
                ("created", job.created_at),
                ("started", job.started_at),
                ("finished", job.finished_at),
                ("parameters", _json(job.params)),
                ("result", _json(job.result)),
            ]
        table = Table.grid(padding=(0, 1))
        table.add_column(style="dim", no_wrap=True)
        table.add_column(overflow="fold")
        for label, value in rows:
            table.add_row(label, value if value not in (None, "") else Text("-", style="dim"))
        return table

    def action_close(self) -> None:
        self.dismiss(None)

    def action_scroll(self, lines: int) -> None:
        self.query_one("#job-dialog", VerticalScroll).scroll_relative(y=lines, animate=False)


def _json(value: Any) -> str | None:
    if not value:
        return None
    return json.dumps(value, sort_keys=True, ensure_ascii=True)

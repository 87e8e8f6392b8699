"""The bottom strip: one line per queued or running job (kind, target, progress bar, message).

A job that moves bytes (a template transfer) shows its speed, ETA and bytes instead of its
message, measured from the bytes its events report over their timestamps."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.renderables.bar import Bar as BarRenderable
from textual.widgets import Label, ProgressBar

from tui_app.event_batch import EventBatch
from tui_app.transfer_progress import TransferMeter, bytes_of, eta_text, speed_text, waiting_words

if TYPE_CHECKING:
    from backend.api.types import EventRecord, JobInfo

MAX_ROWS = 3
RUNNING = "running"
ACTIVE = frozenset({"queued", RUNNING})
SHORT_KINDS = {"template.download": "download", "template.upload": "upload"}
"""Kinds said in a word, so the template's name fits beside it."""


class AsciiBar(BarRenderable):
    """A progress bar drawn with `#` and `-` so it reads without colour or box drawing."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = self.width or options.max_width
        done = max(0, min(width, int(self.highlight_range[1])))
        yield Segment("#" * done, console.get_style(self.highlight_style))
        yield Segment("-" * (width - done), console.get_style(self.background_style))


class AsciiProgressBar(ProgressBar):
    BAR_RENDERABLE = AsciiBar


class JobRow(Horizontal):
    """One running job: `kind target  [bar] pct  message`."""

    DEFAULT_CSS = """
    JobRow {
        height: 1;
        & > .job-what { width: 22; text-overflow: ellipsis; text-wrap: nowrap; }
        & > ProgressBar { width: auto; margin-right: 1; }
        & > ProgressBar Bar { width: 16; }
        & > .job-message { width: 1fr; text-overflow: ellipsis; text-wrap: nowrap; color: $text-muted; }
    }
    """

    def __init__(self, job_id: int, *, ascii: bool) -> None:
        super().__init__(id=f"job-{job_id}")
        self.job_id = job_id
        self.ascii = ascii
        self.kind = ""
        self.target = ""
        self.progress = 0.0
        self.message = ""

    def compose(self) -> ComposeResult:
        bar_class = AsciiProgressBar if self.ascii else ProgressBar
        yield Label(classes="job-what")
        yield bar_class(total=100, show_eta=False)
        yield Label(classes="job-message")

    def on_mount(self) -> None:
        self._paint()

    def set(self, *, kind: str, target: str, progress: float, message: str) -> None:
        self.kind, self.target, self.progress, self.message = kind, target, progress, message
        if self.is_mounted:
            self._paint()

    def _paint(self) -> None:
        kind = SHORT_KINDS.get(self.kind, self.kind)
        what = kind if not self.target or self.target == self.kind else f"{kind} {self.target}"
        self.query_one(".job-what", Label).update(what)
        self.query_one(ProgressBar).update(progress=self.progress)
        self.query_one(".job-message", Label).update(self.message)


class ActivityStrip(Vertical):
    """Queued and running jobs, fed by `load(api.jobs(state="running"))`, by jobs this console
    submits (`add_job`) and by "job" events."""

    DEFAULT_CSS = """
    ActivityStrip {
        height: auto;
        max-height: 4;
        padding: 0 1;
        & > #no-jobs { color: $text-muted; }
        & > #more-jobs { color: $text-muted; }
    }
    """

    def __init__(self, *, ascii: bool = False, id: str | None = None) -> None:
        super().__init__(id=id)
        self.ascii = ascii
        self.jobs: dict[int, dict[str, Any]] = {}
        self._rows: dict[int, JobRow] = {}
        self._batch = EventBatch(self, self._apply_events)
        self._finished: set[int] = set()  # so a job that ended before `add_job` stays out
        self._meters: dict[int, TransferMeter] = {}
        self.history: deque[int] = deque(maxlen=50)
        """Ids of the last jobs that got a row, oldest first (quick jobs come and go fast)."""
        self.loaded = False

    def compose(self) -> ComposeResult:
        yield Label("no running jobs", id="no-jobs")
        yield Label("", id="more-jobs")

    def on_mount(self) -> None:
        self._layout()

    def load(self, jobs: list[JobInfo]) -> None:
        """Start from the engine's list of running jobs (replacing what was shown)."""
        self.jobs = {j.id: _job_entry(j) for j in jobs if j.state in ACTIVE}
        for job in jobs:
            self._start_meter(job)
        self.loaded = True
        self._layout()
        self._batch.release()

    def add_job(self, job: JobInfo) -> None:
        """Show a job this console just submitted, before its first event arrives."""
        if job.state in ACTIVE and job.id not in self.jobs and job.id not in self._finished:
            self.jobs[job.id] = _job_entry(job)
            self._start_meter(job)
            self._layout()

    def _start_meter(self, job: JobInfo) -> None:
        """A transfer already under way: its average since it started is the first speed
        shown (with its next event), until the meter's window has newer samples."""
        if job.state == RUNNING and job.bytes_total > 0 and job.started_at:
            meter = self._meters[job.id] = TransferMeter()
            meter.add(job.started_at, 0)

    def queue_event(self, event: EventRecord) -> None:
        """Take a "job" event; applied with the others of its frame."""
        if event.entity != "job":
            return
        self._batch.add(event)

    def _apply_events(self, events: list[EventRecord]) -> None:
        for event in events:
            f = event.fields
            state = f.get("state", "")
            if state in ACTIVE:
                job = self.jobs.setdefault(event.entity_id, {})
                job.update(
                    kind=event.name,
                    target=f.get("target_name", ""),
                    progress=float(f.get("progress") or 0.0),
                    message=self._words(event),
                    state=state,
                )
            else:
                self.jobs.pop(event.entity_id, None)
                self._meters.pop(event.entity_id, None)
                if len(self._finished) > 1000:
                    self._finished.clear()
                self._finished.add(event.entity_id)
                if state == "failed":
                    what = f"{event.name} {f.get('target_name', '')}".strip()
                    self.app.notify(
                        f"{what} failed: {f.get('error') or 'no reason given'}",
                        title="job failed",
                        severity="error",
                        timeout=10,
                    )
        if events:
            self._layout()

    def _words(self, event: EventRecord) -> str:
        """A transfer's speed, ETA and bytes (they fit at 80 columns); else the message."""
        f = event.fields
        done, total = int(f.get("bytes_done") or 0), int(f.get("bytes_total") or 0)
        message = str(f.get("message") or "")
        if total <= 0 or f.get("state") != RUNNING:
            return waiting_words(message) or message
        meter = self._meters.setdefault(event.entity_id, TransferMeter())
        meter.add(event.ts, done)
        rate = meter.rate
        return f"{speed_text(rate)} {eta_text(done, total, rate)} {bytes_of(done, total)}"

    def _layout(self) -> None:
        """Show up to MAX_ROWS lines: the jobs (oldest first), or as many as fit beside a
        count of the rest."""
        if not self.is_mounted or not self.query("#no-jobs"):
            return  # not composed yet; on_mount lays out
        fit = MAX_ROWS if len(self.jobs) <= MAX_ROWS else MAX_ROWS - 1
        shown = sorted(self.jobs)[:fit]
        for job_id in [j for j in self._rows if j not in shown]:
            self._rows.pop(job_id).remove()
        for job_id in shown:
            job = self.jobs[job_id]
            row = self._rows.get(job_id)
            if row is None:
                row = self._rows[job_id] = JobRow(job_id, ascii=self.ascii)
                self.mount(row, before=self.query_one("#no-jobs"))
                self.history.append(job_id)
            row.set(
                kind=job["kind"],
                target=job["target"],
                progress=job["progress"],
                message=job["message"] or job["state"],
            )
        self.query_one("#no-jobs").display = not self.jobs
        more = len(self.jobs) - len(shown)
        more_label = self.query_one("#more-jobs", Label)
        more_label.display = more > 0
        more_label.update(f"+{more} more running" if more > 0 else "")


def _job_entry(job: JobInfo) -> dict[str, Any]:
    return {
        "kind": job.kind,
        "target": job.target_name,
        "progress": job.progress,
        "message": job.message,
        "state": job.state,
    }

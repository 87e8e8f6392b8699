"""The job runner: long work persisted with progress, cancellable, and never left "running".

A job kind is registered with a handler and says whether it may be resumed. On start, the
runner resumes every interrupted job of a resumable kind and fails the others with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Table, Update, bindparam, insert, select, update
from sqlalchemy.orm import Session

from backend.api.types import JobInfo
from backend.db.database import Database
from backend.db.models import Job, JobState, utcnow
from backend.db.worker import command
from backend.engine.events import EventBus
from backend.errors import Conflict, InvalidInput, NotFound, SysvmError

log = logging.getLogger(__name__)

_JOBS: Table = Job.__table__  # type: ignore[assignment]
WRITTEN_KEPT = 1024
"""Jobs whose last written state the runner keeps (see `JobRunner._written`)."""
# Statements made once: one used again is not analysed again (see `_update_statement`).
_INSERT = insert(_JOBS).returning(*_JOBS.c)
_SELECT_ONE = select(_JOBS).where(_JOBS.c.id == bindparam("job_id"))


def job_info(job: Job | Row[Any]) -> JobInfo:
    """The client view of a job, from its ORM object or its table row."""

    def iso(t: datetime | None) -> str | None:
        return t.isoformat(timespec="seconds") if t else None

    return JobInfo(
        id=job.id,
        kind=job.kind,
        target_type=job.target_type,
        target_id=job.target_id,
        target_name=job.target_name,
        state=job.state,
        progress=job.progress,
        bytes_done=job.bytes_done,
        bytes_total=job.bytes_total,
        message=job.message,
        params=job.params,
        result=job.result,
        error=job.error,
        attempts=job.attempts,
        created_at=iso(job.created_at) or "",
        started_at=iso(job.started_at),
        finished_at=iso(job.finished_at),
    )


class JobContext:
    """What a handler gets: its parameters and a way to report progress (throttled). A handler
    may set `done_message`: the job's message once it has succeeded (written with the success,
    no extra write), instead of its last progress message."""

    def __init__(self, runner: JobRunner, job: JobInfo) -> None:
        self._runner = runner
        self.job_id = job.id
        self.params = job.params
        self.attempt = job.attempts
        self.done_message: str | None = None
        self._last_write = 0.0
        self._last_pct = -100.0

    async def progress(
        self,
        percent: float | None = None,
        *,
        message: str | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        force: bool = False,
    ) -> None:
        """Report progress; persisted at most every `job.progress_interval` s or each 1%."""
        now = time.monotonic()
        pct = percent if percent is not None else self._last_pct
        if (
            not force
            and now - self._last_write < self._runner.progress_interval
            and abs(pct - self._last_pct) < 1.0
        ):
            return
        self._last_write, self._last_pct = now, pct
        changes: dict[str, Any] = {}
        if percent is not None:
            changes["progress"] = round(max(0.0, min(100.0, percent)), 1)
        if message is not None:
            changes["message"] = message
        if bytes_done is not None:
            changes["bytes_done"] = bytes_done
        if bytes_total is not None:
            changes["bytes_total"] = bytes_total
        await self._runner._update(self.job_id, **changes)


JobHandler = Callable[[JobContext], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True)
class JobKind:
    name: str
    handler: JobHandler
    # Resumable handlers are idempotent: running them again after a crash converges.
    resumable: bool
    why_not_resumable: str = ""


class JobRunner:
    def __init__(
        self,
        db: Database,
        bus: EventBus,
        *,
        progress_interval: float = 0.5,
        on_idle: Callable[[], object] | None = None,
        idle_after: float = 1.0,
    ) -> None:
        """`on_idle` is called once no job has run for `idle_after` seconds (a quiet moment: not
        a gap between the jobs of a burst), again after each later job."""
        self._db = db
        self._bus = bus
        self.progress_interval = progress_interval
        self._kinds: dict[str, JobKind] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._done: dict[int, asyncio.Event] = {}
        # Each job this runner wrote last, as written (RETURNING): only the runner writes jobs,
        # so `get` of a recent job needs no read (waiting for a job ends with one).
        self._written: OrderedDict[int, JobInfo] = OrderedDict()
        self._stopping = False
        self._on_idle = on_idle
        self._idle_after = idle_after
        self._idle_timer: asyncio.TimerHandle | None = None

    def register(self, kind: JobKind) -> None:
        self._kinds[kind.name] = kind

    async def submit(
        self,
        kind: str,
        params: dict[str, Any] | None = None,
        *,
        target_type: str = "",
        target_id: int | None = None,
        target_name: str = "",
    ) -> JobInfo:
        if kind not in self._kinds:
            raise InvalidInput("kind", f"unknown job kind {kind!r}")

        values = {
            "kind": kind,
            "params": params or {},
            "target_type": target_type,
            "target_id": target_id,
            "target_name": target_name,
            "state": JobState.QUEUED.value,
        }

        info = self._wrote(await self._db.run_write(functools.partial(_insert_job, values=values)))
        self._bus.publish("job", info.id, "created", info.kind, **_event_fields(info))
        self._launch(info)
        return info

    def _launch(self, info: JobInfo) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._done[info.id] = asyncio.Event()
        self._tasks[info.id] = asyncio.create_task(self._run(info), name=f"job-{info.id}")

    async def _run(self, info: JobInfo) -> None:
        kind = self._kinds[info.kind]
        try:
            info = await self._update(
                info.id,
                state=JobState.RUNNING.value,
                started_at=utcnow(),
                attempts=info.attempts + 1,
            )
            ctx = JobContext(self, info)
            result = await kind.handler(ctx)
            final = {} if ctx.done_message is None else {"message": ctx.done_message}
            await self._update(
                info.id,
                state=JobState.SUCCEEDED.value,
                progress=100.0,
                result=result or {},
                finished_at=utcnow(),
                **final,
            )
        except asyncio.CancelledError:
            if self._stopping:
                await self._interrupted(info.id, kind, "the engine was stopped")
            else:
                await self._update(
                    info.id,
                    state=JobState.CANCELLED.value,
                    message="cancelled by operator",
                    finished_at=utcnow(),
                )
        except SysvmError as exc:
            await self._update(
                info.id, state=JobState.FAILED.value, error=str(exc), finished_at=utcnow()
            )
        except Exception as exc:
            log.exception("job %s (%s) crashed", info.id, info.kind)
            await self._update(
                info.id,
                state=JobState.FAILED.value,
                error=f"internal error: {type(exc).__name__}: {exc} (see engine.log)",
                finished_at=utcnow(),
            )
        finally:
            self._tasks.pop(info.id, None)
            done = self._done.pop(info.id, None)
            if done:
                done.set()
            if not self._tasks and self._on_idle is not None and not self._stopping:
                self._idle_timer = asyncio.get_running_loop().call_later(
                    self._idle_after, self._idle
                )

    def _idle(self) -> None:
        self._idle_timer = None
        if not self._tasks and self._on_idle is not None and not self._stopping:
            self._on_idle()

    async def _interrupted(self, job_id: int, kind: JobKind, why: str) -> None:
        if kind.resumable:
            await self._update(
                job_id, state=JobState.QUEUED.value, message=f"{why}; resumes when it starts"
            )
        else:
            await self._update(
                job_id,
                state=JobState.FAILED.value,
                error=f"{why} while this job ran; not resumed: {kind.why_not_resumable}",
                finished_at=utcnow(),
            )

    async def _update(self, job_id: int, **changes: Any) -> JobInfo:
        """Change a job's row (`_update_job`) and publish it."""
        info = self._wrote(
            await self._db.run_write(functools.partial(_update_job, job_id=job_id, changes=changes))
        )
        self._bus.publish("job", job_id, "updated", info.kind, **_event_fields(info))
        return info

    def _wrote(self, info: JobInfo) -> JobInfo:
        self._written[info.id] = info
        self._written.move_to_end(info.id)
        while len(self._written) > WRITTEN_KEPT:
            self._written.popitem(last=False)
        return info

    async def recover(self) -> list[JobInfo]:
        """On engine start: resume interrupted resumable jobs, fail the others with the reason."""
        stale = await self._db.run_read(_unfinished_jobs)
        out = []
        for info in stale:
            kind = self._kinds.get(info.kind)
            if kind is None:
                out.append(
                    await self._update(
                        info.id,
                        state=JobState.FAILED.value,
                        error=f"engine restarted; job kind {info.kind!r} is unknown to this engine",
                        finished_at=utcnow(),
                    )
                )
            elif kind.resumable:
                info = await self._update(
                    info.id,
                    state=JobState.QUEUED.value,
                    message=f"resumed after engine restart (attempt {info.attempts + 1})",
                )
                self._launch(info)
                out.append(info)
            else:
                out.append(
                    await self._update(
                        info.id,
                        state=JobState.FAILED.value,
                        error="the engine stopped while this job ran (killed or crashed); "
                        f"not resumed: {kind.why_not_resumable}",
                        finished_at=utcnow(),
                    )
                )
        return out

    async def get(self, job_id: int) -> JobInfo:
        if (written := self._written.get(job_id)) is not None:
            return written
        return await self._db.run_read(functools.partial(_job, job_id=job_id))

    async def list(self, *, limit: int = 100, state: str | None = None) -> list[JobInfo]:
        return await self._db.run_read(functools.partial(_jobs, limit=limit, state=state))

    async def cancel(self, job_id: int) -> JobInfo:
        info = await self.get(job_id)
        if info.finished:
            raise Conflict(f"job {job_id} already {info.state}; nothing to cancel")
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await self.wait(job_id, timeout=10)
            return await self.get(job_id)
        return await self._update(
            job_id, state=JobState.CANCELLED.value, message="cancelled", finished_at=utcnow()
        )

    async def wait(self, job_id: int, timeout: float | None = None) -> JobInfo:
        """Wait until the job finishes (or the timeout passes) and return it."""
        done = self._done.get(job_id)
        if done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
        return await self.get(job_id)

    async def stop(self) -> None:
        """Interrupt running jobs: resumable ones go back to queued, the others fail."""
        self._stopping = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@command
def _insert_job(s: Session, *, values: dict[str, Any]) -> JobInfo:
    return job_info(s.connection().execute(_INSERT, values).one())


@command
def _update_job(s: Session, *, job_id: int, changes: dict[str, Any]) -> JobInfo:
    """Change a job's row: one UPDATE ... RETURNING on the table, with no ORM load and flush
    (a router apply makes four of these)."""
    statement = _update_statement(frozenset(changes))
    row = s.connection().execute(statement, {**changes, "job_id": job_id}).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id} does not exist")
    return job_info(row)


@command
def _job(s: Session, *, job_id: int) -> JobInfo:
    row = s.connection().execute(_SELECT_ONE, {"job_id": job_id}).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id} does not exist")
    return job_info(row)


@command
def _jobs(s: Session, *, limit: int, state: str | None) -> list[JobInfo]:
    q = select(_JOBS)
    if state:
        q = q.where(_JOBS.c.state == state)
    q = q.order_by(_JOBS.c.id.desc()).limit(limit)
    return [job_info(r) for r in s.execute(q)]


@command
def _unfinished_jobs(s: Session) -> list[JobInfo]:
    unfinished = select(_JOBS).where(
        _JOBS.c.state.in_([JobState.RUNNING.value, JobState.QUEUED.value])
    )
    return [job_info(r) for r in s.execute(unfinished)]


@functools.cache
def _update_statement(columns: frozenset[str]) -> Update:
    """UPDATE ... RETURNING of these columns of one job (bound as `job_id`), made once per set
    of columns: a statement used again is not analysed again (its cache key is kept), which was
    most of the ~1 ms a job update cost in the database's thread."""
    return (
        update(_JOBS)
        .where(_JOBS.c.id == bindparam("job_id"))
        .values({c: bindparam(c) for c in sorted(columns)})
        .returning(*_JOBS.c)
    )


def _event_fields(info: JobInfo) -> dict[str, Any]:
    return {
        "state": info.state,
        "progress": info.progress,
        "message": info.message,
        "bytes_done": info.bytes_done,
        "bytes_total": info.bytes_total,
        "error": info.error,
        "target_type": info.target_type,
        "target_name": info.target_name,
    }

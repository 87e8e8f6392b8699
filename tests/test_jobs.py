"""Jobs: after an engine dies, each interrupted job is resumed or failed with its reason."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db.database import Database
from backend.db.models import Job
from backend.engine.events import EventBus
from backend.engine.jobs import JobContext, JobKind, JobRunner
from backend.errors import Conflict
from backend.hypervisor.connection import HostConnection, HypervisorError


async def _runner(path: Path) -> tuple[Database, EventBus, JobRunner]:
    db = Database(path)
    await db.open()
    bus = EventBus(db)
    await bus.start()
    return db, bus, JobRunner(db, bus, progress_interval=0)


async def _left_running(db: Database, kind: str) -> int:
    """Write the row a killed engine leaves behind: a job still marked running."""

    async def work(s: AsyncSession) -> int:
        job = Job(kind=kind, state="running", attempts=1, params={"n": 1})
        s.add(job)
        await s.flush()
        return job.id

    return await db.write(work)


async def test_interrupted_job_that_cannot_resume_fails_with_the_reason(tmp_path: Path) -> None:
    db, bus, runner = await _runner(tmp_path / "db")

    async def reboot(ctx: JobContext) -> dict[str, Any]:
        raise AssertionError("must not run again")

    runner.register(
        JobKind(
            "systemvm.reboot",
            reboot,
            resumable=False,
            why_not_resumable="a reboot half done must be re-checked by hand",
        )
    )
    job_id = await _left_running(db, "systemvm.reboot")
    unknown_id = await _left_running(db, "retired.kind")
    await runner.recover()
    job = await runner.get(job_id)
    assert job.state == "failed"
    assert "engine stopped while this job ran" in job.error and "re-checked by hand" in job.error
    unknown = await runner.get(unknown_id)
    assert unknown.state == "failed" and "unknown to this engine" in unknown.error
    await bus.stop()
    await db.close()


async def test_interrupted_resumable_job_runs_again_and_finishes(tmp_path: Path) -> None:
    db, bus, runner = await _runner(tmp_path / "db")
    runs: list[int] = []

    async def converge(ctx: JobContext) -> dict[str, Any]:
        runs.append(ctx.attempt)
        await ctx.progress(50, message="half way")
        return {"ok": True}

    runner.register(JobKind("lab.up", converge, resumable=True))
    job_id = await _left_running(db, "lab.up")
    await runner.recover()
    job = await runner.wait(job_id, timeout=5)
    assert job.state == "succeeded" and job.result == {"ok": True}
    assert job.attempts == 2 and runs == [2]
    await bus.stop()
    await db.close()


async def test_progress_and_states_are_published_as_events(tmp_path: Path) -> None:
    db, bus, runner = await _runner(tmp_path / "db")
    sub = bus.subscribe(["job"])

    async def work(ctx: JobContext) -> None:
        for pct in (25, 50, 75):
            await ctx.progress(pct, bytes_done=pct, bytes_total=100)

    runner.register(JobKind("demo", work, resumable=True))
    job = await runner.submit("demo")
    await runner.wait(job.id, 5)
    seen = []
    while not sub.queue.empty():
        ev = await sub.get()
        assert ev is not None
        seen.append((ev.fields["state"], ev.fields["progress"]))
    assert seen[0] == ("queued", 0.0) and seen[-1] == ("succeeded", 100.0)
    assert ("running", 50.0) in seen
    with pytest.raises(Conflict, match="already succeeded"):
        await runner.cancel(job.id)
    await bus.stop()
    await db.close()


async def test_clean_stop_requeues_resumable_jobs_and_fails_the_others(tmp_path: Path) -> None:
    db, bus, runner = await _runner(tmp_path / "db")

    async def forever(ctx: JobContext) -> None:
        await asyncio.sleep(3600)

    runner.register(JobKind("slow.resumable", forever, resumable=True))
    runner.register(
        JobKind("slow.once", forever, resumable=False, why_not_resumable="it is not idempotent")
    )
    a = await runner.submit("slow.resumable")
    b = await runner.submit("slow.once")
    await asyncio.sleep(0.1)
    await runner.stop()
    assert (await runner.get(a.id)).state == "queued"
    failed = await runner.get(b.id)
    assert failed.state == "failed" and "not idempotent" in failed.error
    await bus.stop()
    await db.close()


async def test_unreachable_libvirt_uri_is_one_clear_error_naming_host_and_uri(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-host.xml"
    conn = HostConnection(1, "zone9-host9", f"test://{missing}")
    with pytest.raises(HypervisorError) as err:
        await conn.domain_states()
    message = str(err.value)
    assert "zone9-host9" in message and str(missing) in message and "\n" not in message
    await conn.close()


async def test_runner_says_when_no_job_has_run_for_a_while(tmp_path: Path) -> None:
    idle: list[int] = []
    db = Database(tmp_path / "db")
    await db.open()
    bus = EventBus(db)
    await bus.start()
    runner = JobRunner(
        db, bus, progress_interval=0, on_idle=lambda: idle.append(len(idle)), idle_after=0.2
    )
    gates = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def wait_gate(ctx: JobContext) -> dict[str, Any]:
        await gates[ctx.params["gate"]].wait()
        return {}

    runner.register(JobKind("test.gate", wait_gate, resumable=False))
    a = await runner.submit("test.gate", {"gate": "a"})
    b = await runner.submit("test.gate", {"gate": "b"})
    gates["a"].set()
    await runner.wait(a.id, timeout=5)
    await asyncio.sleep(0.3)
    assert idle == []  # b still runs

    gates["b"].set()
    await runner.wait(b.id, timeout=5)
    c = await runner.submit("test.gate", {"gate": "a"})  # the next job of a burst
    await runner.wait(c.id, timeout=5)
    await asyncio.sleep(0.1)
    assert idle == []  # no quiet moment yet
    await asyncio.sleep(0.3)
    assert idle == [0]
    await bus.stop()
    await db.close()


async def test_a_job_read_back_without_the_database_is_the_job_the_database_holds(
    tmp_path: Path,
) -> None:
    """The runner answers `get` of a job it wrote from what it wrote (waiting for a job needs
    no read); that answer is exactly what reading the row gives, whatever the job went through
    (timestamps, progress, bytes, result)."""
    db, bus, runner = await _runner(tmp_path / "db")

    async def work(ctx: JobContext) -> dict[str, Any]:
        await ctx.progress(40, message="halfway", bytes_done=4, bytes_total=10)
        return {"answer": [1, 2], "text": "done"}

    async def fails(ctx: JobContext) -> None:
        raise Conflict("it could not")

    runner.register(JobKind("demo", work, resumable=True))
    runner.register(JobKind("bad", fails, resumable=False))
    jobs = [await runner.submit("demo", {"n": 1}, target_type="network", target_name="net1")]
    jobs.append(await runner.submit("bad"))
    remembered = [await runner.wait(j.id, 5) for j in jobs]
    runner._written.clear()  # as for a job this runner did not write
    read = [await runner.get(j.id) for j in jobs]
    await bus.stop()
    await db.close()
    assert remembered == read
    assert read[0].state == "succeeded" and read[0].result == {"answer": [1, 2], "text": "done"}
    assert read[1].state == "failed" and read[1].error == "it could not"

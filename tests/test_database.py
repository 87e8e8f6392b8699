"""The engine's database: units of work run whole in its threads, commands in its worker
process; the async pool's connections
are opened up front, bursts of sessions wait for them (opening one starts a thread, which blocks
the loop), and nested sessions never deadlock."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from backend.db.database import POOL_SIZE, Database
from backend.db.worker import ONE_CPU, WorkerGone, command
from backend.errors import InvalidInput, SysvmError
from backend.helper_processes import HELPER_NICENESS


async def test_a_burst_of_sessions_opens_no_connection_after_open(tmp_path: Path) -> None:
    db = Database(tmp_path / "sysvm.db")
    connects: list[object] = []
    event.listen(db.engine.sync_engine, "connect", lambda *_: connects.append(1))
    await db.open()
    assert len(connects) == POOL_SIZE
    open_now = peak = 0

    async def reader() -> None:
        nonlocal open_now, peak
        async with db.read() as s:
            open_now += 1
            peak = max(peak, open_now)
            await s.execute(text("SELECT 1"))
            await asyncio.sleep(0.01)
            open_now -= 1

    try:
        await asyncio.gather(*(reader() for _ in range(3 * POOL_SIZE)))
    finally:
        await db.close()

    assert len(connects) == POOL_SIZE
    assert peak == POOL_SIZE


async def test_sessions_nested_in_every_pooled_one_do_not_deadlock(tmp_path: Path) -> None:
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    held = asyncio.Barrier(POOL_SIZE)

    async def nested() -> int:
        async with db.read() as outer:
            await held.wait()  # every pooled session is taken
            async with db.read() as inner:
                await outer.execute(text("SELECT 1"))
                return int((await inner.execute(text("SELECT 2"))).scalar_one())

    try:
        got = await asyncio.wait_for(asyncio.gather(*(nested() for _ in range(POOL_SIZE))), 10)
    finally:
        await db.close()
    assert got == [2] * POOL_SIZE


async def test_a_cancelled_writer_does_not_cut_its_transaction_and_the_next_write_proceeds(
    tmp_path: Path,
) -> None:
    """Cutting a transaction between its statements and its rollback left SQLite's write lock
    held by a pooled connection, and the next write (a cancelled job recording so) waited on it
    for many seconds. The transaction now ends whole in a task of its own."""
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    started = asyncio.Event()

    async def slow(s: Any) -> None:
        await s.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        await s.execute(text("INSERT INTO t VALUES (1)"))
        started.set()
        await asyncio.sleep(0.5)  # the caller is cancelled here, mid-transaction

    async def insert_two(s: Any) -> None:
        await s.execute(text("INSERT INTO t VALUES (2)"))

    try:
        writer = asyncio.create_task(db.write(slow))
        await started.wait()
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        await asyncio.wait_for(db.write(insert_two), 5)
        async with db.read() as s:
            rows = sorted(r[0] for r in (await s.execute(text("SELECT x FROM t"))).all())
    finally:
        await db.close()
    assert rows == [1, 2]  # the cancelled caller's transaction ended whole, then the next one


async def test_a_unit_of_work_runs_whole_in_the_database_thread_and_commits_once(
    tmp_path: Path,
) -> None:
    """`run_write` runs a plain function with a synchronous session in the writing thread, not
    on the loop, and commits at the end; `run_read` sees the result; a unit that raises leaves
    nothing behind."""
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    threads: list[str] = []

    def create(s: Session) -> int:
        threads.append(threading.current_thread().name)
        s.execute(text("CREATE TABLE t (x INTEGER)"))
        s.execute(text("INSERT INTO t VALUES (1), (2)"))
        return 2

    def half_done(s: Session) -> None:
        s.execute(text("INSERT INTO t VALUES (3)"))
        raise ValueError("refused after the first statement")

    def read(s: Session) -> list[int]:
        threads.append(threading.current_thread().name)
        return sorted(r[0] for r in s.execute(text("SELECT x FROM t")))

    try:
        assert await db.run_write(create) == 2
        with pytest.raises(ValueError, match="refused"):
            await db.run_write(half_done)
        rows = await db.run_read(read)
    finally:
        await db.close()
    assert rows == [1, 2]  # the failed unit's insert was rolled back
    assert threads[0].startswith("sysvm-db-write") and threads[1].startswith("sysvm-db-read")
    assert threading.main_thread().name not in threads


async def test_a_cancelled_unit_of_work_still_commits_whole_before_the_next_write(
    tmp_path: Path,
) -> None:
    """A thread cannot be cut: the caller of a cancelled `run_write` gets CancelledError at
    once (before the unit ends), the unit still commits whole, and the next write sees it."""
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    await db.run_write(lambda s: s.execute(text("CREATE TABLE t (x INTEGER)")))
    started, finished = threading.Event(), threading.Event()

    def slow(s: Session) -> None:
        s.execute(text("INSERT INTO t VALUES (1)"))
        started.set()
        time.sleep(0.5)  # the caller is cancelled here
        s.execute(text("INSERT INTO t VALUES (2)"))
        finished.set()

    def count(s: Session) -> int:
        return int(s.execute(text("SELECT count(*) FROM t")).scalar_one())

    try:
        writer = asyncio.create_task(db.run_write(slow))
        await asyncio.to_thread(started.wait, 5)
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        assert not finished.is_set(), "the cancelled caller waited for the unit"
        seen_by_next_write = await asyncio.wait_for(db.run_write(count), 5)
    finally:
        await db.close()
    assert seen_by_next_write == 2


# Commands: module-level units of work, run in the database's worker process.

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2,
    reason="this machine gives one CPU: the engine starts no database worker there",
)


@command
def _create_and_fill(s: Session, *, values: list[int]) -> int:
    s.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
    for x in values:
        s.execute(text("INSERT INTO t VALUES (:x)"), {"x": x})
    return os.getpid()


@command
def _read_all(s: Session) -> tuple[int, list[int]]:
    return os.getpid(), sorted(r[0] for r in s.execute(text("SELECT x FROM t")))


@command
def _insert_then_refuse(s: Session, *, value: int) -> None:
    s.execute(text("INSERT INTO t VALUES (:x)"), {"x": value})
    raise InvalidInput("port", "refused after the first statement")


@command
def _insert_slowly(s: Session, *, values: list[int], pause: float) -> None:
    for x in values:
        s.execute(text("INSERT INTO t VALUES (:x)"), {"x": x})
        time.sleep(pause)


@command
def _unpicklable_error(s: Session) -> None:
    class Local(Exception):
        pass

    raise Local("made in the worker")


def _count(s: Session) -> int:
    return int(s.execute(text("SELECT count(*) FROM t")).scalar_one())


@needs_two_cpus
async def test_a_command_runs_in_the_worker_process_and_its_commit_is_seen_by_the_engine(
    tmp_path: Path,
) -> None:
    """A command (module-level, marked) runs in the worker process, commits there, and what it
    wrote is read back by another command, by the engine's reading thread and by an async
    session; a closure, or a command said to be large, runs in the engine's process."""
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    try:
        assert db.worker.running
        writer_pid = await db.run_write(functools.partial(_create_and_fill, values=[1, 2]))
        reader_pid, rows = await db.run_read(_read_all)
        niceness = os.getpriority(os.PRIO_PROCESS, reader_pid)
        large_pid, large_rows = await db.run_read(_read_all, large=True)
        in_thread = await db.run_read(_count)
        async with db.read() as s:
            in_session = (await s.execute(text("SELECT count(*) FROM t"))).scalar_one()
    finally:
        await db.close()
    assert writer_pid == reader_pid != os.getpid()
    assert rows == [1, 2] and in_thread == 2 and in_session == 2
    assert large_pid == os.getpid() and large_rows == [1, 2]  # megabytes are not copied there
    # it yields the CPU to the engine's event loop (backend.helper_processes)
    assert niceness == min(os.getpriority(os.PRIO_PROCESS, 0) + HELPER_NICENESS, 19)
    assert db.worker.gone == "the database was closed"


@needs_two_cpus
async def test_a_failing_command_raises_its_error_here_and_leaves_nothing(tmp_path: Path) -> None:
    """The exception of a command is raised to its caller with its type and fields (an invalid
    field stays named); its transaction is rolled back. An exception that cannot travel
    between processes arrives as a SysvmError that names it."""
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    try:
        await db.run_write(functools.partial(_create_and_fill, values=[1]))
        with pytest.raises(InvalidInput) as refused:
            await db.run_write(functools.partial(_insert_then_refuse, value=2))
        with pytest.raises(SysvmError, match="Local: made in the worker"):
            await db.run_read(_unpicklable_error)
        _, rows = await db.run_read(_read_all)
    finally:
        await db.close()
    assert (refused.value.field, refused.value.reason) == (
        "port",
        "refused after the first statement",
    )
    assert rows == [1]


@needs_two_cpus
async def test_a_cancelled_command_still_commits_whole_before_the_next_write(
    tmp_path: Path,
) -> None:
    """As with the threads: the caller of a cancelled write command gets CancelledError at once,
    the command still commits whole in the worker, and the next write sees all of it."""
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    try:
        await db.run_write(functools.partial(_create_and_fill, values=[]))
        writer = asyncio.create_task(
            db.run_write(functools.partial(_insert_slowly, values=[1, 2, 3], pause=0.2))
        )
        await asyncio.sleep(0.1)
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
        # read in the engine's thread: the command has not committed yet
        committed_when_cancelled = await db.run_read(_count)
        await asyncio.wait_for(db.run_write(functools.partial(_create_and_fill, values=[])), 5)
        _, rows = await db.run_read(_read_all)
    finally:
        await db.close()
    assert committed_when_cancelled == 0, "the cancelled caller waited for the command"
    assert rows == [1, 2, 3]  # the next write came after the whole command


@needs_two_cpus
async def test_a_killed_worker_fails_its_command_clearly_and_the_engine_goes_on_without_it(
    tmp_path: Path,
) -> None:
    """The worker process killed (SIGKILL, a real fault) while a command is in it: that command
    fails with WorkerGone saying its outcome is unknown, and later commands run in the
    engine's own threads."""
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    try:
        await db.run_write(functools.partial(_create_and_fill, values=[1]))
        worker_pid, _ = await db.run_read(_read_all)
        slow = asyncio.create_task(
            db.run_write(functools.partial(_insert_slowly, values=[2, 3], pause=2))
        )
        await asyncio.sleep(0.3)
        os.kill(worker_pid, signal.SIGKILL)
        with pytest.raises(WorkerGone, match="whether that command took effect is unknown"):
            await asyncio.wait_for(slow, 10)
        assert not db.worker.running and db.worker.gone == "it ended (its socket closed)"
        reader_pid, rows = await db.run_read(_read_all)
    finally:
        await db.close()
    assert reader_pid == os.getpid()
    assert rows == [1]  # the killed command's transaction was never committed


@needs_two_cpus
async def test_closing_the_database_waits_for_the_commands_in_flight(tmp_path: Path) -> None:
    """Closing sends the worker nothing more but still takes its answers: a write in flight
    is answered to its caller before `close()` returns, and it is committed."""
    db = Database(tmp_path / "sysvm.db")
    await db.open()
    await db.run_write(functools.partial(_create_and_fill, values=[]))
    slow = asyncio.create_task(
        db.run_write(functools.partial(_insert_slowly, values=[1, 2], pause=0.3))
    )
    await asyncio.sleep(0.1)
    await db.close()
    assert slow.done() and slow.exception() is None
    with contextlib.closing(sqlite3.connect(tmp_path / "sysvm.db")) as conn:
        rows = sorted(r[0] for r in conn.execute("SELECT x FROM t"))
    assert rows == [1, 2]


async def test_an_engine_kept_to_one_cpu_runs_commands_in_its_threads(tmp_path: Path) -> None:
    """On one CPU a worker process would take the CPU the loop needs: none is started, and
    commands run in the engine's threads."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this thread only: the one that opens the database
    try:
        db = Database(tmp_path / "sysvm.db")
        await db.open()
    finally:
        os.sched_setaffinity(0, allowed)
    try:
        await db.run_write(functools.partial(_create_and_fill, values=[1]))
        pid, rows = await db.run_read(_read_all)
    finally:
        await db.close()
    assert db.worker.gone == ONE_CPU and db.worker.pid is None
    assert pid == os.getpid() and rows == [1]

"""The engine's database: units of work run whole in its threads; the async pool's connections
are opened up front, bursts of sessions wait for them (opening one starts a thread, which blocks
the loop), and nested sessions never deadlock."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from backend.db.database import POOL_SIZE, Database


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

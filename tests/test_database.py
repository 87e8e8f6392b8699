"""The engine's database pool: connections opened up front, bursts of sessions wait for them
(opening one starts a thread, which blocks the loop), and nested sessions never deadlock."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import event, text

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

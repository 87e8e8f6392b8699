"""An event loop in its own thread, awaited from the caller's loop (backend.transport.loop_thread)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import pytest

from backend.transport.loop_thread import WINDOW, LoopThread, LoopThreadStopped


@pytest.fixture
async def worker() -> AsyncIterator[LoopThread]:
    thread = LoopThread("test-loop-thread")
    yield thread
    await thread.stop()


async def test_call_runs_the_coroutine_on_the_thread_and_returns_its_result_or_error(
    worker: LoopThread,
) -> None:
    async def where() -> int:
        await asyncio.sleep(0)
        return threading.get_ident()

    async def fail() -> None:
        raise ValueError("no such router")

    assert await worker.call(where()) not in (threading.get_ident(), None)
    with pytest.raises(ValueError, match="no such router"):
        await worker.call(fail())


async def test_cancelling_the_caller_cancels_the_work_and_waits_for_its_cleanup(
    worker: LoopThread,
) -> None:
    running, cleaned_up = threading.Event(), threading.Event()

    async def slow() -> None:
        running.set()
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.05)  # cleanup that itself awaits
            cleaned_up.set()

    caller = asyncio.create_task(worker.call(slow()))
    await asyncio.to_thread(running.wait, 5)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller

    assert cleaned_up.is_set()


async def test_stopping_the_thread_fails_work_still_running_there(worker: LoopThread) -> None:
    running = threading.Event()

    async def forever() -> None:
        running.set()
        await asyncio.sleep(30)

    caller = asyncio.create_task(worker.call(forever()))
    await asyncio.to_thread(running.wait, 5)
    await worker.stop()

    with pytest.raises(LoopThreadStopped):
        await caller
    assert await worker.call(asyncio.sleep(0, "again")) == "again"  # a new thread


async def test_iterate_yields_every_item_and_the_producers_error_after_them(
    worker: LoopThread,
) -> None:
    async def count() -> AsyncIterator[int]:
        for i in range(3 * WINDOW):
            yield i
        raise OSError("link down")

    got = []
    with pytest.raises(OSError, match="link down"):
        async for i in worker.iterate(count()):
            got.append(i)

    assert got == list(range(3 * WINDOW))


async def test_iterate_runs_at_most_a_window_ahead_and_closing_early_closes_the_source(
    worker: LoopThread,
) -> None:
    produced: list[int] = []
    closed = threading.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    items = worker.iterate(endless())
    async with contextlib.aclosing(items):
        assert await anext(items) == 0
        await asyncio.sleep(0.2)
        assert len(produced) <= WINDOW + 2  # the producer waits for the consumer
    assert closed.is_set()


async def test_pull_advances_the_callers_iterator_on_the_callers_loop(worker: LoopThread) -> None:
    here = threading.get_ident()
    advanced_on: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for chunk in (b"a", b"b"):
            advanced_on.append(threading.get_ident())
            yield chunk

    async def gather(source: AsyncIterator[bytes]) -> bytes:
        return b"".join([c async for c in source])

    loop = asyncio.get_running_loop()
    assert await worker.call(gather(worker.pull(chunks(), loop))) == b"ab"
    assert advanced_on == [here, here]

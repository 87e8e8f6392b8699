"""Turns on the event loop (backend/turns.py): a burst of resumed callers is spread over the
loop's iterations, in order, and nobody waits when there is no burst. Real asyncio loops; the
loop's iterations are counted by a callback that reschedules itself (it runs once in each)."""

from __future__ import annotations

import asyncio

from backend.turns import Turns


class Iterations:
    """Counts the running loop's iterations while it lives."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def _burst(turns: Turns, callers: int) -> list[tuple[int, int]]:
    """`callers` tasks woken in one iteration (one event set) each take a turn; returns
    (caller, iteration) in the order the turns were given."""
    woken = asyncio.Event()
    given: list[tuple[int, int]] = []
    iterations = Iterations()

    async def caller(n: int) -> None:
        await woken.wait()
        await turns.take()
        given.append((n, iterations.count))

    tasks = [asyncio.create_task(caller(n)) for n in range(callers)]
    await asyncio.sleep(0)
    woken.set()
    await asyncio.gather(*tasks)
    iterations.stop()
    return given


async def test_a_burst_past_the_slice_takes_one_iteration_each_in_order() -> None:
    turns = Turns(asyncio.get_running_loop(), slice_s=0.0)
    given = await _burst(turns, 10)
    assert [n for n, _ in given] == list(range(10))
    rounds = [it for _, it in given]
    assert len(set(rounds)) == 10, f"two callers were let go in one iteration: {rounds}"


async def test_within_the_slice_a_burst_goes_at_once() -> None:
    turns = Turns(asyncio.get_running_loop(), slice_s=60.0)
    given = await _burst(turns, 10)
    assert [n for n, _ in given] == list(range(10))
    assert len({it for _, it in given}) == 1


async def test_a_lone_caller_never_waits() -> None:
    turns = Turns(asyncio.get_running_loop(), slice_s=0.0)
    iterations = Iterations()
    for _ in range(5):
        before = iterations.count
        await turns.take()
        assert iterations.count == before, "a turn with nobody else waiting yielded the loop"
        await asyncio.sleep(0)  # the next answer arrives in a later iteration
        await asyncio.sleep(0)
    iterations.stop()


async def test_a_cancelled_waiter_is_skipped_and_the_rest_still_go() -> None:
    loop = asyncio.get_running_loop()
    turns = Turns(loop, slice_s=0.0)
    await turns.take()  # the slice is used up in this iteration: the next callers queue
    waiting = [asyncio.create_task(turns.take()) for _ in range(4)]
    await asyncio.sleep(0)  # they queue
    waiting[1].cancel()
    done, pending = await asyncio.wait(waiting, timeout=5)
    assert not pending, "a waiter was never let go after another was cancelled"
    assert waiting[1].cancelled()
    assert all(t.result() is None for i, t in enumerate(waiting) if i != 1)
    # and later callers are not stuck behind it
    await asyncio.wait_for(turns.take(), 5)

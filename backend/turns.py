"""Work resumed by answers (of the database, of SSH) takes turns on the event loop.

The engine's loop runs, in one iteration, every callback that was ready when it began. A
burst of answers (100 routers' reads, returned by the database's worker one after another and
read by the loop in one go) woke up to 20 jobs at once, each running ~0.5-1 ms of its own
Python until its next await: 8-14 ms of CPU in one iteration, and every timer and socket waited.

A caller awaits `take_turn()` once its answer has arrived and before its own work. While the
iteration's slice (SLICE seconds from the first turn taken in it) lasts and nobody waits,
turns are taken at once; after that, callers queue and one of them is let go per iteration,
in the order they came. What the loop runs in one iteration is then about a slice plus one
caller's step, whatever the size of the burst; the burst is spread over the next iterations.
"""

from __future__ import annotations

import asyncio
import collections
import time
import weakref

SLICE = 0.002
"""Seconds of an iteration in which turns are taken without waiting."""


class Turns:
    """The turns of one event loop (see the module's doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, slice_s: float = SLICE) -> None:
        self._loop = loop
        self._slice = slice_s
        self._started: float | None = None  # when this iteration's first turn was taken
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def take(self) -> None:
        if not self._waiting:
            now = time.perf_counter()
            if self._started is None:
                self._started = now
                self._loop.call_soon(self._next_iteration)
                return
            if now - self._started < self._slice:
                return
        turn = self._loop.create_future()
        self._waiting.append(turn)
        await turn  # a caller cancelled meanwhile leaves a cancelled future, skipped below

    def _next_iteration(self) -> None:
        """Runs once in the iteration after a turn was taken: lets the first caller still
        waiting go (it runs in the iteration after this one), else starts a fresh slice."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self._started = time.perf_counter()
                self._loop.call_soon(self._next_iteration)
                return
        self._started = None


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = weakref.WeakKeyDictionary()


async def take_turn() -> None:
    """Wait, if the running loop has already done its share of such work in this iteration,
    for this caller's turn (see the module's doc)."""
    loop = asyncio.get_running_loop()
    turns = _TURNS.get(loop)
    if turns is None:
        turns = _TURNS[loop] = Turns(loop)
    await turns.take()

"""An event loop in a thread of its own, and bridges that let callers on another loop await it.

CPU-heavy protocol work (SSH key exchange, packet encryption) done there does not stall the
caller's loop for longer than the interpreter's switch interval: with the GIL the caller's
thread gets its turn at least that often.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

WINDOW = 64
"""How many items `LoopThread.iterate` lets the producer run ahead of the consumer."""


class LoopThreadStopped(RuntimeError):
    """The loop thread was stopped while work submitted to it was still running."""


class LoopThread:
    """A daemon thread running its own event loop, started on first use; `stop()` ends it and
    the next use starts a new one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running_loop(self) -> asyncio.AbstractEventLoop | None:
        """The thread's loop if it runs, else None."""
        return self._loop

    def loop(self) -> asyncio.AbstractEventLoop:
        """The thread's loop, starting the thread if it is not running."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_serve, args=(loop,), name=self.name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Run a plain callback on the thread's loop, after everything submitted before it."""
        self.loop().call_soon_threadsafe(callback, *args)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the thread's loop and return its result (or raise its error) here.

        Cancelling the caller cancels `coro` there, and the caller's CancelledError comes only
        once `coro` has finished (its cleanup is done), as if it had run on the caller's loop.
        """
        loop = self.loop()
        caller = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = caller.create_future()
        started: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            started.append(task)
            task.add_done_callback(lambda t: _post(caller, _settle, t, outcome))

        loop.call_soon_threadsafe(start)
        try:
            return await asyncio.shield(outcome)
        except asyncio.CancelledError:
            if not outcome.done():  # this caller was cancelled: so is the work, then wait for it
                _post(loop, lambda: started and started[0].cancel())
            await _wait_out(outcome)
            raise

    async def iterate(self, source: AsyncIterator[T]) -> AsyncIterator[T]:
        """Iterate `source` on the thread's loop, yielding its items here as they come.

        The producer runs at most WINDOW items ahead. Closing this iterator early (or cancelling
        its consumer) closes `source` there before this one returns."""
        loop = self.loop()
        caller = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[bool, T | None]] = asyncio.Queue()
        credit: list[asyncio.Semaphore] = []

        async def produce() -> None:
            window = asyncio.Semaphore(WINDOW)
            credit.append(window)
            try:
                async with contextlib.aclosing(source):  # type: ignore[type-var]
                    async for item in source:
                        await window.acquire()
                        _post(caller, items.put_nowait, (True, item))
            finally:
                _post(caller, items.put_nowait, (False, None))

        runner = caller.create_task(self.call(produce()))
        try:
            while True:
                more, item = await items.get()
                if not more:
                    break
                _post(loop, credit[0].release)
                yield item  # type: ignore[misc]
            await runner  # the producer's error, if any
        finally:
            if not runner.done():
                runner.cancel()
                await _wait_out(runner)

    def pull(self, source: AsyncIterator[T], owner: asyncio.AbstractEventLoop) -> AsyncIterator[T]:
        """An iterator for code on the thread's loop over `source`, which belongs to the loop
        `owner` and is advanced there, one item at a time."""
        return _pull(source, owner)

    async def stop(self) -> None:
        """Stop the thread's loop (work still running there is cancelled) and wait for the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The thread's body: run `loop` until stopped, then cancel what is left and close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


async def _pull(source: AsyncIterator[T], owner: asyncio.AbstractEventLoop) -> AsyncIterator[T]:
    async def step() -> tuple[bool, T | None]:
        try:
            return True, await source.__anext__()
        except StopAsyncIteration:
            return False, None

    while True:
        more, item = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step(), owner))
        if not more:
            return
        yield item  # type: ignore[misc]


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    """Schedule `callback` on `loop` from another thread; nothing if that loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _settle(task: asyncio.Task[T], outcome: asyncio.Future[T]) -> None:
    """Copy a finished task's result or error (from another loop) to `outcome`."""
    if outcome.done():
        return
    if task.cancelled():
        outcome.set_exception(LoopThreadStopped("the work was cancelled on its loop thread"))
    elif (exc := task.exception()) is not None:
        outcome.set_exception(exc)
    else:
        outcome.set_result(task.result())


async def _wait_out(fut: asyncio.Future[Any]) -> None:
    """Wait until `fut` is done even if cancelled meanwhile, and consume its outcome."""
    while not fut.done():
        with contextlib.suppress(BaseException):
            await asyncio.shield(fut)
    if not fut.cancelled():
        fut.exception()

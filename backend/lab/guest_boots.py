"""Guests booting in the background: one task per VM name, cancelled when the VM halts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from backend.errors import SysvmError

log = logging.getLogger(__name__)


class GuestBoots:
    """The boots under way, by VM name. A boot that fails is logged: the engine notices a guest
    that never answers (`wait_for_agent`)."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def start(self, name: str, boot: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            try:
                await boot()
            except (SysvmError, OSError) as exc:
                log.warning("guest of %s did not boot: %s", name, exc)
            finally:
                self._tasks.pop(name, None)

        self._tasks[name] = asyncio.create_task(run(), name=f"boot-{name}")

    async def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

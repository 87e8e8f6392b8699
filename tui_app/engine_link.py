"""Keeps the console attached to the engine: a snapshot, then live events; again after a drop.

The subscription is opened before the snapshot is read, so nothing that happens in between is
lost (events already reflected in the snapshot are applied again, which is harmless: each
carries the new values, not a delta).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from backend.errors import EngineUnavailable, SysvmError

if TYPE_CHECKING:
    from backend.api.protocol import EngineAPI
    from backend.api.types import EventRecord, JobInfo, StatusTree

log = logging.getLogger(__name__)

SnapshotHandler = Callable[["StatusTree", "list[JobInfo]"], None]
EventHandler = Callable[["EventRecord"], None]
ConnectionHandler = Callable[[bool, str], None]


class EngineLink:
    """Runs until cancelled: subscribe, read a snapshot, stream events; on loss, retry."""

    def __init__(
        self,
        api: EngineAPI,
        *,
        on_snapshot: SnapshotHandler,
        on_event: EventHandler,
        on_connection: ConnectionHandler,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 10.0,
    ) -> None:
        self.api = api
        self.on_snapshot = on_snapshot
        self.on_event = on_event
        self.on_connection = on_connection
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.connected: bool | None = None  # None until the first attempt ends either way
        self.events_received = 0
        self.last_event_id = 0  # the newest event seen, so a screen can ask for what came before

    async def run(self) -> None:
        delay = self.retry_seconds
        while True:
            reason = await self._session()
            if self.connected:
                delay = self.retry_seconds  # it was up: retry soon, then back off
            self._set_connected(False, reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_retry_seconds)

    async def _session(self) -> str:
        """One connected stretch; returns why it ended, in words."""
        stream: AsyncIterator[EventRecord] | None = None
        pump: asyncio.Task[None] | None = None
        try:
            stream = self.api.subscribe()
            pump = asyncio.create_task(self._pump(stream), name="sysvm-tui-events")
            await asyncio.sleep(0)  # lets an in-process subscription register first
            status = await self.api.status()
            jobs = await self.api.jobs(state="running")
            self.on_snapshot(status, jobs)
            self._set_connected(True, "")
            await pump
            return "the engine closed the event stream"
        except asyncio.CancelledError:
            raise
        except EngineUnavailable as exc:
            return str(exc) or "the engine is not answering"
        except SysvmError as exc:
            return str(exc)
        except Exception as exc:  # any failure of the link means "not connected", never a crash
            log.warning("engine link failed: %s: %s", type(exc).__name__, exc)
            return f"{type(exc).__name__}: {exc}"
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()

    async def _pump(self, stream: AsyncIterator[EventRecord]) -> None:
        async for event in stream:
            self.events_received += 1
            self.last_event_id = max(self.last_event_id, event.id)
            self.on_event(event)

    def _set_connected(self, connected: bool, reason: str) -> None:
        if connected != self.connected:
            self.connected = connected
            self.on_connection(connected, reason)

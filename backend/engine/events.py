"""The event bus: every state change is published once, fanned out to subscribers, and persisted.

Publishing never waits for the database: events are written in batches by a background task,
so a burst of thousands of changes costs subscribers nothing but a queue put.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from backend.api.types import EventRecord
from backend.db.database import Database
from backend.db.models import Event
from backend.db.worker import command

log = logging.getLogger(__name__)

KEEP_EVENTS = 50_000


class Subscription:
    """A subscriber's queue. If the subscriber falls behind by `maxsize`, the oldest are dropped
    and `lagged` counts them, so a slow client can never slow the engine."""

    def __init__(self, bus: EventBus, entities: frozenset[str] | None, maxsize: int) -> None:
        self._bus = bus
        self.entities = entities
        self.queue: asyncio.Queue[EventRecord | None] = asyncio.Queue(maxsize)
        self.lagged = 0

    def offer(self, event: EventRecord) -> None:
        if self.entities is not None and event.entity not in self.entities:
            return
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.lagged += 1
        self.queue.put_nowait(event)

    async def get(self) -> EventRecord | None:
        """The next event, or None when the bus closed."""
        return await self.queue.get()

    def close(self) -> None:
        self._bus._unsubscribe(self)

    def __aiter__(self) -> AsyncIterator[EventRecord]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[EventRecord]:
        while True:
            event = await self.get()
            if event is None:
                return
            yield event


class EventBus:
    def __init__(self, db: Database, *, flush_interval: float = 0.2) -> None:
        self._db = db
        self._subs: list[Subscription] = []
        self._pending: list[EventRecord] = []
        self._next_id = 1
        self._flush_interval = flush_interval
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()

    async def start(self) -> None:
        last = await self._db.run_read(_last_event_id)
        self._next_id = (last or 0) + 1
        self._flusher = asyncio.create_task(self._flush_loop(), name="event-flusher")

    async def stop(self) -> None:
        if self._flusher:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()
        for sub in list(self._subs):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
        self._subs.clear()

    def publish(
        self, entity: str, entity_id: int, kind: str, name: str = "", **fields: Any
    ) -> EventRecord:
        """Record a change and hand it to every matching subscriber (never blocks)."""
        event = EventRecord(
            id=self._next_id,
            ts=datetime.now(UTC).isoformat(timespec="milliseconds"),
            entity=entity,
            entity_id=entity_id,
            kind=kind,
            name=name,
            fields=_jsonable(fields),
        )
        self._next_id += 1
        self._pending.append(event)
        for sub in self._subs:
            sub.offer(event)
        return event

    def subscribe(
        self, entities: Iterable[str] | None = None, *, maxsize: int = 10_000
    ) -> Subscription:
        sub = Subscription(self, frozenset(entities) if entities is not None else None, maxsize)
        self._subs.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    async def recent(
        self, *, since_id: int = 0, limit: int = 200, entity: str | None = None
    ) -> list[EventRecord]:
        """Persisted events after `since_id`, newest last (at most `limit`)."""
        await self.flush()
        return await self._db.run_read(
            functools.partial(_events, since_id=since_id, limit=limit, entity=entity)
        )

    async def flush(self) -> None:
        """Persist what is pending; returns once everything published so far is stored (a
        flush already under way is waited for, so a reader never misses its batch)."""
        async with self._flush_lock:
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        rows = [
            {
                "id": e.id,
                "ts": datetime.fromisoformat(e.ts),
                "entity": e.entity,
                "entity_id": e.entity_id,
                "kind": e.kind,
                "name": e.name,
                "fields": e.fields,
            }
            for e in batch
        ]

        work = functools.partial(
            _insert_events,
            rows=rows,
            prune_to=batch[-1].id - KEEP_EVENTS,
            prune=batch[-1].id % 5000 < len(batch),  # now and then, not on every flush
        )
        try:
            await self._db.run_write(work)
        except Exception:
            log.exception("could not persist %d events", len(batch))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush()


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, datetime):
            v = v.isoformat(timespec="seconds")
        out[k] = v
    return out


@command
def _last_event_id(s: Session) -> int | None:
    return s.scalar(select(func.max(Event.id)))


@command
def _events(s: Session, *, since_id: int, limit: int, entity: str | None) -> list[EventRecord]:
    q = select(Event).where(Event.id > since_id)
    if entity:
        q = q.where(Event.entity == entity)
    q = q.order_by(Event.id.desc()).limit(limit)
    return [
        EventRecord(
            id=r.id,
            ts=r.ts.isoformat(timespec="milliseconds"),
            entity=r.entity,
            entity_id=r.entity_id,
            kind=r.kind,
            name=r.name,
            fields=r.fields,
        )
        for r in reversed(s.scalars(q).all())
    ]


@command
def _insert_events(s: Session, *, rows: list[dict[str, Any]], prune_to: int, prune: bool) -> None:
    """Store a batch of events; with `prune`, drop those up to id `prune_to`."""
    s.execute(insert(Event), rows)
    if prune:
        s.execute(delete(Event).where(Event.id <= prune_to))

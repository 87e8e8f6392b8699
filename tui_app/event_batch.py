"""Engine events gathered for one frame, then handed over together.

The engine may send thousands of events a second; a screen that redrew on each would fall
behind. Each screen or widget that follows events queues them here and gets them back once a
frame, as one list, to patch what changed in one go.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from textual.message_pump import MessagePump

    from backend.api.types import EventRecord

FRAME_SECONDS = 1 / 30


class EventBatch:
    """Queues events for `owner`; calls `apply(events)` at most once a frame. While `held`
    (before the first load, or while a list is read again) events wait and nothing is applied;
    `release()` hands them over."""

    def __init__(
        self,
        owner: MessagePump,
        apply: Callable[[list[EventRecord]], None],
        *,
        held: bool = True,
        frame: float = FRAME_SECONDS,
    ) -> None:
        self.owner = owner
        self.apply = apply
        self.held = held
        self.frame = frame
        self.pending: list[EventRecord] = []
        self._armed = False

    def add(self, event: EventRecord) -> None:
        self.pending.append(event)
        if not self.held:
            self._arm()

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False
        if self.pending:
            self._arm()

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            self.owner.set_timer(self.frame, self._flush)

    def _flush(self) -> None:
        self._armed = False
        if self.held:
            return  # `release` arms again
        events, self.pending = self.pending, []
        if events:
            self.apply(events)

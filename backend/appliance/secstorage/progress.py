"""Progress lines of a running transfer: throttled, with a sliding-window rate and a heartbeat."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

PROGRESS_INTERVAL = 0.25  # at most this often while bytes flow
HEARTBEAT_INTERVAL = 1.0  # at least this often, even when nothing arrives
RATE_WINDOW = 2.0
_SAMPLE_SPACING = 0.05


class ProgressMeter:
    """Counts bytes and calls `emit` with `{"event": "progress", "bytes", "total", "rate"}` lines."""

    def __init__(
        self,
        emit: Callable[[dict[str, object]], None],
        *,
        interval: float = PROGRESS_INTERVAL,
        heartbeat: float = HEARTBEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._interval = interval
        self._heartbeat = heartbeat
        self._clock = clock
        self.bytes = 0
        self.total: int | None = None
        self.started = False
        self._samples: deque[tuple[float, int]] = deque()
        self._last_emit = float("-inf")

    def begin(self, done: int, total: int | None) -> None:
        """Start (or restart from `done`) counting, and say so at once."""
        now = self._clock()
        self.bytes, self.total, self.started = done, total, True
        self._samples.clear()
        self._samples.append((now, done))
        self._send(now)

    def update(self, done: int) -> None:
        """Record `done` bytes; emit when the last line is older than the interval."""
        now = self._clock()
        self.bytes = done
        if not self._samples or now - self._samples[-1][0] >= _SAMPLE_SPACING:
            self._samples.append((now, done))
        if now - self._last_emit >= self._interval:
            self._send(now)

    def tick(self) -> None:
        """Called periodically: emit a line if none went out for a heartbeat interval (a stall shows rate 0)."""
        now = self._clock()
        if self.started and now - self._last_emit >= self._heartbeat:
            self._send(now)

    def rate(self, now: float | None = None) -> int:
        """Bytes per second over the last RATE_WINDOW seconds."""
        if not self._samples:
            return 0
        now = self._clock() if now is None else now
        while len(self._samples) > 1 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        elapsed = now - t0
        return int((self.bytes - b0) / elapsed) if elapsed > 0 else 0

    def snapshot(self) -> dict[str, object]:
        return {"bytes": self.bytes, "total": self.total, "rate": self.rate()}

    def _send(self, now: float) -> None:
        self._last_emit = now
        self._emit(
            {"event": "progress", "bytes": self.bytes, "total": self.total, "rate": self.rate(now)}
        )

"""A transfer's progress in words: percent, bytes, speed and ETA, and the speed measured.

The Templates screen and the activity strip both show transfers; they word them the same
way through this module. Speed comes from the engine when it reports one (the SSVM's agent
measures it), else from the bytes of successive events over a sliding window of their
engine timestamps (so events delivered together in one frame do not read as a burst).
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime

WINDOW_SECONDS = 5.0
WAITING_PREFIX = "waiting"
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


class TransferMeter:
    """Bytes done over time for one transfer; `rate` is bytes per second (0 until known)."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, ts: str | float, bytes_done: int) -> None:
        """A sample at `ts` (an event's ISO timestamp, or seconds)."""
        t = ts if isinstance(ts, float) else _seconds(ts)
        if t is None:
            return
        if self._samples and bytes_done < self._samples[-1][1]:
            self._samples.clear()  # restarted from scratch (no Range support)
        self._samples.append((t, bytes_done))
        while len(self._samples) > 2 and t - self._samples[0][0] > self.window:
            self._samples.popleft()

    @property
    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB", 1_040_000 -> "0.99 MiB" (at most 4 digits); bytes without a decimal."""
    for unit in UNITS:
        if abs(n) < 1000 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        if abs(n) < 1024:
            return f"{n / 1024:.2f} {UNITS[UNITS.index(unit) + 1]}"
        n /= 1024
    raise AssertionError("unreachable")


def bytes_of(done: int, total: int) -> str:
    """ "12.6/30.0 MiB": both in the unit of the total (or "12.6 MiB" when it is unknown)."""
    if total <= 0:
        return human_bytes(done)
    scale, unit = 1.0, "B"
    for unit in UNITS:
        if total / scale < 1024 or unit == UNITS[-1]:
            break
        scale *= 1024
    if unit == "B":
        return f"{done}/{total} B"
    return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


def speed_text(rate: float) -> str:
    return f"{human_bytes(rate)}/s" if rate > 0 else "-- B/s"


def eta_text(done: int, total: int, rate: float) -> str:
    """ "ETA 7s", "ETA 2m05s", "ETA 1h02m"; "ETA --" when it cannot be told."""
    if rate <= 0 or total <= 0 or done > total:
        return "ETA --"
    seconds = int((total - done) / rate + 0.5)
    if seconds < 60:
        return f"ETA {seconds}s"
    if seconds < 3600:
        return f"ETA {seconds // 60}m{seconds % 60:02d}s"
    return f"ETA {seconds // 3600}h{seconds % 3600 // 60:02d}m"


def percent(done: int, total: int) -> float:
    return 100.0 * done / total if total > 0 else 0.0


def waiting_words(reason: str, zone: str = "") -> str | None:
    """The engine's "waiting for a Running secondary storage VM in the zone", said short:
    "waiting: no Running SSVM in zone1"; None when the transfer is not waiting."""
    if not reason.startswith(WAITING_PREFIX):
        return None
    return f"waiting: no Running SSVM in {zone or 'the zone'}"


def _seconds(ts: str) -> float | None:
    """An ISO timestamp in seconds; one without a zone is UTC (as the engine stores them)."""
    try:
        when = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()

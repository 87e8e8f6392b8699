"""The transfers running on this appliance host, one per image-store slot: for status, delete and preemption."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from backend.appliance.secstorage.failure import TransferFailed
from backend.appliance.secstorage.progress import ProgressMeter
from backend.appliance.secstorage.request import TemplateSlot

STOP_WAIT = 5.0

SlotKey = tuple[str, str]  # (resolved store root, dest)


@dataclass
class RunningTransfer:
    """One download or upload in flight, and who runs it."""

    vm_name: str
    kind: str  # "download" | "upload"
    slot: TemplateSlot
    meter: ProgressMeter
    started_at: float = field(default_factory=time.time)
    task: asyncio.Task[dict[str, object]] | None = None
    stopped_because: TransferFailed | None = None  # told to its client when stopped from here

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "dest": self.slot.dest,
            "name": self.slot.name,
            "started_at": round(self.started_at, 3),
            **self.meter.snapshot(),
        }


class TransferRegistry:
    """At most one transfer per slot: a newer request for the same slot stops the older one first.

    The engine is the only client, so a second request for a slot means the first one's client is
    gone (connection cut, SSVM replaced) even if this side has not noticed yet.
    """

    def __init__(self) -> None:
        self._running: dict[SlotKey, RunningTransfer] = {}

    async def claim(self, key: SlotKey, entry: RunningTransfer, why: TransferFailed) -> bool:
        """Make `entry` the slot's transfer, stopping a running one (told `why`); False if it would not stop."""
        while (prior := self._running.get(key)) is not None:
            prior.stopped_because = why
            if not await self._stop(prior):
                return False
            if self._running.get(key) is prior:
                del self._running[key]
        self._running[key] = entry
        return True

    def release(self, key: SlotKey, entry: RunningTransfer) -> None:
        if self._running.get(key) is entry:
            del self._running[key]

    async def stop(self, key: SlotKey, why: TransferFailed) -> bool:
        """Stop the slot's transfer (if any, telling it `why`) and wait for it to close its files;
        False if it would not stop."""
        entry = self._running.get(key)
        if entry is None:
            return True
        entry.stopped_because = why
        stopped = await self._stop(entry)
        if stopped:
            self.release(key, entry)
        return stopped

    def of_vm(self, vm_name: str) -> list[RunningTransfer]:
        return [e for e in self._running.values() if e.vm_name == vm_name]

    @staticmethod
    async def _stop(entry: RunningTransfer) -> bool:
        task = entry.task
        if task is None or task.done():
            return True
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_WAIT)
        return task.done()

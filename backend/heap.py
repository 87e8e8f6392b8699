"""Keeps the cyclic garbage collector's automatic full scans short, so none stalls the loop.

An automatic full (generation 2) collection scans every tracked object that is not frozen, and
with a lab of hundreds of VMs loaded that took ~70 ms, in the middle of whatever the engine was
doing. Freezing the objects that survive a collection takes them out of those scans: later
automatic collections only scan what was made since. Settling (collect, then freeze) is done at
quiet moments: when the engine has started, and when the job runner has gone idle after the
unfrozen heap grew a lot (a lab brought up, a big import); it scans only the unfrozen objects.

Frozen objects that later die in reference cycles are not freed by automatic collections, so
once the frozen heap has doubled since the last full settling, the next settling unfreezes
first and scans everything: such garbage stays bounded by the live heap.

The router appliance (a long-lived process keeping a parsed 10,000-rule bundle) freezes after each
command and settles once it has been quiet for a second, with this same bound.

Even the objects of work in flight are costly to scan (a burst of 100 router applies left ~25k
of them, and a full collection then took 50-100 ms of CPU), so automatic full collections are
also made rarer: one per FULL_EVERY collections of the middle generation instead of Python's 10.
Cyclic garbage that reached the oldest generation may wait longer to be freed, until the next
settling or automatic full collection; the younger generations are collected as usual.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

FULL_EVERY = 100
"""Collections of the middle generation per automatic full collection (Python's default: 10)."""

GROWTH = 20_000
"""Objects that survived into the oldest generation since the last settling, worth another."""


class HeapSettler:
    """Collects once and freezes what survives, when the engine is quiet and the heap grew."""

    def __init__(self, growth: int = GROWTH) -> None:
        self.growth = growth
        self.settled = 0
        self._frozen_at_full = 0

    def start(self) -> None:
        """Make automatic full collections rarer, and settle what the engine has loaded so far."""
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_EVERY)
        self.settle()

    def settle(self) -> float:
        """Collect the unfrozen objects (all of them, once the frozen heap has doubled since the
        first settling or the last full one) and freeze the survivors; returns the seconds taken."""
        start = time.perf_counter()
        gc.collect()
        gc.freeze()
        full = 0 < self._frozen_at_full < gc.get_freeze_count() // 2
        if full:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        if full or not self._frozen_at_full:
            self._frozen_at_full = gc.get_freeze_count()
        self.settled += 1
        return time.perf_counter() - start

    def settle_if_grown(self) -> bool:
        """Settle if at least `growth` objects reached the oldest generation since the last time."""
        grown = len(gc.get_objects(generation=2))
        if grown < self.growth:
            return False
        took = self.settle()
        log.info("heap settled: %d objects had grown old; took %.0f ms", grown, took * 1000)
        return True

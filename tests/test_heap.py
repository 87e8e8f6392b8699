"""The engine's heap settling: survivors frozen out of the collector's full scans, and cycles that
died while frozen reclaimed once the frozen heap has doubled (backend.heap)."""

from __future__ import annotations

import gc
import weakref

from backend.heap import HeapSettler


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_settling_freezes_survivors_out_of_the_collectors_scans() -> None:
    heap = HeapSettler()
    node = _Node()

    heap.settle()

    assert gc.get_freeze_count() > 0
    assert all(o is not node for o in gc.get_objects())  # frozen: in no generation


def test_cycles_that_died_frozen_are_reclaimed_once_the_frozen_heap_doubled() -> None:
    heap = HeapSettler()
    heap.settle()
    node = _Node()
    gone = weakref.ref(node)
    heap.settle()  # node is frozen now
    del node
    gc.collect()
    assert gone() is not None  # frozen cycles are not collected automatically

    kept = [_Node() for _ in range(2 * gc.get_freeze_count())]
    heap.settle()  # the frozen heap has more than doubled: this one scans everything

    assert gone() is None
    del kept


def test_settling_happens_only_once_enough_objects_have_grown_old() -> None:
    heap = HeapSettler(growth=5_000)
    heap.settle()
    assert not heap.settle_if_grown()

    kept = [_Node() for _ in range(6_000)]
    gc.collect()  # they survive into the oldest generation
    assert heap.settle_if_grown()
    assert heap.settled == 2 and len(gc.get_objects(generation=2)) < 5_000
    del kept

"""How late the running event loop wakes a 1 ms sleep: its stalls, for the benchmarks."""

from __future__ import annotations

import asyncio
import statistics


class LoopLag:
    """Samples how late a 1 ms sleep wakes up while the `with` block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.001)
            self.samples.append((loop.time() - t - 0.001) * 1000)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def summary(self) -> dict[str, float]:
        s = sorted(self.samples) or [0.0]
        return {
            "max_ms": round(s[-1], 2),
            "p99_ms": round(s[int(len(s) * 0.99)], 2),
            "median_ms": round(statistics.median(s), 3),
        }

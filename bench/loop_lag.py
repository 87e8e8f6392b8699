"""How late the running event loop wakes a 1 ms sleep: its stalls, for the benchmarks. Also
the CPU time of every iteration's work (`iteration_cpu_*`): the part of a stall that the loop's
own callbacks made, whatever the machine's scheduling added to it.

With `trace_over_ms`, a watchdog thread also samples the loop thread's stack whenever the
loop has not woken for that long (and where the other threads were), collections of the
garbage collector are timed, and so are the loop's iterations: one that ran that long after its
poll returned, with its CPU time, its time waiting for a CPU, how many callbacks it ran and
whose they were (a burst of ready callbacks shows as many callbacks and CPU close to the wall
time; waiting for a CPU as that wait; what is left is mostly waiting for the GIL). That is how
the causes of stalls are found. A stall in which the watchdog got no sample at all was one
thread holding the GIL throughout (a collection, a C call).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO


class LoopLag:
    """Samples how late a 1 ms sleep wakes up while the `with` block runs."""

    def __init__(self, *, trace_over_ms: float | None = None) -> None:
        self.samples: list[float] = []
        self.stacks: collections.Counter[str] = collections.Counter()
        self.gc_pauses: list[tuple[int, float, float, str]] = []
        self.episodes: list[tuple[float, list[str]]] = []
        self._gc_started = (0.0, 0.0)
        self._task: asyncio.Task[None] | None = None
        self._trace_over = None if trace_over_ms is None else trace_over_ms / 1000
        self._beat = time.perf_counter()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        # (wall ms, CPU ms, ms waiting for a CPU, callbacks, the three owners of callbacks that
        # used most CPU)
        self.iterations: list[tuple[float, float, float, int, str]] = []
        self._untime: Callable[[], None] | None = None
        # CPU ms of every iteration's work: what the loop's own callbacks cost, whatever the
        # machine's scheduling added to the stalls
        self.iteration_cpu: list[float] = []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            self._beat = time.perf_counter()
            await asyncio.sleep(0.001)
            self.samples.append((loop.time() - t - 0.001) * 1000)

    def _time_gc(self, phase: str, info: dict[str, int]) -> None:
        """gc callback: record collections over 1 ms (generation, ms, CPU ms of the collecting
        thread, thread): they hold the GIL, except while finalizers run Python code."""
        if phase == "start":
            self._gc_started = (time.perf_counter(), time.thread_time())
            return
        took = (time.perf_counter() - self._gc_started[0]) * 1000
        cpu = (time.thread_time() - self._gc_started[1]) * 1000
        if took > 1:
            name = threading.current_thread().name
            self.gc_pauses.append((info["generation"], round(took, 1), round(cpu, 1), name))

    def _watch(self, loop_thread: int, limit: float) -> None:
        """Sample the loop thread's innermost frames every `limit`/4 while it is `limit` late;
        also keep, per stall, where every other thread was at each sample."""
        beat, seen = self._beat, list[str]()
        while not self._stop.wait(limit / 4):
            late = time.perf_counter() - self._beat
            if self._beat != beat and seen:
                self.episodes.append(((self._beat - beat) * 1000, seen))
                seen = []
            beat = self._beat
            if late < limit:
                continue
            frames = sys._current_frames()
            frame = frames.get(loop_thread)
            if frame is not None:
                stack = traceback.format_stack(frame)[-12:]
                self.stacks["".join(stack)] += 1
            seen.append(
                " | ".join(
                    f"{_thread_name(ident)}: {_where(f)}"
                    for ident, f in frames.items()
                    if ident != threading.get_ident() and not _idle_worker(f)
                )
            )

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self._trace_over is not None:
            self._watchdog = threading.Thread(
                target=self._watch,
                args=(threading.get_ident(), self._trace_over),
                name="loop-lag-watchdog",
                daemon=True,
            )
            self._watchdog.start()
            gc.callbacks.append(self._time_gc)
        self._time_iterations(asyncio.get_running_loop(), self._trace_over)
        return self

    def _time_iterations(self, loop: asyncio.AbstractEventLoop, limit: float | None) -> None:
        """Time every iteration's work (after the poll): its CPU time, in `iteration_cpu`; with
        a `limit`, also record the iterations that took that long or longer, in detail."""
        selector = loop._selector  # type: ignore[attr-defined]
        poll, run_once = selector.select, loop._run_once  # type: ignore[attr-defined]
        handle_run = asyncio.events.Handle._run
        me = threading.get_ident()
        # perf_counter, thread_time, run queue wait, voluntary switches and the machine's
        # stolen time after the poll; callbacks run
        polled: list[float] = [0.0, 0.0, 0.0, 0.0, 0.0, 0]
        by_owner: collections.defaultdict[str, float] = collections.defaultdict(float)  # CPU ms
        slowest: list[Any] = [0.0, ""]  # the callback that took longest (wall), and whose

        def timed_poll(timeout: float | None = None) -> object:
            events = poll(timeout)
            polled[0], polled[1] = time.perf_counter(), time.thread_time()
            if limit is not None:
                polled[2:] = [_queued(), _switches(), _stolen(), 0]
                by_owner.clear()
                slowest[:] = [0.0, ""]
            return events

        def counted_run(handle: asyncio.Handle) -> None:
            if threading.get_ident() != me:
                handle_run(handle)
                return
            polled[5] += 1
            started, wall = time.thread_time(), time.perf_counter()
            handle_run(handle)
            by_owner[_owner(handle)] += (time.thread_time() - started) * 1000
            if (took := time.perf_counter() - wall) > slowest[0]:
                slowest[:] = [took, _owner(handle)]

        def timed_run_once() -> None:
            polled[0] = 0.0
            run_once()
            if not polled[0]:
                return
            cpu = time.thread_time() - polled[1]
            self.iteration_cpu.append(cpu * 1000)
            if limit is not None and (took := time.perf_counter() - polled[0]) >= limit:
                queued = _queued() - polled[2]
                switches = _switches() - polled[3]
                stolen = _stolen() - polled[4]
                most = sorted(by_owner.items(), key=lambda kv: -kv[1])[:3]
                owners = ", ".join(f"{n} {ms:.1f}" for n, ms in most)
                owners += f"; longest callback {slowest[0] * 1000:.1f} ms ({slowest[1]})"
                self.iterations.append(
                    (
                        took * 1000,
                        cpu * 1000,
                        queued * 1000,
                        switches,
                        stolen,
                        int(polled[5]),
                        owners,
                    )
                )

        selector.select, loop._run_once = timed_poll, timed_run_once  # type: ignore[attr-defined]
        if limit is not None:
            asyncio.events.Handle._run = counted_run  # type: ignore[method-assign,assignment]

        def untime() -> None:
            # the iteration running now (the `with` block's exit, and whatever the caller does
            # next in the same step) is not the loop's work under test: not recorded
            polled[0] = 0.0
            del selector.select, loop._run_once  # type: ignore[attr-defined]
            asyncio.events.Handle._run = handle_run  # type: ignore[method-assign]

        self._untime = untime

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self._stop.set()
        if self._time_gc in gc.callbacks:
            gc.callbacks.remove(self._time_gc)
        if self._untime is not None:
            self._untime()
        if self._watchdog is not None:
            self._watchdog.join()

    def summary(self) -> dict[str, float]:
        s = sorted(self.samples) or [0.0]
        return {
            "max_ms": round(s[-1], 2),
            "p99_ms": round(_p99(s), 2),
            "median_ms": round(statistics.median(s), 3),
            "over_10ms": sum(ms > 10 for ms in s),
            "iteration_cpu_max_ms": round(max(self.iteration_cpu, default=0.0), 2),
            "iteration_cpu_p99_ms": round(_p99(self.iteration_cpu), 3),
        }

    def print_stacks(self, file: TextIO | None = None) -> None:
        """Print the sampled stacks of stalls, most frequent first, to `file` (stderr)."""
        out = file or sys.stderr
        for stack, count in self.stacks.most_common():
            print(f"---- {count} sample(s) of the late loop in:\n{stack}", file=out)
        for ms, seen in sorted(self.episodes, reverse=True)[:5]:
            # The watchdog needs the GIL too: a long gap means it was starved, not how long
            # the loop was late (the JSON figures say that).
            print(f"---- watchdog gap ~{ms:.0f} ms, samples:", *seen, sep="\n  ", file=out)
        for ms, cpu, queued, slept, stolen, ran, owners in sorted(self.iterations, reverse=True)[
            :10
        ]:
            print(
                f"---- loop iteration: {ms:.1f} ms ({cpu:.1f} CPU, {queued:.1f} waiting for a "
                f"CPU, {slept:.0f} sleeps, the machine's vCPUs stolen {stolen:.0f} ms), {ran} "
                f"callbacks; most CPU (ms): {owners}",
                file=out,
            )
        for generation, ms, cpu, thread in self.gc_pauses:
            print(f"---- gc of generation {generation}: {ms} ms ({cpu} CPU) on {thread}", file=out)


class MachineLag:
    """How late a real-time sleeper wakes up, on each CPU, while the `with` block runs: the
    stalls that the machine alone (the hypervisor taking its vCPUs away, the kernel) makes any
    thread suffer, the floor under the loop's figures of the same run. One process per CPU,
    each sleeping 1 ms at a time under SCHED_FIFO (it preempts every other thread of the
    machine, so only the machine can make it late) where permitted, else at normal priority
    (said in `policy`)."""

    def __init__(self) -> None:
        self._probes: list[subprocess.Popen[str]] = []
        self.per_cpu: dict[int, list[float]] = {}
        self.policy = "fifo"

    def __enter__(self) -> MachineLag:
        for cpu in sorted(os.sched_getaffinity(0)):
            probe = subprocess.Popen(
                [sys.executable, __file__, "--machine-probe", str(cpu)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self._probes.append(probe)
        for probe in self._probes:
            assert probe.stdout is not None
            if probe.stdout.readline().strip() != "fifo":
                self.policy = "normal"
        return self

    def __exit__(self, *exc: object) -> None:
        for probe in self._probes:
            out, _ = probe.communicate("", timeout=30)
            found = json.loads(out)
            self.per_cpu[found["cpu"]] = found["late_ms"]

    def summary(self) -> dict[str, Any]:
        every = sorted(ms for lates in self.per_cpu.values() for ms in lates) or [0.0]
        worst = {
            f"cpu{cpu}": round(max(lates, default=0.0), 2) for cpu, lates in self.per_cpu.items()
        }
        return {
            "max_ms": round(every[-1], 2),
            "p99_ms": round(_p99(every), 2),
            "over_10ms": sum(ms > 10 for ms in every),
            "max_per_cpu_ms": worst,
            "policy": self.policy,
        }


def _probe_machine(cpu: int) -> None:
    """`--machine-probe CPU` (a MachineLag child): sleep 1 ms at a time on CPU, at real-time
    priority where permitted, until stdin closes; print the lateness of every wake as JSON."""
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
        print("fifo", flush=True)
    except PermissionError:
        print("normal", flush=True)
    late: list[float] = []
    while not done.is_set():
        t = time.perf_counter()
        time.sleep(0.001)
        late.append(round((time.perf_counter() - t - 0.001) * 1000, 3))
    print(json.dumps({"cpu": cpu, "late_ms": late}))


def _p99(values: list[float]) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[int(len(ordered) * 0.99)]


def _queued() -> float:
    """Seconds this thread has waited on a run queue (runnable, no CPU free), from Linux's
    schedstat; 0 where that is not available."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _switches() -> float:
    """How often this thread has gone to sleep (waiting for the GIL, a lock, I/O): Linux's
    voluntary context switches; 0 where that is not available."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/status", "rb") as f:
            for line in f:
                if line.startswith(b"voluntary_ctxt_switches:"):
                    return float(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return 0.0


def _stolen() -> float:
    """Milliseconds the hypervisor has kept this machine's vCPUs from running (steal time, all
    CPUs, in 10 ms ticks); 0 where that is not available."""
    try:
        with open("/proc/stat", "rb") as f:
            return float(f.readline().split()[8]) * 10
    except (OSError, IndexError, ValueError):
        return 0.0


def _owner(handle: asyncio.Handle) -> str:
    """Who a callback works for: its task's name without numbers (ping-host-#), or the
    callback's own name."""
    callback = handle._callback  # type: ignore[attr-defined]
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", "") or task.get_name()
        return "task " + re.sub(r"\d+", "#", name)
    return re.sub(r"\d+", "#", getattr(callback, "__qualname__", repr(callback)))


def _idle_worker(frame: object) -> bool:
    """An executor's or aiosqlite's thread waiting for work (its innermost Python frame is its
    loop); a busy one is shown."""
    innermost = _where(frame).split(" < ", 1)[0]
    return innermost.endswith((" _worker", " _connection_worker_thread"))


def _thread_name(ident: int) -> str:
    thread = threading._active.get(ident)  # type: ignore[attr-defined]
    return thread.name if thread is not None else str(ident)


def _where(frame: object) -> str:
    """file:line function of a frame and of its two callers."""
    parts = []
    for summary in traceback.extract_stack(frame, limit=3)[::-1]:  # type: ignore[arg-type]
        parts.append(f"{summary.filename.rsplit('/', 1)[-1]}:{summary.lineno} {summary.name}")
    return " < ".join(parts)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--machine-probe":
        _probe_machine(int(sys.argv[2]))
    else:
        sys.exit("usage: python bench/loop_lag.py --machine-probe CPU (started by MachineLag)")

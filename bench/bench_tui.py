"""Console at scale, headless: time to first screen, cursor-move latency, 1,000 events/s.

Runs the real console (`SysvmApp`, Pilot at 80x24) against a real in-process engine, twice:
on a big lab and on a one-zone baseline, and prints ONE JSON object with both sets of figures
and their ratios. Not a test: nothing is asserted.

    .venv/bin/python bench/bench_tui.py                      # 200 zones x (1 host, 2 nets x 10 VMs)
    .venv/bin/python bench/bench_tui.py --zones 20 --synthetic 10000

Figures:
- first_screen_s: from starting the app to the inventory drawn (status read, tree built,
  painted); median of --repeat runs, each a new app. status_call_s: EngineAPI.status() alone.
- cursor_ms: one `j` key, as a terminal sends it, until the frame after the cursor moved
  (median and p95 of --presses, 50 ms apart).
- events: --rate events/s for --seconds, published on the engine's bus (state changes of real
  objects, as the engine would publish them): the worst lateness of a 60 Hz frame timer
  (max_frame_lag_ms), how many batches the tree applied them in, the most events waiting at a
  frame, and how long after the last one the tree had applied everything (drain_ms);
  engine_alone: the same load with no console running (the engine shares the loop in-process,
  so its own stalls show in the console's frame lag too).
- --synthetic N adds N guest VMs to the tree through "created" events before measuring (for
  when a lab of the wanted size takes too long to build); they are in the tree, not in status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textual import events  # noqa: E402

from backend.config import load_config  # noqa: E402
from backend.engine.core import Engine  # noqa: E402
from tui_app.app import SysvmApp  # noqa: E402

SIZE = (80, 24)
FRAME = 1 / 60


async def build_lab(zones: int, hosts: int, networks: int, vms: int) -> tuple[Engine, float]:
    home = Path(tempfile.mkdtemp(prefix="sysvm-bench-tui-"))
    engine = Engine(load_config(home=home, env={"SYSVM_HOME": str(home)}))
    await engine.start()
    started = time.perf_counter()
    job = await engine.lab_up(zones=zones, hosts=hosts, networks=networks, vms=vms)
    job = await engine.wait_job(job.id, 3600)
    if job.state != "succeeded":
        raise SystemExit(f"lab.up {job.state}: {job.error}")
    return engine, time.perf_counter() - started


def count(status: dict[str, Any]) -> dict[str, int]:
    zones = status["zones"]
    nets = [n for z in zones for n in z["networks"]]
    return {
        "zones": len(zones),
        "hosts": sum(len(z["hosts"]) for z in zones),
        "system_vms": sum(len(z["system_vms"]) for z in zones),
        "networks": len(nets),
        "guest_vms": sum(len(n["vms"]) for n in nets),
    }


async def wait_for(pilot: Any, condition: Any, timeout: float = 600) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise SystemExit("timed out")
        await asyncio.sleep(0.001)
        await pilot.pause(0)


def add_synthetic(engine: Engine, status: dict[str, Any], n: int) -> list[tuple[str, int, str]]:
    """Publish "created" events for `n` extra guest VMs, spread over the lab's networks."""
    nets = [(z["id"], net["id"], net["name"]) for z in status["zones"] for net in z["networks"]]
    out = []
    for i in range(n):
        zone_id, net_id, net_name = nets[i % len(nets)]
        name = f"{net_name}-syn{i}"
        vm_id = 10_000_000 + i
        engine.bus.publish(
            "guest_vm",
            vm_id,
            "created",
            name,
            state="Running",
            ip=f"10.250.{i // 250 % 250}.{i % 250 + 1}",
            network_id=net_id,
            zone_id=zone_id,
        )
        out.append(("guest_vm", vm_id, name))
    return out


async def measure(
    engine: Engine,
    *,
    presses: int,
    rate: int,
    seconds: float,
    synthetic: int,
    repeat: int,
    settle: float,
) -> dict[str, Any]:
    async def first_screen() -> float:
        app = SysvmApp(engine, clock=False)
        started = time.perf_counter()
        async with app.run_test(size=SIZE) as pilot:
            tree = app.main_screen.inventory
            await wait_for(pilot, lambda: app.main_screen.is_mounted and tree.loaded)
            await pilot.pause()
            return time.perf_counter() - started

    status = await engine.status()
    objects = count(status)  # type: ignore[arg-type]
    targets = [("system_vm", v["id"], v["name"]) for z in status["zones"] for v in z["system_vms"]]
    targets += [
        ("guest_vm", vm["id"], vm["name"])
        for z in status["zones"]
        for n in z["networks"]
        for vm in n["vms"]
    ]
    await asyncio.sleep(settle)  # the engine's first passes over a new lab are done
    engine_alone = await engine_lag(engine, targets, rate, seconds)
    await engine.bus.flush()  # the events just published are written before the next phase
    await asyncio.sleep(1.0)
    t = time.perf_counter()
    await engine.status()
    status_s = time.perf_counter() - t
    first_screens = [await first_screen() for _ in range(repeat - 1)]
    app = SysvmApp(engine, clock=False)
    started = time.perf_counter()
    async with app.run_test(size=SIZE) as pilot:
        tree = app.main_screen.inventory
        await wait_for(pilot, lambda: app.main_screen.is_mounted and tree.loaded)
        await pilot.pause()
        first_screens.append(time.perf_counter() - started)

        if synthetic:
            applied = tree.applied_events
            targets += add_synthetic(engine, status, synthetic)  # type: ignore[arg-type]
            await wait_for(pilot, lambda: tree.applied_events >= applied + synthetic)
            await pilot.pause()
            objects["guest_vms_synthetic"] = synthetic
        objects["tree_items"] = sum(1 for _ in tree.objects())

        # Cursor moves: open the first zone's groups so there is somewhere to go.
        for group in tree.zones[0].children:
            tree.expand_path(*group.key)
        await pilot.pause()
        latencies = []
        for _ in range(presses):
            if tree.cursor_line >= tree.last_line:
                tree.move_cursor_to_line(0)  # back to the top (not timed)
                await pilot.pause(0.05)
            latencies.append(await press_to_frame(app, tree) * 1000)
            await asyncio.sleep(0.05)  # a brisk operator: 20 presses a second

        # Events: `rate` per second for `seconds`, while a 60 Hz timer measures frame lag.
        lags: list[float] = []
        backlog: list[int] = []
        published = 0
        applied_before, batches_before = tree.applied_events, tree.batches
        last_tick = time.perf_counter()

        def tick() -> None:
            nonlocal last_tick
            now = time.perf_counter()
            lags.append(max(0.0, now - last_tick - FRAME) * 1000)
            last_tick = now
            backlog.append(published - (tree.applied_events - applied_before))

        probe = app.set_interval(FRAME, tick)
        states = ("Stopping", "Stopped", "Starting", "Running")
        t0 = time.perf_counter()
        i = 0
        while (elapsed := time.perf_counter() - t0) < seconds:
            due = int(elapsed * rate)
            while published < due:
                entity, obj_id, name = targets[i % len(targets)]
                engine.bus.publish(entity, obj_id, "updated", name, state=states[i % 4])
                published += 1
                i += 1
            await asyncio.sleep(0.005)
        end = time.perf_counter()
        await wait_for(pilot, lambda: tree.applied_events - applied_before >= published)
        drain = (time.perf_counter() - end) * 1000
        probe.stop()
        # Leave every object Running again.
        for entity, obj_id, name in targets:
            engine.bus.publish(entity, obj_id, "updated", name, state="Running")
        await pilot.pause(0.2)

    latencies.sort()
    return {
        "objects": objects,
        "first_screen_s": round(statistics.median(first_screens), 3),
        "first_screen_runs_s": [round(t, 3) for t in first_screens],
        "status_call_s": round(status_s, 3),
        "cursor_ms": {
            "median": round(statistics.median(latencies), 2),
            "p95": round(latencies[int(len(latencies) * 0.95) - 1], 2),
            "max": round(latencies[-1], 2),
            "presses": presses,
        },
        "events": {
            "rate_per_s": rate,
            "seconds": seconds,
            "published": published,
            "max_frame_lag_ms": round(max(lags, default=0.0), 1),
            "p95_frame_lag_ms": round(sorted(lags)[int(len(lags) * 0.95) - 1], 1) if lags else 0,
            "tree_batches": tree.batches - batches_before,
            "max_waiting_events": max(backlog, default=0),
            "drain_ms": round(drain, 1),
            "engine_alone": engine_alone,
        },
    }


async def engine_lag(
    engine: Engine, targets: list[tuple[str, int, str]], rate: int, seconds: float
) -> dict[str, float]:
    """The same event load with no console: how late a 60 Hz timer runs on the engine's own
    loop (what the console cannot do better than, sharing the loop in-process)."""
    lags: list[float] = []
    done = False

    async def probe() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(FRAME)
            now = time.perf_counter()
            lags.append(max(0.0, now - last - FRAME) * 1000)
            last = now

    task = asyncio.create_task(probe())
    states = ("Stopping", "Stopped", "Starting", "Running")
    published, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        while published < int(elapsed * rate):
            entity, obj_id, name = targets[published % len(targets)]
            engine.bus.publish(entity, obj_id, "updated", name, state=states[published % 4])
            published += 1
        await asyncio.sleep(0.005)
    done = True
    await task
    for entity, obj_id, name in targets:
        engine.bus.publish(entity, obj_id, "updated", name, state="Running")
    lags.sort()
    return {
        "max_frame_lag_ms": round(lags[-1], 1) if lags else 0.0,
        "p95_frame_lag_ms": round(lags[int(len(lags) * 0.95) - 1], 1) if lags else 0.0,
    }


async def press_to_frame(app: SysvmApp, tree: Any) -> float:
    """Seconds from a `j` arriving (as from the terminal) to the frame after the cursor moved.

    (Pilot's `press` waits for the whole process to go idle, which the engine sharing the
    process never is; this times what the operator sees.)"""
    line = tree.cursor_line
    drawn = asyncio.Event()
    started = time.perf_counter()
    app._driver.send_message(events.Key("j", "j"))  # noqa: SLF001 - the terminal's way in
    deadline = started + 10
    while tree.cursor_line == line:
        if time.perf_counter() > deadline:
            raise SystemExit("the cursor did not move within 10 s")
        await asyncio.sleep(0)
    app.call_after_refresh(drawn.set)
    await drawn.wait()
    return time.perf_counter() - started


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--zones", type=int, default=200)
    p.add_argument("--hosts", type=int, default=1)
    p.add_argument("--networks", type=int, default=2)
    p.add_argument("--vms", type=int, default=10)
    p.add_argument("--synthetic", type=int, default=0, help="extra guest VMs from events")
    p.add_argument("--presses", type=int, default=50)
    p.add_argument("--rate", type=int, default=1000, help="events per second")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3, help="first-screen runs (median shown)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait after lab up")
    args = p.parse_args()
    knobs = {
        "presses": args.presses,
        "rate": args.rate,
        "seconds": args.seconds,
        "repeat": max(1, args.repeat),
        "settle": args.settle,
    }

    engine, built = await build_lab(1, args.hosts, args.networks, args.vms)
    try:
        baseline = await measure(engine, synthetic=0, **knobs)
    finally:
        await engine.stop()
    baseline["lab_build_s"] = round(built, 1)

    engine, built = await build_lab(args.zones, args.hosts, args.networks, args.vms)
    try:
        big = await measure(engine, synthetic=args.synthetic, **knobs)
    finally:
        await engine.stop()
    big["lab_build_s"] = round(built, 1)

    lab = {k: getattr(args, k) for k in ("zones", "hosts", "networks", "vms", "synthetic")}
    print(
        json.dumps(
            {
                "benchmark": "tui",
                "size": f"{SIZE[0]}x{SIZE[1]}",
                "lab": lab,
                "result": big,
                "baseline": {"lab": {**lab, "zones": 1, "synthetic": 0}, **baseline},
                "ratio": {
                    "first_screen": ratio(big["first_screen_s"], baseline["first_screen_s"]),
                    "cursor_median": ratio(
                        big["cursor_ms"]["median"], baseline["cursor_ms"]["median"]
                    ),
                    "max_frame_lag": ratio(
                        big["events"]["max_frame_lag_ms"], baseline["events"]["max_frame_lag_ms"]
                    ),
                    "drain": ratio(big["events"]["drain_ms"], baseline["events"]["drain_ms"]),
                },
                "targets": {"first_screen_s": 2.0, "cursor_ms": 100, "events_per_s": 1000},
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

"""EngineAPI cost over the unix socket, against the in-process call measured in the same run.

Prints one JSON object: medians in milliseconds for `engine_info` (a tiny call) and `status`
(the whole tree of a lab), and the event fan-out rate; ratio = websocket / in-process.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.server import unix_serve  # noqa: E402

from backend.api.client import RemoteEngine  # noqa: E402
from backend.api.server import ApiServer  # noqa: E402
from backend.config import load_config  # noqa: E402
from backend.engine.core import Engine  # noqa: E402

ZONES, ROUNDS = 10, 60


async def _median_ms(call, rounds: int = ROUNDS) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(samples), 3)


async def _event_rate(api, engine: Engine, n: int = 5000) -> float:  # type: ignore[no-untyped-def]
    got = 0
    done = asyncio.Event()

    async def listen() -> None:
        nonlocal got
        async for _ in api.subscribe(["bench"]):
            got += 1
            if got == n:
                done.set()
                return

    task = asyncio.create_task(listen())
    await asyncio.sleep(0.2)
    t = time.perf_counter()
    for i in range(n):
        engine.bus.publish("bench", i, "updated", f"o{i}", state="Running")
        if i % 500 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 60)
    await task
    return round(n / (time.perf_counter() - t))


async def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="sysvm-bench-"))
    engine = Engine(load_config(home=home, env={"SYSVM_HOME": str(home)}))
    await engine.start()
    job = await engine.lab_up(zones=ZONES, hosts=2, networks=2, vms=3)
    job = await engine.wait_job(job.id, 300)
    assert job.state == "succeeded", job.error
    server = await unix_serve(ApiServer(engine).handle, str(home / "bench.sock"))
    client = await RemoteEngine.connect_unix(home / "bench.sock")
    figures = {
        "engine_info_ms": {
            "in_process": await _median_ms(engine.engine_info),
            "websocket": await _median_ms(client.engine_info),
        },
        "status_ms": {
            "in_process": await _median_ms(engine.status, 20),
            "websocket": await _median_ms(client.status, 20),
        },
        "events_per_s": {
            "in_process": await _event_rate(engine, engine),
            "websocket": await _event_rate(client, engine),
        },
    }
    await client.close()
    server.close()
    await server.wait_closed()
    await engine.stop()
    print(
        json.dumps(
            {
                "name": "api_roundtrip",
                "lab": {"zones": ZONES, "objects": ZONES * (2 + 2 + 2 + 2 * 3 + 2)},
                "figures": figures,
                "baseline": "in_process",
                "ratio": {
                    k: round(v["websocket"] / v["in_process"], 2) if v["in_process"] else None
                    for k, v in figures.items()
                },
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

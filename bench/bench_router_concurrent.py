"""100 routers of one engine (a lab, local back end) apply a changed bundle at once, while the
engine's event loop is sampled for stalls (how late a 1 ms sleep wakes).

Prints one JSON object: wall time until every apply is confirmed, and the loop's stall figures
while busy and, as the baseline of the same run, while idle. `bench_router_apply.py` includes
this run; alone: `python bench/bench_router_concurrent.py [--routers N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
logging.basicConfig(
    level=logging.ERROR, filename=tempfile.mktemp(prefix="sysvm-bench-", suffix=".log")
)

from backend.config import load_config  # noqa: E402
from backend.engine.core import Engine  # noqa: E402
from bench.loop_lag import LoopLag  # noqa: E402

ROUTERS = 100


async def many_routers(count: int, *, trace_over_ms: float | None = None) -> dict[str, Any]:
    """`count` routers of one engine apply at once; the engine's loop is sampled meanwhile.
    With `trace_over_ms`, the loop thread's stack during longer stalls is printed to stderr."""
    home = Path(tempfile.mkdtemp(prefix="sysvm-bench-"))
    zones = (count + 1) // 2
    engine = Engine(load_config(home=home, env={"SYSVM_HOME": str(home)}))
    await engine.start()
    try:
        job = await engine.lab_up(zones=zones, hosts=1, networks=2, vms=1)
        job = await engine.wait_job(job.id, 1800)
        assert job.state == "succeeded", job.error
        tree = await engine.status()
        networks = [n["name"] for z in tree["zones"] for n in z["networks"]][:count]
        for i, net in enumerate(networks):
            public_ip = (await engine.router_show(net))["public_ip"]
            await engine.router_rule_add(
                net,
                "firewall-ingress",
                {
                    "public_ip": public_ip,
                    "protocol": "tcp",
                    "start_port": 1000 + i,
                    "source_cidrs": ["0.0.0.0/0"],
                },
            )
        with LoopLag() as idle:
            await asyncio.sleep(2)
        start = time.perf_counter()
        with LoopLag(trace_over_ms=trace_over_ms) as busy:
            jobs = await asyncio.gather(
                *(engine.router_apply(net, confirm_timeout=30) for net in networks)
            )
            finished = await asyncio.gather(*(engine.wait_job(j.id, 600) for j in jobs))
        wall = time.perf_counter() - start
        busy.print_stacks()
        failed = [j.error for j in finished if j.state != "succeeded"]
        assert not failed, failed[:3]
        return {
            "routers": len(networks),
            "wall_s": round(wall, 2),
            "loop_stall": busy.summary(),
            "idle_loop_stall": idle.summary(),
        }
    finally:
        await engine.stop()
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", type=int, default=ROUTERS)
    parser.add_argument(
        "--trace-stalls",
        type=float,
        metavar="MS",
        help="print to stderr where the loop was while it stalled longer than MS",
    )
    args = parser.parse_args()
    figures = await many_routers(args.routers, trace_over_ms=args.trace_stalls)
    out = {"name": "router_concurrent", "figures": figures}
    out["target"] = {"loop_stall_max_ms": 10}
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())

"""50 lab zones converge from empty (100 system VMs Running) with one host unreachable meanwhile.

Prints one JSON object: wall time, the engine's largest event-loop stall during the run (target
under 10 ms), and the baseline measured in the same run: a 5-zone convergence (per-VM cost, so
the ratio shows how convergence scales) and the stall of the same loop while idle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
logging.basicConfig(
    level=logging.ERROR, filename=tempfile.mktemp(prefix="sysvm-bench-", suffix=".log")
)

from backend.config import load_config  # noqa: E402
from backend.engine.core import Engine  # noqa: E402
from bench.loop_lag import LoopLag  # noqa: E402

ZONES, BASELINE_ZONES = 50, 5


async def converge(zones: int, *, outage: bool) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="sysvm-bench-"))
    env = {
        "SYSVM_HOME": str(home),
        "SYSVM_HOST_PING_INTERVAL": "0.5",
        "SYSVM_HOST_PING_TIMEOUT": "1",
    }
    engine = Engine(load_config(home=home, env=env))
    await engine.start()
    with LoopLag() as idle:
        await asyncio.sleep(2)
    t0 = time.perf_counter()
    with LoopLag() as busy:
        job = await engine.lab_up(zones=zones, hosts=2, networks=0, vms=0)
        if outage:
            # one host stops answering while the zones converge: nothing may wait on it
            while not engine.hypervisors.known:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            await engine.lab_host("zone2-host1", up=False)
        job = await engine.wait_job(job.id, 600)
        wall = time.perf_counter() - t0
    assert job.state == "succeeded", job.error
    tree = await engine.status()
    running = sum(
        1
        for z in tree["zones"]
        for v in z["system_vms"]
        if v["type"] in ("ssvm", "cpvm") and v["state"] == "Running"
    )
    await engine.stop()
    return {
        "zones": zones,
        "system_vms_running": running,
        "wall_s": round(wall, 2),
        "per_vm_ms": round(wall / max(running, 1) * 1000, 1),
        "loop_stall": busy.summary(),
        "idle_loop_stall": idle.summary(),
    }


async def main() -> None:
    base = await converge(BASELINE_ZONES, outage=False)
    run = await converge(ZONES, outage=True)
    print(
        json.dumps(
            {
                "name": "converge_50_zones",
                "figures": run,
                "baseline": base,
                "ratio": {
                    "per_vm_vs_5_zones": round(
                        float(run["per_vm_ms"]) / float(base["per_vm_ms"]), 2
                    ),  # type: ignore[arg-type]
                    "stall_vs_idle": round(
                        run["loop_stall"]["max_ms"] / max(run["idle_loop_stall"]["max_ms"], 0.01),
                        1,  # type: ignore[index]
                    ),
                },
                "target": {"loop_stall_max_ms": 10},
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

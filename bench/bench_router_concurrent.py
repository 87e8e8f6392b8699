"""100 routers of one engine (a lab, local back end) apply a changed bundle at once, while the
engine's event loop is sampled for stalls (how late a 1 ms sleep wakes).

Prints one JSON object: wall time until every apply is confirmed, and the loop's stall figures
while busy and, as the baselines of the same run, while idle and the machine's own (a
real-time sleeper per CPU: what the hypervisor and the kernel alone make any thread wait; a
shared vCPU here stalls it 10-15 ms now and then). `bench_router_apply.py` includes
this run; alone: `python bench/bench_router_concurrent.py [--routers N]`.

The 100 routers are played by the lab's guest host process (and the processes it starts, such
as each apply's rollback timer) on this same machine; real routers run on other hosts. So, by
default, the guest host is kept to the machine's last CPU (the engine may use every CPU), and
what is measured is the engine, not its routers taking its CPU. `--engine-apart` also keeps the
engine (its threads and its helper processes) off that CPU: on a machine of two CPUs it then
has one. `--share-cpus` lets the routers run on every CPU too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
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
from bench.loop_lag import LoopLag, MachineLag  # noqa: E402

ROUTERS = 100


def _descendants() -> dict[int, list[bytes]]:
    """Every live process below this one (children, theirs, ...), with its argv."""
    parents: dict[int, int] = {}
    argvs: dict[int, list[bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(entry.name)], argvs[int(entry.name)] = int(fields[1]), argv
    found, mine = {}, {os.getpid()}
    while True:
        more = {pid for pid, parent in parents.items() if parent in mine and pid not in mine}
        if not more:
            return found
        mine |= more
        found.update((pid, argvs[pid]) for pid in more)


def _pin(pid: int, cpus: set[int]) -> None:
    """Keep every thread of process `pid` (and so what it starts later) on `cpus`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def keep_routers_to_the_last_cpu(*, engine_apart: bool = False) -> int | None:
    """Keep the lab's guest host (the routers, and what it starts later) on the last CPU (it
    plays the other hosts), and with `engine_apart` the engine (its threads, its helper
    processes) on the others. Returns that CPU, or None on a machine with one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    below = _descendants()
    hosts = [pid for pid, argv in below.items() if b"backend.lab.guest_host" in argv]
    assert hosts, "no lab guest host process found"
    for pid in hosts:
        _pin(pid, {cpus[-1]})
    if engine_apart:
        for pid in set(below) - set(hosts):
            _pin(pid, set(cpus[:-1]))
        _pin(os.getpid(), set(cpus[:-1]))
    return cpus[-1]


async def many_routers(
    count: int,
    *,
    trace_over_ms: float | None = None,
    share_cpus: bool = False,
    engine_apart: bool = False,
) -> dict[str, Any]:
    """`count` routers of one engine apply at once; the engine's loop is sampled meanwhile.
    With `trace_over_ms`, the loop thread's stack during longer stalls is printed to stderr.
    Unless `share_cpus`, the lab's routers are kept to the last CPU (see the module's doc)."""
    home = Path(tempfile.mkdtemp(prefix="sysvm-bench-"))
    zones = (count + 1) // 2
    cpus = sorted(os.sched_getaffinity(0))
    if engine_apart and not share_cpus and len(cpus) > 1:
        # before the engine starts, which sizes itself to its CPUs (the routers move later)
        _pin(os.getpid(), set(cpus[:-1]))
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
        routers_cpu = (
            None if share_cpus else keep_routers_to_the_last_cpu(engine_apart=engine_apart)
        )
        with MachineLag() as idle_machine, LoopLag() as idle:
            await asyncio.sleep(2)
        start = time.perf_counter()
        with MachineLag() as machine, LoopLag(trace_over_ms=trace_over_ms) as busy:
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
            "routers_cpu": "shared" if routers_cpu is None else routers_cpu,
            "engine_cpus": "all but the routers'" if engine_apart and routers_cpu else "all",
            "wall_s": round(wall, 2),
            "loop_stall": busy.summary(),
            "idle_loop_stall": idle.summary(),
            "machine_stall": machine.summary(),
            "idle_machine_stall": idle_machine.summary(),
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
    parser.add_argument(
        "--share-cpus",
        action="store_true",
        help="let the lab's routers run on every CPU, the engine's too (default: the last one)",
    )
    parser.add_argument(
        "--engine-apart",
        action="store_true",
        help="keep the engine off the routers' CPU too (default: it may use every CPU)",
    )
    args = parser.parse_args()
    figures = await many_routers(
        args.routers,
        trace_over_ms=args.trace_stalls,
        share_cpus=args.share_cpus,
        engine_apart=args.engine_apart,
    )
    out = {"name": "router_concurrent", "figures": figures}
    out["target"] = {"loop_stall_max_ms": 10}
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())

"""A 2 GiB template over loopback HTTP through the SSVM agent, against `curl -o` of the same file
to the same disk in the same run; peak RSS of engine and agent; event-loop stalls during 8
concurrent transfers. Prints one JSON object."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
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

BIG = int(os.environ.get("SYSVM_BENCH_BYTES", 2 * 2**30))
SMALL = 256 * 2**20


def _file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(2**20)
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
            h.update(block)
    return "{SHA-256}" + h.hexdigest()


def _serve(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    """An HTTP server in its own process, so it does not compete with the engine for the GIL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.connect(("127.0.0.1", port))
            return proc, port
        time.sleep(0.05)
    raise RuntimeError("the HTTP server did not start")


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="sysvm-bench-"))
    www = work / "www"
    www.mkdir()
    big_sum = _file(www / "big.raw", BIG)
    small_sum = _file(www / "small.raw", SMALL)
    server, port = _serve(www)
    base = f"http://127.0.0.1:{port}"

    home = work / "home"
    engine = Engine(load_config(home=home, env={"SYSVM_HOME": str(home)}))
    await engine.start()
    job = await engine.wait_job((await engine.lab_up(zones=1, hosts=1, networks=0, vms=0)).id, 120)
    assert job.state == "succeeded", job.error
    store = home / "lab/secondary/zone1"

    # baseline: curl writing the same file to the same disk, then fsync (as the agent does)
    t = time.perf_counter()
    subprocess.run(["curl", "-sS", "-o", str(store / "curl.raw"), f"{base}/big.raw"], check=True)
    subprocess.run(["sync", str(store / "curl.raw")], check=True)
    curl_s = time.perf_counter() - t
    (store / "curl.raw").unlink()

    t = time.perf_counter()
    job = await engine.template_register("zone1", "big", f"{base}/big.raw", "RAW", big_sum)
    job = await engine.wait_job(job.id, 3600)
    agent_s = time.perf_counter() - t
    assert job.state == "succeeded", job.error

    # 8 concurrent transfers, with the loop's lateness sampled meanwhile
    lags: list[float] = []

    async def sample() -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            lags.append((loop.time() - t0 - 0.001) * 1000)

    sampler = asyncio.create_task(sample())
    t = time.perf_counter()
    jobs = [
        await engine.template_register("zone1", f"c{i}", f"{base}/small.raw", "RAW", small_sum)
        for i in range(8)
    ]
    done = [await engine.wait_job(j.id, 3600) for j in jobs]
    concurrent_s = time.perf_counter() - t
    sampler.cancel()
    assert all(j.state == "succeeded" for j in done), [j.error for j in done]

    local = getattr(engine.guests, "local", engine.guests)  # the netns back end wraps it
    guest_pid = local._proc.pid if local._proc else 0  # noqa: SLF001
    agent_rss = _hwm_kib(guest_pid) // 1024 if guest_pid else None
    engine_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    await engine.stop()
    server.terminate()
    shutil.rmtree(work, ignore_errors=True)
    lags.sort()
    mb = BIG / 1e6
    print(
        json.dumps(
            {
                "name": "template_transfer",
                "figures": {
                    "bytes": BIG,
                    "agent_s": round(agent_s, 2),
                    "agent_MBps": round(mb / agent_s, 1),
                    "peak_rss_MiB": {"engine": engine_rss, "agent": agent_rss},
                    "concurrent_8x256MiB_s": round(concurrent_s, 2),
                    "loop_stall_ms": {
                        "max": round(lags[-1], 2),
                        "p99": round(lags[int(len(lags) * 0.99)], 2),
                    },
                },
                "baseline": {"curl_s": round(curl_s, 2), "curl_MBps": round(mb / curl_s, 1)},
                "ratio": {"throughput_vs_curl": round(curl_s / agent_s, 2)},
                "target": {"throughput_vs_curl": 0.9, "rss_MiB": 100, "loop_stall_ms": 10},
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

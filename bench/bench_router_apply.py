"""Router applies over SSH into a real network namespace, against one `iptables` call per rule.

For each iptables variant present (legacy first, then the default nft one), a router of the lab's
guest host process (a separate process, as a real router is) runs in netns mode in a fresh
namespace and is driven over real SSH exactly as the engine drives it:
- full apply of a 10,000-rule bundle end to end (render, transfer, test, restore, answer), on a
  fresh router each round;
- one-rule change of that router: the engine's patch of the live bundle, loaded as a
  `--noflush` delta, several rounds;
and the baseline of the same run: the same ruleset loaded with one `iptables -A` per rule (the way
CloudStack's CsNetfilter.py works), in a fresh namespace.

Then the whole product (`netns_lab_engine`): an engine's `lab up --backend netns` router (sshd,
its relay, the appliance service) holding 10,000 rules, timed as `router apply` jobs from the API
call to success, a 30 s confirm window included.

Then 100 routers of one engine (a lab, local back end) apply a changed bundle at once while the
engine's event loop is sampled for stalls.

Prints one JSON object. Medians are quoted; ratios compare with the baseline of the same run.
Needs root (network namespaces); `--rules N` and `--rounds N` shrink the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
logging.basicConfig(
    level=logging.ERROR, filename=tempfile.mktemp(prefix="sysvm-bench-", suffix=".log")
)

from backend.appliance.router.netfilter import render_ruleset  # noqa: E402
from backend.config import load_config  # noqa: E402
from backend.engine.core import Engine  # noqa: E402
from backend.router.bundle import RouterBundle, bundle_patch  # noqa: E402
from backend.transport.ssh import (  # noqa: E402
    SystemVMTransport,
    generate_keypair,
    load_client_key,
    new_host_key,
)
from bench.bench_router_concurrent import ROUTERS, many_routers  # noqa: E402
from tests.test_router_render import big_bundle, one_rule_changed  # noqa: E402


def ns(name: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], input=stdin, capture_output=True, text=True
    )


@contextmanager
def namespace() -> Iterator[str]:
    """A fresh namespace with the router's three NICs (veth pairs inside it: no dummy module)."""
    name = f"rtbench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for ifname in ("eth0", "eth1", "eth2"):
            made = ns(name, "ip", "link", "add", ifname, "type", "veth", "peer", f"{ifname}p")
            assert made.returncode == 0, made.stderr
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class GuestHost:
    """The lab's guest host process, asked to boot routers in namespaces."""

    def __init__(self, key: Path) -> None:
        self.key = key
        self.proc: asyncio.subprocess.Process | None = None
        self.next_id = 0

    async def __aenter__(self) -> GuestHost:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backend.lab.guest_host",
            str(self.key.with_suffix(".pub")),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()

    async def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.next_id += 1
        self.proc.stdin.write((json.dumps({"id": self.next_id, **req}) + "\n").encode())
        await self.proc.stdin.drain()
        answer = json.loads(await self.proc.stdout.readline())
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return dict(answer)


@asynccontextmanager
async def router_in(
    host: GuestHost, transport: SystemVMTransport, netns: str, variant: str, root: Path
) -> AsyncIterator[Any]:
    name = f"r-{uuid.uuid4().hex[:6]}-VM"
    private, public = new_host_key()
    booted = await host.request(
        op="boot",
        vm=name,
        host_key=private,
        boot_args={"type": "router"},
        router_root=str(root / name),
        netns=netns,
        iptables=variant,
    )

    async def call(command: str, stdin: str | None = None) -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        done = await transport.run(
            "127.0.0.1", booted["port"], public, f"sysvm-router {command}", stdin
        )
        elapsed = time.perf_counter() - start
        assert done.exit_status == 0, (done.stdout, done.stderr)
        return elapsed, json.loads(done.stdout.splitlines()[-1])

    await call("show")  # connection up and applier loaded: time the work, not the setup
    try:
        yield call
    finally:
        await host.request(op="halt", vm=name)


def per_rule_baseline(bundle: RouterBundle, variant: str) -> dict[str, Any]:
    """The ruleset of `bundle` loaded one `iptables` call per chain and rule, in a fresh ns."""
    ruleset = render_ruleset(bundle)
    tool = variant  # iptables | iptables-legacy
    calls: list[list[str]] = []
    table = ""
    for line in ruleset.restore_text().splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chain, policy = line[1:].split()[:2]
            if policy == "-":
                calls.append(["-t", table, "-N", chain])
        elif line.startswith("-A "):
            calls.append(["-t", table, *_split(line)])
    with namespace() as name:
        start = time.perf_counter()
        for argv in calls:
            done = ns(name, tool, "-w", *argv)
            assert done.returncode == 0, (argv, done.returncode, done.stderr)
        elapsed = time.perf_counter() - start
    return {"calls": len(calls), "wall_s": round(elapsed, 2)}


def _split(line: str) -> list[str]:
    import shlex

    return shlex.split(line)


async def netns_variant(
    host: GuestHost, transport: SystemVMTransport, variant: str, rounds: int, rules: int
) -> dict[str, Any]:
    big = big_bundle() if rules >= 10_000 else _smaller(rules)
    text = big.to_json()
    root = Path(tempfile.mkdtemp(prefix="sysvm-bench-routers-"))
    fulls: list[float] = []
    inside: list[dict[str, float]] = []
    for _ in range(rounds):
        with namespace() as name:
            async with router_in(host, transport, name, variant, root) as call:
                t, answer = await call("apply", text)
                assert answer["iptables"] == "full" and not answer["drift"], answer
                fulls.append(t)
                inside.append(answer["timings_ms"])
    deltas: list[float] = []
    delta_inside: list[dict[str, float]] = []
    patch_build: list[float] = []
    patch_bytes = 0
    with namespace() as name:
        async with router_in(host, transport, name, variant, root) as call:
            await call("apply", text)
            current = RouterBundle.from_json(text)
            for i in range(rounds * 4):
                # The engine's way: the new bundle is built with the last one as `previous`
                # (unchanged rules are reused), and only a patch of it crosses SSH.
                changed = one_rule_changed(current, 1, start_port=50_000 + i, end_port=50_010 + i)
                nxt = RouterBundle.from_json(changed.to_json(), current)
                start = time.perf_counter()
                patch = bundle_patch(current, nxt)
                patch_build.append(time.perf_counter() - start)
                patch_bytes = len(patch)
                t, answer = await call("apply --patch", patch)
                assert answer["iptables"] == "delta" and not answer["drift"], answer
                assert answer["digest"] == nxt.digest, answer
                deltas.append(t)
                delta_inside.append(answer["timings_ms"])
                current = nxt
    shutil.rmtree(root, ignore_errors=True)
    return {
        "bundle_bytes": len(text),
        "full_apply_s": _median(fulls),
        "full_apply_runs_s": [round(x, 3) for x in fulls],
        "full_inside_router_ms": _median_parts(inside),
        "one_rule_change_s": _median(deltas),
        "one_rule_change_runs_s": [round(x, 3) for x in deltas],
        "one_rule_inside_router_ms": _median_parts(delta_inside),
        "one_rule_patch_bytes": patch_bytes,
        "one_rule_patch_build_ms": round(_median(patch_build) * 1000, 2),
    }


def _smaller(rules: int) -> RouterBundle:
    from tests.test_router_render import ten_thousand_rules

    big = big_bundle()
    return RouterBundle.create(
        version=1,
        network=big.network,
        addresses=big.addresses,
        rules=ten_thousand_rules()[:rules],
    )


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _median_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    keys = parts[0].keys()
    return {k: round(statistics.median(p.get(k, 0.0) for p in parts), 1) for k in keys}


async def netns_lab_router(rules: int, rounds: int) -> dict[str, Any]:
    """The same work through the whole product: an engine with `lab up --backend netns` (the
    router a namespace with OpenSSH sshd, its relay and appliance service), `rules` rules in the
    database, and `router apply` jobs with a 30 s confirm window, timed from the API call until
    the job succeeded (build, patch, SSH, load, readback, confirm over a new connection, record).
    """
    from sqlalchemy import select

    from backend.db.models import GuestNetwork, RouterRule, SystemVM

    home = Path(tempfile.mkdtemp(prefix="sysvm-bench-lab-"))
    engine = Engine(load_config(home=home, env={"SYSVM_HOME": str(home)}))
    await engine.start()
    try:
        job = await engine.lab_up(zones=1, hosts=1, networks=1, vms=1, backend="netns")
        done = await engine.wait_job(job.id, 600)
        assert done.state == "succeeded", done.error
        net = "zone1-net1"
        public_ip = (await engine.router_show(net))["public_ip"]
        async with engine.db.read() as s:
            found = (await s.scalars(select(GuestNetwork).where(GuestNetwork.name == net))).one()
            net_id = found.id

        async def add_rules(s: Any) -> None:
            for i in range(rules):
                port = 1 + i % 60_000
                s.add(
                    RouterRule(
                        network_id=net_id,
                        type="firewall-ingress",
                        fields={
                            "public_ip": public_ip,
                            "protocol": "tcp",
                            "start_port": port,
                            "end_port": port,
                            "source_cidrs": [f"198.51.{i // 256 % 256}.{i % 256}/32"],
                            "icmp_type": None,
                            "icmp_code": None,
                        },
                    )
                )

        await engine.db.write(add_rules)

        async def apply() -> tuple[float, dict[str, Any]]:
            start = time.perf_counter()
            job = await engine.router_apply(net, confirm_timeout=30)
            done = await engine.wait_job(job.id, 600)
            assert done.state == "succeeded" and done.result is not None, done.error
            return time.perf_counter() - start, done.result

        t_full, full = await apply()
        changes: list[float] = []
        inside: list[dict[str, float]] = []
        for i in range(rounds * 2):
            await engine.router_rule_add(
                net,
                "firewall-ingress",
                {"public_ip": public_ip, "protocol": "tcp", "start_port": 61_000 + i},
            )
            t, answer = await apply()
            assert answer["input"] == "patch" and answer["iptables"] == "delta", answer
            changes.append(t)
            inside.append(answer["timings_ms"])
        async with engine.db.read() as s:
            router = (await s.scalars(select(SystemVM).where(SystemVM.network_id == net_id))).one()
        endpoint = engine.guests.ssh_endpoint(router)
        assert endpoint is not None
        shows: list[float] = []
        for _ in range(10):
            start = time.perf_counter()
            await engine.transport.run(*endpoint, router.host_key_public, "sysvm-router show")
            shows.append(time.perf_counter() - start)
        await engine.wait_job((await engine.lab_down()).id, 600)
        return {
            "rules": rules + 1,
            "full_apply_job_s": round(t_full, 3),
            "full_inside_router_ms": full["timings_ms"],
            "one_rule_change_job_s": _median(changes),
            "one_rule_change_job_runs_s": [round(x, 3) for x in changes],
            "one_rule_inside_router_ms": _median_parts(inside),
            "command_round_trip_ms": round(statistics.median(shows) * 1000, 1),
        }
    finally:
        await engine.stop()
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--routers", type=int, default=ROUTERS)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--share-cpus",
        action="store_true",
        help="concurrent: let the lab's routers use every CPU (default: the last one only)",
    )
    parser.add_argument(
        "--only",
        default="legacy,nft,engine,concurrent",
        help="comma-separated parts to run: legacy, nft (the two iptables variants over SSH), "
        "engine (the whole product, netns lab), concurrent (100 routers); default all",
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    unknown = parts - {"legacy", "nft", "engine", "concurrent"}
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {"name": "router_apply", "figures": {}, "baseline": {}, "ratio": {}}
    if os.geteuid() != 0 or not shutil.which("ip"):
        out["skipped_netns"] = "needs root and iproute2 for network namespaces"
    else:
        key = Path(tempfile.mkdtemp(prefix="sysvm-bench-key-")) / "id_ed25519"
        generate_keypair(key)
        transport = SystemVMTransport(load_client_key(key), command_timeout=600)
        wanted = {"iptables-legacy": "legacy" in parts, "iptables": "nft" in parts}
        variants = [v for v, want in wanted.items() if want and shutil.which(f"{v}-restore")]
        async with GuestHost(key) as host:
            for variant in variants:
                figures = await netns_variant(host, transport, variant, args.rounds, args.rules)
                out["figures"][variant] = figures
                if not args.skip_baseline:
                    bundle = big_bundle() if args.rules >= 10_000 else _smaller(args.rules)
                    base = await asyncio.to_thread(per_rule_baseline, bundle, variant)
                    out["baseline"][variant] = base
                    out["ratio"][f"{variant}_per_rule_vs_full_apply"] = round(
                        base["wall_s"] / figures["full_apply_s"], 1
                    )
        await transport.close()
        if "engine" in parts:
            out["figures"]["netns_lab_engine"] = await netns_lab_router(args.rules, args.rounds)
    if "concurrent" in parts:
        out["figures"]["concurrent_routers"] = await many_routers(
            args.routers, share_cpus=args.share_cpus
        )
    out["target"] = {
        "full_apply_s": 0.5,
        "one_rule_change_s": 0.1,
        "per_rule_vs_full_apply": 100,
        "concurrent_loop_stall_max_ms": 10,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())

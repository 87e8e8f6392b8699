"""`sysvm`: the command line. Every command except `engine serve` is a client of the engine.

Errors print as one line on stderr with a non-zero exit; `--json` output is stable for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from backend.config import Config, load_config
from backend.errors import EngineAlreadyRunning, SysvmError

EXIT_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sysvm",
        description="Run the system VMs (SSVM, console proxy, virtual router) of a "
        "CloudStack-style cloud. Commands talk to the engine of SYSVM_HOME, starting it "
        "when none runs.",
        epilog="Start here: `sysvm lab up` builds a demo cloud, `sysvm tui` opens the console.",
    )
    p.add_argument(
        "--home", help="installation directory (default: $SYSVM_HOME or the user data dir)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tui = sub.add_parser("tui", help="open the console")
    tui.add_argument(
        "--read-only", action="store_true", default=None, help="hide and refuse every change"
    )
    tui.add_argument(
        "--ascii", action="store_true", default=None, help="ASCII instead of box drawing and icons"
    )

    st = sub.add_parser("status", help="print the tree of zones, system VMs, networks and VMs")
    st.add_argument("--json", action="store_true", help="stable JSON (shape in README)")

    eng = sub.add_parser("engine", help="the engine daemon of this home")
    esub = eng.add_subparsers(dest="action", required=True, metavar="ACTION")
    esub.add_parser("serve", help="run the engine in the foreground (clients start it themselves)")
    esub.add_parser("stop", help="stop the running engine and wait until its process is gone")
    es = esub.add_parser("status", help="is an engine running here? (pid, schema, uptime)")
    es.add_argument("--json", action="store_true")

    lab = sub.add_parser(
        "lab", help="the embedded demo cloud (libvirt test driver + local SSH guests)"
    )
    lsub = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = lsub.add_parser("up", help="create the lab (idempotent) and wait until it converged")
    up.add_argument("--zones", type=int, help="zones (default: setting lab.zones, 2)")
    up.add_argument("--hosts", type=int, help="hosts per zone (default: lab.hosts, 2)")
    up.add_argument(
        "--networks", type=int, help="guest networks per zone (default: lab.networks, 2)"
    )
    up.add_argument("--vms", type=int, help="guest VMs per network (default: lab.vms, 3)")
    up.add_argument(
        "--backend", choices=["local"], default="local", help="where system VMs run (local)"
    )
    up.add_argument("--no-wait", action="store_true", help="return once the job is queued")
    up.add_argument("--json", action="store_true")
    down = lsub.add_parser("down", help="remove everything the lab made")
    down.add_argument("--json", action="store_true")

    cfg = sub.add_parser("config", help="settings")
    csub = cfg.add_subparsers(dest="action", required=True, metavar="ACTION")
    cs = csub.add_parser("show", help="effective settings and where each came from")
    cs.add_argument("--json", action="store_true")

    jobs = sub.add_parser("jobs", help="long-running work: list, show, wait, cancel")
    jsub = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    jl = jsub.add_parser("list", help="recent jobs, newest first")
    jl.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jl.add_argument("--limit", type=int, default=50)
    jl.add_argument("--json", action="store_true")
    for name, helptext in (
        ("show", "one job"),
        ("wait", "wait for a job to finish"),
        ("cancel", "cancel a job"),
    ):
        jp = jsub.add_parser(name, help=helptext)
        jp.add_argument("job_id", type=int, metavar="JOB")
        jp.add_argument("--json", action="store_true")

    ev = sub.add_parser("events", help="recent events (state changes); --follow streams new ones")
    ev.add_argument(
        "--entity", help="only this entity type (zone, host, system_vm, network, guest_vm, job)"
    )
    ev.add_argument("--since", type=int, default=0, help="only events after this id")
    ev.add_argument("--limit", type=int, default=50)
    ev.add_argument("--follow", "-f", action="store_true")
    ev.add_argument("--json", action="store_true")
    return p


def _config(args: argparse.Namespace) -> Config:
    home = Path(args.home).expanduser().resolve() if args.home else None
    if home is not None:
        os.environ["SYSVM_HOME"] = str(home)  # engines this client starts inherit it
    flags: dict[str, tuple[Any, str]] = {}
    if getattr(args, "read_only", None):
        flags["read_only"] = (True, "--read-only")
    if getattr(args, "ascii", None):
        flags["ascii"] = (True, "--ascii")
    return load_config(home=home, flags=flags)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _job_line(job: Any) -> str:
    line = f"job {job.id} {job.kind} {job.state} {job.progress:.0f}%"
    if job.message:
        line += f" - {job.message}"
    if job.error:
        line += f" - {job.error}"
    return line


async def _follow_job(api: Any, job_id: int, *, quiet: bool) -> Any:
    """Print a job's progress until it finishes; returns the finished job."""
    tty = sys.stderr.isatty() and not quiet
    last = ""

    async def watch() -> None:
        nonlocal last
        async for ev in api.subscribe(["job"]):
            if ev.entity_id != job_id or quiet:
                continue
            f = ev.fields
            line = f"{f.get('state', '')} {f.get('progress', 0):5.1f}%  {f.get('message', '')}"
            if line != last:
                last = line
                print(
                    ("\r\033[K" if tty else "") + line[:100],
                    end="" if tty else "\n",
                    file=sys.stderr,
                    flush=True,
                )

    watcher = asyncio.create_task(watch())
    try:
        job = await api.job(job_id)
        while not job.finished:
            job = await api.wait_job(job_id, timeout=5)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if tty:
        print(file=sys.stderr)
    return job


def _print_status(tree: dict[str, Any]) -> None:
    if not tree["zones"]:
        print("no zones yet; `sysvm lab up` builds a demo cloud")
    for z in tree["zones"]:
        print(f"{z['name']}  {z['state']}")
        hosts = ", ".join(f"{h['name']} {h['state']}" for h in z["hosts"])
        print(f"  hosts: {hosts or '-'}")
        print("  system VMs:")
        for v in z["system_vms"]:
            print(
                f"    {v['name']:<10} {v['type']:<6} {v['state']:<9} {v['host'] or '-':<16} {v['control_ip'] or '-'}"
            )
        print("  networks:")
        for n in z["networks"]:
            r = n["router"]
            router = f"router {r['name']} {r['state']}" if r else "no router"
            print(f"    {n['name']:<14} {n['cidr']:<16} {router}")
            for g in n["vms"]:
                print(f"      {g['name']:<20} {g['state']:<9} {g['ip'] or '-'}")


async def _client_command(args: argparse.Namespace, config: Config) -> int:
    from backend.api import connect as daemon

    if args.command == "engine" and args.action == "stop":
        pid = await daemon.stop(config)
        print(f"engine (pid {pid}) stopped" if pid else f"no engine was running for {config.home}")
        return 0
    autostart = not (args.command == "engine" and args.action == "status")
    try:
        api = await daemon.connect(config, autostart=autostart)
    except SysvmError:
        if args.command == "engine":
            if args.json:
                _print_json({"running": False, "home": str(config.home)})
            else:
                print(f"no engine running for {config.home}")
            return 1
        raise
    try:
        return await _run(api, args, config)
    finally:
        await api.close()


async def _run(api: Any, args: argparse.Namespace, config: Config) -> int:
    cmd = args.command
    if cmd == "engine":  # status
        info = await api.engine_info()
        if args.json:
            _print_json({"running": True, **info})
        else:
            print(
                f"engine pid {info['pid']} on {info['home']}, schema {info['schema']}, up {info['uptime']} s"
            )
        return 0
    if cmd == "status":
        tree = await api.status()
        _print_json(tree) if args.json else _print_status(tree)
        return 0
    if cmd == "config":
        rows = await api.config_show()
        if args.json:
            _print_json(rows)
        else:
            width = max(len(r["key"]) for r in rows)
            for r in rows:
                print(f"{r['key']:<{width}}  {json.dumps(r['value']):<10} {r['source']}")
        return 0
    if cmd == "lab":
        if args.action == "up":
            job = await api.lab_up(
                zones=args.zones if args.zones is not None else config["lab.zones"],
                hosts=args.hosts if args.hosts is not None else config["lab.hosts"],
                networks=args.networks if args.networks is not None else config["lab.networks"],
                vms=args.vms if args.vms is not None else config["lab.vms"],
            )
        else:
            job = await api.lab_down()
        if not getattr(args, "no_wait", False):
            job = await _follow_job(api, job.id, quiet=args.json)
        if args.json:
            _print_json(job.to_dict())
        else:
            print(_job_line(job))
        return 0 if job.state in ("succeeded", "queued", "running") else EXIT_ERROR
    if cmd == "jobs":
        if args.action == "list":
            jobs = await api.jobs(limit=args.limit, state=args.state)
            if args.json:
                _print_json([j.to_dict() for j in jobs])
            else:
                for j in jobs:
                    print(_job_line(j))
            return 0
        if args.action == "show":
            job = await api.job(args.job_id)
        elif args.action == "wait":
            job = await _follow_job(api, args.job_id, quiet=args.json)
        else:
            job = await api.cancel_job(args.job_id)
        _print_json(job.to_dict()) if args.json else print(_job_line(job))
        return 0 if job.state != "failed" else EXIT_ERROR
    if cmd == "events":

        def show(e: Any) -> None:
            if args.json:
                print(json.dumps(e.to_dict()), flush=True)
            else:
                fields = " ".join(f"{k}={v}" for k, v in e.fields.items() if v not in ("", None))
                print(
                    f"{e.id:>7} {e.ts[11:23]} {e.entity}:{e.name or e.entity_id} {e.kind} {fields}",
                    flush=True,
                )

        for e in await api.events(since_id=args.since, limit=args.limit, entity=args.entity):
            show(e)
        if args.follow:
            async for e in api.subscribe([args.entity] if args.entity else None):
                show(e)
        return 0
    if cmd == "tui":
        from tui_app.app import SysvmApp

        app = SysvmApp(api, read_only=bool(config["read_only"]), ascii=bool(config["ascii"]))
        await app.run_async()
        return 0
    raise SysvmError(f"unknown command {cmd}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
        if args.command == "engine" and args.action == "serve":
            from backend.engine import daemon

            config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            daemon.setup_logging(config.home, str(config["log.level"]))
            try:
                asyncio.run(daemon.serve(config))
            except EngineAlreadyRunning as exc:
                print(f"sysvm: {exc}", file=sys.stderr)
                from backend.api.connect import EXIT_ALREADY_RUNNING

                return EXIT_ALREADY_RUNNING
            return 0
        return asyncio.run(_client_command(args, config))
    except SysvmError as exc:
        print(f"sysvm: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sysvm status | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

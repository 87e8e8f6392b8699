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
    tui.add_argument(
        "--theme",
        help="colours: ansi (the terminal's own palette, the default) or a Textual theme such as "
        "textual-dark, nord, gruvbox; NO_COLOR=1 in the environment turns colour off",
    )

    st = sub.add_parser("status", help="print the tree of zones, system VMs, networks and VMs")
    st.add_argument("--json", action="store_true", help="stable JSON (shape in README)")

    con = sub.add_parser(
        "console",
        help="where a VM's console is (its VNC display) and the commands to open it from here",
    )
    con.add_argument("name", help="a system VM or guest VM, e.g. s-1-VM or zone1-net1-vm1")
    con.add_argument("--json", action="store_true", help="the answer as JSON")

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
        "--backend",
        choices=["local", "netns"],
        default="local",
        help="where system VMs run: local, or netns (root: routers and guest VMs as network "
        "namespaces with real sshd, iptables, dnsmasq, haproxy)",
    )
    up.add_argument("--no-wait", action="store_true", help="return once the job is queued")
    up.add_argument("--json", action="store_true")
    down = lsub.add_parser("down", help="remove everything the lab made")
    down.add_argument("--json", action="store_true")
    ex = lsub.add_parser(
        "exec",
        help="netns lab: run a command in a guest VM's namespace, or the internet's (`public`)",
        description="Run CMD inside the network namespace of guest VM NAME, or of the lab's "
        "internet when NAME is `public`; its exit status is the command's. Needs root and a lab "
        "built with `lab up --backend netns`.",
    )
    ex.add_argument("name", metavar="NAME", help="a guest VM (e.g. zone1-net1-vm1) or `public`")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD...")

    crash = lsub.add_parser(
        "crash", help="destroy a lab VM's domain behind the engine's back, as `virsh destroy` would"
    )
    crash.add_argument("vm", metavar="VM")
    crash.add_argument("--undefine", action="store_true", help="remove the domain's definition too")
    crash.add_argument("--json", action="store_true")
    for name, helptext in (
        ("host-down", "make a lab host's libvirt connection fail (a host failure)"),
        ("host-up", "let a lab host answer again"),
    ):
        hp = lsub.add_parser(name, help=helptext)
        hp.add_argument("host", metavar="HOST")
        hp.add_argument("--json", action="store_true")

    svm = sub.add_parser("systemvm", help="secondary storage VMs, console proxies and routers")
    ssub = svm.add_subparsers(dest="action", required=True, metavar="ACTION")
    sl = ssub.add_parser("list", help="system VMs with state, host and control address")
    sl.add_argument("--zone", help="only this zone")
    sl.add_argument("--json", action="store_true")
    for name, helptext in (
        ("show", "one system VM: NICs, boot args, host"),
        ("start", "start it (define the domain, boot, wait for its agent over SSH)"),
        ("stop", "shut it down (graceful, then forced); SSVM/CPVM come back by themselves"),
        ("reboot", "restart it in place"),
        ("destroy", "destroy it; the zone's reconciler makes a replacement where one is needed"),
        ("migrate", "move it to another Up host of its zone"),
    ):
        sp = ssub.add_parser(name, help=helptext)
        sp.add_argument("name", metavar="NAME")
        if name == "migrate":
            sp.add_argument("--to", metavar="HOST", help="target host (default: least loaded)")
        if name == "stop":
            sp.add_argument("--force", action="store_true", help="power off at once")
        if name != "show":
            sp.add_argument("--wait", action="store_true", help="wait until the job finishes")
        sp.add_argument("--json", action="store_true")

    host = sub.add_parser("host", help="hypervisor hosts")
    hsub = host.add_subparsers(dest="action", required=True, metavar="ACTION")
    ha = hsub.add_parser("add", help="add a libvirt host to a zone (it must answer first)")
    ha.add_argument("name", metavar="NAME")
    ha.add_argument("uri", metavar="URI", help="e.g. qemu:///system or qemu+ssh://root@kvm1/system")
    ha.add_argument("--zone", required=True)
    ha.add_argument("--json", action="store_true")

    vm = sub.add_parser("vm", help="guest VMs (instances)")
    vsub = vm.add_subparsers(dest="action", required=True, metavar="ACTION")
    dep = vsub.add_parser("deploy", help="create and start a guest VM on a network")
    dep.add_argument("name", metavar="NAME")
    dep.add_argument("--network", required=True, help="guest network to attach it to")
    dep.add_argument("--template", help="template of its root disk (default: none, diskless)")
    dep.add_argument("--wait", action="store_true")
    dep.add_argument("--json", action="store_true")
    for name in ("start", "stop", "destroy"):
        vp = vsub.add_parser(name, help=f"{name} a guest VM")
        vp.add_argument("name", metavar="NAME")
        if name == "stop":
            vp.add_argument("--force", action="store_true", help="power off at once")
        vp.add_argument("--wait", action="store_true")
        vp.add_argument("--json", action="store_true")

    tpl = sub.add_parser("template", help="templates: register from a URL, upload, watch, cancel")
    tsub = tpl.add_subparsers(dest="action", required=True, metavar="ACTION")
    tl = tsub.add_parser("list", help="templates with state and transfer progress")
    tl.add_argument("--zone")
    tl.add_argument("--json", action="store_true")
    tr = tsub.add_parser(
        "register", help="download a template from an http(s) URL via the zone's SSVM"
    )
    tr.add_argument("--name", required=True)
    tr.add_argument("--url", required=True, help="http or https URL of the image")
    tu = tsub.add_parser("upload", help="upload a local file to the zone's SSVM")
    tu.add_argument("file", metavar="FILE")
    tu.add_argument("--name", required=True)
    for p_ in (tr, tu):
        p_.add_argument("--zone", required=True)
        p_.add_argument("--format", required=True, type=str.upper, choices=["QCOW2", "RAW", "ISO"])
        p_.add_argument("--checksum", help="{SHA-256}hex, {MD5}hex, ... or a bare MD5")
        p_.add_argument("--wait", action="store_true", help="follow the transfer until it ends")
        p_.add_argument("--json", action="store_true")
    for name, helptext in (
        ("show", "one template and its transfer"),
        ("cancel", "stop a transfer (ABANDONED, nothing left behind)"),
        ("delete", "remove a template from the zone's image store"),
    ):
        tc = tsub.add_parser(name, help=helptext)
        tc.add_argument("name", metavar="NAME")
        tc.add_argument("--zone", required=True)
        tc.add_argument("--json", action="store_true")

    rt = sub.add_parser("router", help="a network's router rules: show, add, delete, diff")
    rsub = rt.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext in (
        ("show", "the router's rules, version and digests"),
        ("diff", "what the next apply would change"),
    ):
        rp = rsub.add_parser(name, help=helptext)
        rp.add_argument("network", metavar="NET")
        rp.add_argument("--json", action="store_true")
    rap = rsub.add_parser("apply", help="push the rules to the router (commit-confirmed)")
    rap.add_argument("network", metavar="NET")
    rap.add_argument(
        "--confirm-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds the router waits for the engine's confirm before rolling back (0: none)",
    )
    rap.add_argument("--wait", action="store_true")
    rap.add_argument("--json", action="store_true")
    rc = rsub.add_parser("check", help="read back what is live on the router and report drift")
    rc.add_argument("network", metavar="NET")
    rc.add_argument("--json", action="store_true")
    rr = rsub.add_parser("rule", help="add or delete a rule")
    rrsub = rr.add_subparsers(dest="rule_action", required=True, metavar="ACTION")
    ra = rrsub.add_parser(
        "add",
        help="add a rule: --type TYPE and its fields as --field value "
        "(e.g. --public-ip 203.0.113.10 --public-port 8080 --private-ip 10.1.101.10 "
        "--private-port 80 --protocol tcp); lists are comma-separated",
    )
    ra.add_argument("network", metavar="NET")
    ra.add_argument("--type", required=True)
    ra.add_argument("--json", action="store_true")
    rd = rrsub.add_parser("delete", help="delete a rule by id")
    rd.add_argument("network", metavar="NET")
    rd.add_argument("rule_id", type=int, metavar="RULE_ID")
    rd.add_argument("--json", action="store_true")

    net = sub.add_parser("network", help="guest networks")
    nsub = net.add_subparsers(dest="action", required=True, metavar="ACTION")
    nr = nsub.add_parser("restart", help="restart the network's router")
    nr.add_argument("name", metavar="NAME")
    nr.add_argument("--cleanup", action="store_true", help="destroy the router and make a new one")
    nr.add_argument("--wait", action="store_true")
    nr.add_argument("--json", action="store_true")

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


LIST_FIELDS = {"source_cidrs", "dest_cidrs", "members"}


def _rule_fields(pairs: list[str]) -> dict[str, Any]:
    """`--public-port 8080 --source-cidrs a,b` -> {"public_port": 8080, "source_cidrs": [a, b]}.
    Values are data for the rule validator, never text for a shell."""
    fields: dict[str, Any] = {}
    i = 0
    while i < len(pairs):
        flag = pairs[i]
        if not flag.startswith("--") or i + 1 >= len(pairs):
            raise SysvmError(f"rule fields go as --name value pairs; {flag!r} has no value")
        key, value = flag[2:].replace("-", "_"), pairs[i + 1]
        parsed: Any = value
        if value[:1] in "[{":
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise SysvmError(f"--{flag[2:]}: not valid JSON: {exc}") from None
        elif key in LIST_FIELDS:
            parsed = [v for v in value.split(",") if v]
        elif value.isascii() and value.isdigit() and len(value) < 10:
            parsed = int(value)
        elif value in ("true", "false"):
            parsed = value == "true"
        fields[key] = parsed
        i += 2
    return fields


def _config(args: argparse.Namespace) -> Config:
    home = Path(args.home).expanduser().resolve() if args.home else None
    if home is not None:
        os.environ["SYSVM_HOME"] = str(home)  # engines this client starts inherit it
    flags: dict[str, tuple[Any, str]] = {}
    if getattr(args, "read_only", None):
        flags["read_only"] = (True, "--read-only")
    if getattr(args, "ascii", None):
        flags["ascii"] = (True, "--ascii")
    if getattr(args, "theme", None):
        flags["theme"] = (args.theme, "--theme")
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


async def _job_outcome(api: Any, job: Any, args: argparse.Namespace) -> int:
    """Print the job (after following it with --wait); non-zero when it failed."""
    if args.wait:
        job = await _follow_job(api, job.id, quiet=args.json)
    if args.json:
        _print_json(job.to_dict())
    else:
        print(_job_line(job))
        note = (job.result or {}).get("note")
        if note:
            print(f"note: {note}")
    return EXIT_ERROR if job.state in ("failed", "cancelled") else 0


def _print_system_vm(v: dict[str, Any]) -> None:
    for key in ("name", "type", "state", "zone", "host", "network", "control_ip", "started_at"):
        print(f"{key + ':':<12} {v[key] if v[key] is not None else '-'}")
    if v["last_error"]:
        print(f"{'last error:':<12} {v['last_error']}")
    print("nics:")
    for n in v["nics"]:
        print(f"  {n['device']:<5} {n['role']:<10} {n['ip']:<15} {n['netmask']:<15} {n['mac']}")
    print("boot args:")
    print("  " + " ".join(f"{k}={val}" for k, val in v["boot_args"].items()))


def _print_template(t: dict[str, Any]) -> None:
    for key in (
        "name",
        "zone",
        "format",
        "state",
        "url",
        "checksum",
        "size",
        "virtual_size",
        "error",
    ):
        if t.get(key) not in (None, ""):
            print(f"{key + ':':<14} {t[key]}")
    tr = t.get("transfer")
    if tr:
        total = tr["bytes_total"] or 0
        pct = f" ({100 * tr['bytes_done'] / total:.1f}%)" if total else ""
        print(f"{'transfer:':<14} {tr['state']} {tr['bytes_done']} of {total or '?'} bytes{pct}")
        print(f"{'via:':<14} {tr['ssvm'] or '-'} ({tr['reason']})")


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
    if cmd == "console":
        where = await api.console(args.name)
        if args.json:
            _print_json(where)
        elif where["vnc"] is None:
            print(f"{where['vm']}: no console: {where['reason']}")
        else:
            vnc = where["vnc"]
            print(f"{where['vm']}: VNC {vnc['listen']}:{vnc['port']} on {where['host']}")
            for line in where["connect"]:
                print(f"  {line}")
        return 0 if where["vnc"] is not None else EXIT_ERROR
    if cmd == "config":
        rows = await api.config_show()
        if args.json:
            _print_json(rows)
        else:
            width = max(len(r["key"]) for r in rows)
            for r in rows:
                print(f"{r['key']:<{width}}  {json.dumps(r['value']):<10} {r['source']}")
        return 0
    if cmd == "lab" and args.action in ("crash", "host-down", "host-up"):
        if args.action == "crash":
            result = await api.lab_crash(args.vm, undefine=args.undefine)
            text = f"{result['vm']}: domain {'undefined' if result['undefined'] else 'destroyed'} on {result['host']}"
        else:
            result = await api.lab_host(args.host, up=args.action == "host-up")
            text = f"{result['host']}: {'answers again' if result['reachable'] else 'no longer answers'}"
        _print_json(result) if args.json else print(text)
        return 0
    if cmd == "host":
        added = await api.host_add(args.zone, args.name, args.uri)
        _print_json(added) if args.json else print(
            f"host {added['name']} added to {added['zone']} ({added['state']})"
        )
        return 0
    if cmd == "systemvm":
        if args.action in ("list", "show"):
            vms = (
                await api.system_vms_list(zone=args.zone)
                if args.action == "list"
                else [await api.system_vm(args.name)]
            )
            if args.json:
                _print_json(vms if args.action == "list" else vms[0])
            elif args.action == "list":
                print(
                    f"{'NAME':<10} {'TYPE':<6} {'STATE':<9} {'ZONE':<8} {'HOST':<14} {'CONTROL IP':<15} NETWORK"
                )
                for v in vms:
                    print(
                        f"{v['name']:<10} {v['type']:<6} {v['state']:<9} {v['zone']:<8} "
                        f"{v['host'] or '-':<14} {v['control_ip'] or '-':<15} {v['network'] or '-'}"
                    )
            else:
                _print_system_vm(vms[0])
            return 0
        job = await api.system_vm_action(
            args.name,
            args.action,
            host=getattr(args, "to", None),
            force=getattr(args, "force", False),
        )
        return await _job_outcome(api, job, args)
    if cmd == "vm":
        if args.action == "deploy":
            job = await api.guest_vm_deploy(args.network, args.name, template=args.template)
        else:
            job = await api.guest_vm_action(
                args.name, args.action, force=getattr(args, "force", False)
            )
        return await _job_outcome(api, job, args)
    if cmd == "template":
        if args.action == "list":
            rows = await api.templates_list(zone=args.zone)
            if args.json:
                _print_json(rows)
                return 0
            print(f"{'NAME':<20} {'ZONE':<8} {'FORMAT':<6} {'STATE':<21} PROGRESS")
            for t in rows:
                tr = t["transfer"] or {}
                total, done = tr.get("bytes_total") or 0, tr.get("bytes_done") or 0
                progress = f"{100 * done / total:5.1f}%" if total else "-"
                extra = t["error"] or (
                    tr.get("reason") if t["state"].endswith("IN_PROGRESS") else ""
                )
                print(
                    f"{t['name']:<20} {t['zone']:<8} {t['format']:<6} {t['state']:<21} {progress} {extra}"
                )
            return 0
        if args.action in ("show", "cancel", "delete"):
            match = [t for t in await api.templates_list(zone=args.zone) if t["name"] == args.name]
            if not match:
                raise SysvmError(f"no template named {args.name!r} in zone {args.zone}")
            tpl = match[0]
            if args.action == "show":
                _print_json(tpl) if args.json else _print_template(tpl)
                return 0
            if args.action == "delete":
                args.wait = True
                return await _job_outcome(
                    api, await api.template_delete(args.zone, args.name), args
                )
            job_id = (tpl["transfer"] or {}).get("job_id")
            if not job_id:
                raise SysvmError(f"template {args.name!r} has no transfer to cancel")
            job = await api.cancel_job(job_id)
            _print_json(job.to_dict()) if args.json else print(_job_line(job))
            return 0
        if args.action == "register":
            job = await api.template_register(
                args.zone, args.name, args.url, args.format, args.checksum
            )
        else:
            job = await api.template_upload(
                args.zone, args.name, str(Path(args.file).resolve()), args.format, args.checksum
            )
        if not args.wait:
            return await _job_outcome(api, job, args)
        # --wait: progress on stderr, the final state on stdout; non-zero unless it arrived
        job = await _follow_job(api, job.id, quiet=False)
        tpl = next(t for t in await api.templates_list(zone=args.zone) if t["name"] == args.name)
        _print_json(tpl) if args.json else _print_template(tpl)
        return 0 if tpl["state"] in ("DOWNLOADED", "UPLOADED") else EXIT_ERROR
    if cmd == "router":
        if args.action == "show":
            shown = await api.router_show(args.network)
            if args.json:
                _print_json(shown)
            else:
                drift = "DRIFT" if shown["drift"] else "in sync"
                pending = ", changes pending apply" if shown["pending"] else ""
                print(
                    f"{shown['network']}: router {shown['router'] or '-'} ({shown['router_state'] or '-'}), "
                    f"public {shown['public_ip'] or '-'}, version {shown['version']}, {drift}{pending}"
                )
                for r in shown["rules"]:
                    fields = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("id", "type"))
                    print(f"  {r['id']:>5} {r['type']:<18} {fields}")
            return 0
        if args.action == "apply":
            job = await api.router_apply(args.network, confirm_timeout=args.confirm_timeout)
            return await _job_outcome(api, job, args)
        if args.action == "check":
            c = await api.router_check(args.network)
            if args.json:
                _print_json(c)
            else:
                state = "DRIFT: live differs from what was applied" if c["drift"] else "in sync"
                print(f"{c['network']}: {c['router']} version {c['live_version']} live, {state}")
            return 1 if c["drift"] else 0
        if args.action == "diff":
            d = await api.router_diff(args.network)
            if args.json:
                _print_json(d)
            else:
                for key, sign in (("added", "+"), ("removed", "-"), ("changed", "~")):
                    for r in d[key]:
                        print(
                            f"{sign} {r['id']:>5} {r['type']:<18} {json.dumps(r['fields'], sort_keys=True)}"
                        )
                if not d["pending"]:
                    print("no changes since the last apply")
            return 0
        if args.rule_action == "add":
            added = await api.router_rule_add(
                args.network, args.type, _rule_fields(args.rule_fields)
            )
            _print_json(added) if args.json else print(
                f"rule {added['id']} added (apply to make it live)"
            )
        else:
            await api.router_rule_delete(args.network, args.rule_id)
            print(f"rule {args.rule_id} deleted (apply to make it live)")
        return 0
    if cmd == "network":
        job = await api.network_restart(args.name, cleanup=args.cleanup)
        return await _job_outcome(api, job, args)
    if cmd == "lab":
        if args.action == "up":
            job = await api.lab_up(
                zones=args.zones if args.zones is not None else config["lab.zones"],
                hosts=args.hosts if args.hosts is not None else config["lab.hosts"],
                networks=args.networks if args.networks is not None else config["lab.networks"],
                vms=args.vms if args.vms is not None else config["lab.vms"],
                backend=args.backend,
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
        from tui_app.themes import console_theme

        app = SysvmApp(
            api,
            read_only=bool(config["read_only"]),
            ascii=bool(config["ascii"]),
            keymap=config.keys,
            theme=console_theme(str(config["theme"])),
        )
        await app.run_async()
        return 0
    raise SysvmError(f"unknown command {cmd}")


def _prepare_console(config: Config) -> None:
    """Before the console connects: refuse a bad theme, and send its logs to `tui.log`."""
    from backend.log_file import log_to_file
    from tui_app.themes import console_theme

    console_theme(str(config["theme"]), config.sources["theme"])
    config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_to_file(config.home / "tui.log", str(config["log.level"]))


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    if getattr(args, "rule_action", None) == "add":
        args.rule_fields = extra
    elif extra:
        _parser().error(f"unrecognized arguments: {' '.join(extra)}")
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
        if args.command == "tui":
            _prepare_console(config)
        if args.command == "lab" and args.action == "exec":
            return _lab_exec(args.name, args.argv)
        if args.command == "lab" and args.action == "up" and args.backend == "netns":
            from backend.lab.netns import problem

            if why := problem():
                raise SysvmError(why)
        return asyncio.run(_client_command(args, config))
    except SysvmError as exc:
        print(f"sysvm: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sysvm status | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _lab_exec(name: str, argv: list[str]) -> int:
    """`lab exec NAME -- CMD...`: exec CMD (an argv list, no shell) in NAME's namespace."""
    from backend.errors import InvalidInput, NotFound
    from backend.lab import netns
    from backend.services.names import check_name

    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise InvalidInput("CMD", "give the command to run after `--`")
    if os.geteuid() != 0:
        raise SysvmError("lab exec enters the lab's network namespaces: run it as root (sudo)")
    spaces = netns.namespaces()
    if netns.PUBLIC_NS not in spaces:
        raise SysvmError(
            "the lab is not running the netns back end; build it with "
            "`sudo sysvm lab up --backend netns`"
        )
    if name == "public":
        ns = netns.PUBLIC_NS
    else:
        ns = netns.guest_ns(check_name("NAME", name))
        if ns not in spaces:
            have = sorted(s.removeprefix("sv-vm-") for s in spaces if s.startswith("sv-vm-"))
            raise NotFound(
                f"no guest VM named {name!r} in the netns lab; try `public` or one of: "
                + (", ".join(have[:10]) or "(none)")
            )
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", ns, *argv])


if __name__ == "__main__":
    sys.exit(main())

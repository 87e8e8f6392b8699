"""An appliance's fixed commands behind a real OpenSSH `sshd`, as its `ForceCommand`.

sshd runs `python -m backend.appliance.forced_command --vm NAME --root DIR [--netns NS]` for every
session, whatever the client asked for; the client's command line arrives in
`SSH_ORIGINAL_COMMAND` and is split into words (never given to a shell), then looked up among the
same fixed commands the lab's loopback endpoints serve (`sysvm-appliance status`, `sysvm-router
apply|confirm|show|check|boot`). Input is the session's stdin, the one JSON answer goes to stdout,
and the exit status is the command's. Used by the netns lab's routers (`backend.lab.netns_guests`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from backend.appliance.router.agent import RouterAgent
from backend.appliance.router.site import RouterSite

if TYPE_CHECKING:  # not imported at run time: asyncssh alone takes 0.4 s to load
    from backend.appliance.endpoint import CommandContext

Handler = Callable[["CommandContext"], Awaitable[int]]
EXIT_USAGE = 2  # as the lab's loopback endpoints answer (backend.appliance.endpoint)
EXIT_UNKNOWN_COMMAND = 127


class StdioContext:
    """What a command sees (as `CommandContext`), on the process's own stdin and stdout."""

    def __init__(self, vm_name: str, args: list[str], booted_at: float) -> None:
        self.vm_name = vm_name
        self.args = args
        self.boot_args: dict[str, str] = {}
        self.booted_at = booted_at
        self._reader: asyncio.StreamReader | None = None

    @property
    def uptime(self) -> float:
        return time.time() - self.booted_at

    async def _stdin(self) -> asyncio.StreamReader:
        if self._reader is None:
            reader = asyncio.StreamReader(limit=2**20)
            await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
            )
            self._reader = reader
        return self._reader

    async def read(self, n: int = -1) -> bytes:
        return await (await self._stdin()).read(n)

    async def stdin(self) -> str:
        return (await self.read()).decode("utf-8", errors="replace")

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


async def _status(ctx: CommandContext) -> int:
    ctx.write(json.dumps({"vm": ctx.vm_name, "boot_args": {}, "uptime": round(ctx.uptime, 3)}))
    ctx.write("\n")
    return 0


def commands(agent: RouterAgent) -> dict[tuple[str, ...], Handler]:
    return {
        ("sysvm-appliance", "status"): _status,
        ("sysvm-router", "apply"): agent.apply,
        ("sysvm-router", "confirm"): agent.confirm,
        ("sysvm-router", "show"): agent.show,
        ("sysvm-router", "check"): agent.check,
        ("sysvm-router", "boot"): agent.boot,
    }


async def run(site: RouterSite, vm: str, command_line: str, booted_at: float) -> int:
    try:
        argv = shlex.split(command_line)
    except ValueError as exc:
        print(f"cannot parse command line: {exc}", file=sys.stderr)
        return EXIT_USAGE
    table = commands(RouterAgent(lambda _name: site))
    handler = table.get(tuple(argv[:2]))
    if handler is None:
        print("unknown command (this router runs its fixed commands only)", file=sys.stderr)
        return EXIT_UNKNOWN_COMMAND
    ctx = StdioContext(vm, argv[2:], booted_at)
    return await handler(cast("CommandContext", ctx))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="backend.appliance.forced_command")
    parser.add_argument("--vm", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--netns")
    parser.add_argument("--iptables", default="iptables")
    parser.add_argument("--booted-at", type=float, default=time.time())
    args = parser.parse_args(argv)
    site = RouterSite(Path(args.root), args.netns, args.iptables, services=args.netns is not None)
    command_line = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    status = asyncio.run(run(site, args.vm, command_line, args.booted_at))
    sys.stdout.flush()
    os._exit(status)  # no waiting on a stdin reader thread: the answer is out


if __name__ == "__main__":
    main()

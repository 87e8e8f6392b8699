"""A router's appliance as one long-lived process, as a real router's agent is.

sshd starts a new process for every session. Run as that process, the appliance would parse and
render the router's whole bundle again for every command and could never send a delta: a
10,000-rule router would pay a second per apply. So in the netns lab each router runs this service
inside its namespace (started as the router boots), keeping the applier's parsed bundle, ruleset
and live state in memory; sshd's ForceCommand is `backend.appliance.relay`, a small client that
hands the session's command and stdin to this service and prints its answer.

It listens on an abstract Unix socket (`socket_name(vm)`), which exists only in the router's
network namespace and leaves no file behind, and serves only root (checked with SO_PEERCRED).
Per connection: one JSON line {"command": SSH_ORIGINAL_COMMAND}, then the session's stdin to end
of file; the answer is one JSON line {"status": exit status, "stdout": text, "stderr": text}, or,
when the request says `"answer": "frame"` (the relay does), `framed_answer`'s frame, which the
relay reads without importing `json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from backend.appliance.forced_command import EXIT_UNKNOWN_COMMAND, EXIT_USAGE, commands
from backend.appliance.router.agent import RouterAgent
from backend.appliance.router.site import RouterSite
from backend.appliance.service_socket import framed_answer, socket_name

if TYPE_CHECKING:
    from backend.appliance.endpoint import CommandContext

log = logging.getLogger(__name__)
MAX_HEADER = 64 * 1024


class SocketContext:
    """What a command sees (as `CommandContext`): stdin from the connection, output kept."""

    def __init__(
        self, vm_name: str, args: list[str], reader: asyncio.StreamReader, booted_at: float
    ) -> None:
        self.vm_name = vm_name
        self.args = args
        self.boot_args: dict[str, str] = {}
        self.booted_at = booted_at
        self._reader = reader
        self.out: list[str] = []

    @property
    def uptime(self) -> float:
        return time.time() - self.booted_at

    async def read(self, n: int = -1) -> bytes:
        return await self._reader.read(n)

    async def stdin(self) -> str:
        return (await self._reader.read()).decode("utf-8", errors="replace")

    def write(self, text: str) -> None:
        self.out.append(text)


class RouterService:
    """Serves one router's fixed commands to the relay, keeping one applier in memory."""

    def __init__(self, site: RouterSite, vm: str, booted_at: float) -> None:
        self.vm = vm
        self.booted_at = booted_at
        self.table = commands(RouterAgent(lambda _name: site))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _from_root(writer):
                answer = _Answer(EXIT_USAGE, "", "only root may ask\n", framed=False)
            else:
                answer = await self._answer(reader)
            writer.write(answer.encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("a relay went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> _Answer:
        header = await reader.readline()
        try:
            request = json.loads(header)
            command = str(request["command"])
            framed = request.get("answer") == "frame"
            argv = shlex.split(command)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _Answer(EXIT_USAGE, "", f"bad request: {exc}\n", framed=False)
        handler = self.table.get(tuple(argv[:2]))
        if handler is None:
            unknown = "unknown command (this router runs its fixed commands only)\n"
            return _Answer(EXIT_UNKNOWN_COMMAND, "", unknown, framed=framed)
        ctx = SocketContext(self.vm, argv[2:], reader, self.booted_at)
        status = await handler(cast("CommandContext", ctx))
        return _Answer(status, "".join(ctx.out), "", framed=framed)


@dataclass(frozen=True)
class _Answer:
    status: int
    stdout: str
    stderr: str
    framed: bool  # the relay asked for `framed_answer`'s frame; else one JSON line

    def encode(self) -> bytes:
        if self.framed:
            return framed_answer(self.status, self.stdout, self.stderr)
        fields = {"status": self.status, "stdout": self.stdout, "stderr": self.stderr}
        return (json.dumps(fields) + "\n").encode()


def _from_root(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())


async def serve(site: RouterSite, vm: str, booted_at: float) -> None:
    service = RouterService(site, vm, booted_at)
    server = await asyncio.start_unix_server(service.handle, path=socket_name(vm), limit=MAX_HEADER)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="backend.appliance.router_service")
    parser.add_argument("--vm", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--netns")
    parser.add_argument("--iptables", default="iptables")
    parser.add_argument("--booted-at", type=float, default=time.time())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    site = RouterSite(Path(args.root), args.netns, args.iptables, services=args.netns is not None)
    asyncio.run(serve(site, args.vm, args.booted_at))


if __name__ == "__main__":
    main()

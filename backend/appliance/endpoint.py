"""The `local` back end's system VM guests: one process serving an SSH endpoint per VM on loopback."""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncssh

from backend.errors import Conflict, InvalidInput, NotFound

log = logging.getLogger(__name__)

LISTEN_ADDRESS = "127.0.0.1"
EXIT_UNKNOWN_COMMAND = 127
EXIT_USAGE = 2


class CommandContext:
    """What a fixed appliance command sees: its VM, its arguments, the VM's boot args and its stdio."""

    def __init__(
        self,
        vm_name: str,
        args: list[str],
        boot_args: dict[str, str],
        process: asyncssh.SSHServerProcess[bytes],
        booted_at: float,
    ) -> None:
        self.vm_name = vm_name
        self.args = args
        self.boot_args = boot_args
        self._process = process
        self._booted_at = booted_at
        self._pending = bytearray()  # input read ahead by readline, served first by read

    @property
    def uptime(self) -> float:
        """Seconds since the VM's endpoint (its stand-in guest) started."""
        return time.monotonic() - self._booted_at

    async def stdin(self) -> str:
        """Read all of the command's input, up to end of file, as UTF-8 text."""
        data = bytes(self._pending) + await self._process.stdin.read()
        self._pending.clear()
        return data.decode("utf-8", errors="replace")

    async def read(self, n: int = -1) -> bytes:
        """Read up to `n` bytes of input as they arrive (all of it to end of file when n < 0); b"" at EOF."""
        if self._pending:
            if n < 0:
                data = bytes(self._pending) + await self._process.stdin.read()
                self._pending.clear()
                return data
            data = bytes(self._pending[:n])
            del self._pending[:n]
            return data
        return await self._process.stdin.read(n)

    async def readline(self, limit: int = 64 * 1024) -> bytes:
        """Read one line of input, newline included (without one at EOF); InvalidInput past `limit` bytes."""
        while True:
            end = self._pending.find(b"\n")
            if end != -1:
                line = bytes(self._pending[: end + 1])
                del self._pending[: end + 1]
                return line
            if len(self._pending) > limit:
                raise InvalidInput("stdin", f"no end of line within {limit} bytes")
            chunk = await self._process.stdin.read(64 * 1024)
            if not chunk:
                line = bytes(self._pending)
                self._pending.clear()
                return line
            self._pending += chunk

    def write(self, text: str) -> None:
        """Write text to the command's stdout."""
        self._process.stdout.write(text.encode())

    async def drain(self) -> None:
        """Wait until stdout has room again (flow control from the client)."""
        await self._process.stdout.drain()

    @property
    def closing(self) -> bool:
        """Whether the client closed the session (or the connection dropped)."""
        return self._process.is_closing()

    async def wait_closed(self) -> None:
        """Return once the client closes the session or the connection drops: a command that
        should stop when nobody listens any more (a download being cancelled) waits on this."""
        await self._process.channel.wait_closed()

    def write_err(self, text: str) -> None:
        """Write text to the command's stderr."""
        self._process.stderr.write(text.encode())


CommandHandler = Callable[[CommandContext], Awaitable[int]]


@dataclass
class _Endpoint:
    """One VM's SSH endpoint: its listener, live connections and counters."""

    vm_name: str
    port: int
    boot_args: dict[str, str]
    started_at: float = field(default_factory=time.monotonic)
    acceptor: asyncssh.SSHAcceptor | None = None
    connections: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    accepted: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


class _EndpointServer(asyncssh.SSHServer):
    """Per-connection server object: counts and tracks connections so `stop` can drop them."""

    def __init__(self, endpoint: _Endpoint) -> None:
        self._endpoint = endpoint
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._endpoint.accepted += 1
        self._endpoint.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._endpoint.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True  # always require the authorized public key

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False


class ApplianceEndpoints:
    """SSH endpoints of many local system VMs, each on its own loopback port with its own host key.

    Only the engine's client key may log in. An exec request runs one registered fixed command
    (never a shell); `stop` drops the endpoint and its live connections, which is how a guest crash looks.
    """

    def __init__(self, authorized_client_key: str) -> None:
        try:
            self._authorized = asyncssh.import_authorized_keys(authorized_client_key.strip() + "\n")
        except ValueError as exc:
            raise InvalidInput(
                "authorized_client_key", f"not an OpenSSH public key: {exc}"
            ) from exc
        self._endpoints: dict[str, _Endpoint] = {}
        self._commands: dict[tuple[str, ...], CommandHandler] = {}
        self.register("sysvm-appliance status", self._status)
        self.register("sysvm-appliance echo", self._echo)

    def register(self, name: str, handler: CommandHandler) -> None:
        """Make `handler` answer exec requests whose command line starts with the word(s) of `name`."""
        words = tuple(name.split())
        if not words:
            raise InvalidInput("name", "a command name needs at least one word")
        self._commands[words] = handler

    async def start(
        self,
        vm_name: str,
        host_private_key: str,
        port: int = 0,
        boot_args: dict[str, str] | None = None,
    ) -> int:
        """Serve `vm_name`'s SSH endpoint on 127.0.0.1:`port` (0 picks a free one); returns the port."""
        if vm_name in self._endpoints:
            raise Conflict(
                f"the SSH endpoint of {vm_name} is already running on port {self._endpoints[vm_name].port}"
            )
        try:
            host_key = asyncssh.import_private_key(host_private_key)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise InvalidInput("host_private_key", f"not an OpenSSH private key: {exc}") from exc
        endpoint = _Endpoint(vm_name=vm_name, port=port, boot_args=dict(boot_args or {}))

        async def process(proc: asyncssh.SSHServerProcess[bytes]) -> None:
            await self._serve(endpoint, proc)

        try:
            acceptor = await asyncssh.listen(
                LISTEN_ADDRESS,
                port,
                server_host_keys=[host_key],
                authorized_client_keys=self._authorized,
                server_factory=lambda: _EndpointServer(endpoint),
                process_factory=process,
                encoding=None,
                config=[],
                password_auth=False,
                kbdint_auth=False,
                gss_host=None,
                allow_pty=False,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_scp=False,
                line_editor=False,
                reuse_address=True,
            )
        except OSError as exc:
            raise Conflict(
                f"cannot serve the SSH endpoint of {vm_name} on {LISTEN_ADDRESS}:{port}: {exc.strerror or exc}"
            ) from exc
        endpoint.acceptor = acceptor
        endpoint.port = acceptor.get_port()
        self._endpoints[vm_name] = endpoint
        log.info("SSH endpoint of %s listening on %s:%d", vm_name, LISTEN_ADDRESS, endpoint.port)
        return endpoint.port

    async def stop(self, vm_name: str) -> None:
        """Stop `vm_name`'s endpoint and drop its live connections at once, as a crashed guest would."""
        endpoint = self._endpoints.pop(vm_name, None)
        if endpoint is None:
            return
        if endpoint.acceptor is not None:
            endpoint.acceptor.close()
            await endpoint.acceptor.wait_closed()
        conns = list(endpoint.connections)
        for conn in conns:
            conn.abort()
        for conn in conns:
            await conn.wait_closed()
        log.info("SSH endpoint of %s stopped", vm_name)

    async def stop_all(self) -> None:
        """Stop every endpoint."""
        for vm_name in list(self._endpoints):
            await self.stop(vm_name)

    def is_running(self, vm_name: str) -> bool:
        """Whether `vm_name`'s endpoint is serving."""
        return vm_name in self._endpoints

    def port_of(self, vm_name: str) -> int | None:
        """The loopback port of `vm_name`'s endpoint, or None when it is not running."""
        endpoint = self._endpoints.get(vm_name)
        return endpoint.port if endpoint is not None else None

    def connections_accepted(self, vm_name: str) -> int:
        """How many SSH connections the running endpoint of `vm_name` has accepted since it started."""
        return self._endpoint(vm_name).accepted

    def peak_commands(self, vm_name: str) -> int:
        """The most commands the running endpoint of `vm_name` has had in flight at once."""
        return self._endpoint(vm_name).peak_in_flight

    def _endpoint(self, vm_name: str) -> _Endpoint:
        endpoint = self._endpoints.get(vm_name)
        if endpoint is None:
            raise NotFound(f"no SSH endpoint is running for {vm_name}")
        return endpoint

    def _lookup(self, argv: list[str]) -> tuple[CommandHandler, list[str]] | None:
        """The handler registered for the longest leading words of `argv`, and the remaining args."""
        for n in range(len(argv), 0, -1):
            handler = self._commands.get(tuple(argv[:n]))
            if handler is not None:
                return handler, argv[n:]
        return None

    async def _serve(self, endpoint: _Endpoint, proc: asyncssh.SSHServerProcess[bytes]) -> None:
        """Run one exec request as a fixed command; shells and subsystems are refused."""
        command = proc.command
        if command is None or proc.subsystem:
            proc.stderr.write(b"interactive shells and subsystems are refused; exec a command\n")
            proc.exit(1)
            return
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            proc.stderr.write(f"cannot parse command line: {exc}\n".encode())
            proc.exit(EXIT_USAGE)
            return
        found = self._lookup(argv)
        if found is None:
            proc.stderr.write(f"unknown command: {command}\n".encode())
            proc.exit(EXIT_UNKNOWN_COMMAND)
            return
        handler, args = found
        ctx = CommandContext(endpoint.vm_name, args, endpoint.boot_args, proc, endpoint.started_at)
        endpoint.in_flight += 1
        endpoint.peak_in_flight = max(endpoint.peak_in_flight, endpoint.in_flight)
        status = 1
        try:
            status = await handler(ctx)
            await proc.stdout.drain()
            await proc.stderr.drain()
        except (asyncssh.Error, BrokenPipeError, ConnectionError):
            log.info("client of %s went away during %r", endpoint.vm_name, command)
        except Exception as exc:
            log.exception("appliance command %r failed on %s", command, endpoint.vm_name)
            proc.stderr.write(f"internal error: {exc}\n".encode())
        finally:
            endpoint.in_flight -= 1
            proc.exit(status)

    @staticmethod
    async def _status(ctx: CommandContext) -> int:
        """`sysvm-appliance status`: one JSON line naming the VM, its boot args and its uptime."""
        status = {"vm": ctx.vm_name, "boot_args": ctx.boot_args, "uptime": round(ctx.uptime, 3)}
        ctx.write(json.dumps(status) + "\n")
        return 0

    @staticmethod
    async def _echo(ctx: CommandContext) -> int:
        """`sysvm-appliance echo`: copy stdin to stdout (checks that input crosses the transport whole)."""
        ctx.write(await ctx.stdin())
        return 0

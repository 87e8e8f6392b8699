"""The SSH connections of the transport's worker process (`ssh_worker`): one reused connection
per system VM (address, port, host key), at most `max_channels` commands on it at once, strict
host keys. Everything here runs on the worker's event loop; `SystemVMTransport` is the engine's
side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncssh

from backend.errors import HostKeyMismatch, InvalidInput, TransportError, TransportTimeout
from backend.transport.results import CommandFailed, CommandResult

log = logging.getLogger(__name__)

USERNAME = "root"
STDERR_TAIL_BYTES = 4096


def _known_hosts(host_public_key: str) -> asyncssh.SSHKnownHosts:
    """Known hosts that trust exactly one key, for whatever address the VM is reached at."""
    try:
        asyncssh.import_public_key(host_public_key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidInput("host_public_key", f"not an OpenSSH public key: {exc}") from exc
    return asyncssh.import_known_hosts(f"* {host_public_key.strip()}\n")


@dataclass
class _Connection:
    """One live SSH connection to a system VM and the channel slots it has left."""

    conn: asyncssh.SSHClientConnection
    channels: asyncio.Semaphore


_Key = tuple[str, int, str]


@dataclass
class _Slot:
    """Cache entry for one (address, port, host key): the connection, and a lock so only one call dials."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connection: _Connection | None = None


class SSHConnections:
    """Runs fixed engine commands on system VMs over SSH as root, trusting only each VM's
    provisioned host key; one connection per (address, port, host key), reused."""

    def __init__(
        self,
        client_key: asyncssh.SSHKey,
        *,
        connect_timeout: float,
        command_timeout: float,
        max_channels: int,
    ) -> None:
        self._client_key = client_key
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._max_channels = max_channels
        self._slots: dict[_Key, _Slot] = {}

    async def run(
        self,
        address: str,
        port: int,
        host_public_key: str,
        command: str,
        stdin: bytes | str | None,
    ) -> CommandResult:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        key: _Key = (address, port, host_public_key.strip())
        where = f"{address}:{port}"
        connection, reused = await self._connection(key)
        try:
            return await self._run_on(connection, where, command, data)
        except _ChannelNotOpened as exc:
            self._forget(key, connection)
            if not reused:
                raise TransportError(f"system VM at {where} refused a session: {exc}") from exc
            # The cached connection went stale (guest rebooted, idle cut); the command never ran.
            log.info("connection to %s went stale (%s); reconnecting", where, exc)
            connection, _ = await self._connection(key)
            try:
                return await self._run_on(connection, where, command, data)
            except _ChannelNotOpened as exc2:
                self._forget(key, connection)
                raise TransportError(f"system VM at {where} refused a session: {exc2}") from exc2

    async def stream(
        self,
        address: str,
        port: int,
        host_public_key: str,
        command: str,
        stdin: bytes | str | AsyncIterator[bytes] | None,
        *,
        idle_timeout: float | None,
    ) -> AsyncIterator[str]:
        key: _Key = (address, port, host_public_key.strip())
        where = f"{address}:{port}"
        connection, reused = await self._connection(key)
        while True:
            await connection.channels.acquire()
            try:
                async with asyncio.timeout(self._command_timeout):
                    process = await connection.conn.create_process(command, encoding=None)
                break
            except TimeoutError as exc:
                connection.channels.release()
                raise TransportTimeout(
                    f"system VM at {where} did not open a session within {self._command_timeout:g}s"
                ) from exc
            except (asyncssh.ChannelOpenError, asyncssh.DisconnectError, OSError) as exc:
                connection.channels.release()
                self._forget(key, connection)
                if not reused:
                    raise TransportError(
                        f"system VM at {where} refused a session: {_reason(exc)}"
                    ) from exc
                log.info("connection to %s went stale (%s); reconnecting", where, _reason(exc))
                connection, reused = await self._connection(key)
            except BaseException:
                connection.channels.release()
                raise
        feeder = asyncio.create_task(_feed_stdin(process, stdin), name=f"stdin-{where}")
        stderr_tail = asyncio.create_task(_stderr_tail(process), name=f"stderr-{where}")
        finished = False
        try:
            while True:
                try:
                    async with asyncio.timeout(idle_timeout):
                        line = await process.stdout.readline()
                except TimeoutError as exc:
                    raise TransportTimeout(
                        f"command on system VM at {where} printed nothing for {idle_timeout:g}s"
                    ) from exc
                except (asyncssh.Error, OSError) as exc:
                    raise TransportError(
                        f"connection to system VM at {where} broke during a command: {_reason(exc)}"
                    ) from exc
                if not line:
                    break
                yield _text(line).rstrip("\r\n")
            if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
                raise feeder.exception()  # type: ignore[misc]
            try:
                completed = await process.wait(check=False)
            except (asyncssh.Error, OSError) as exc:
                raise TransportError(
                    f"connection to system VM at {where} broke during a command: {_reason(exc)}"
                ) from exc
            finished = True
            tail = await stderr_tail
            if completed.returncode is None:
                raise TransportError(
                    f"connection to system VM at {where} closed before the command reported an exit status"
                )
            if completed.returncode != 0:
                last = tail.strip().splitlines()[-1:] or ["no message on stderr"]
                raise CommandFailed(
                    f"{' '.join(command.split()[:2])!r} on system VM at {where} exited with status "
                    f"{completed.returncode}: {last[0][:300]}",
                    completed.returncode,
                    tail,
                )
        finally:
            if not finished:
                process.channel.abort()  # drop queued input too: stop now, not after a flush
            feeder.cancel()
            stderr_tail.cancel()
            connection.channels.release()

    async def close(self) -> None:
        slots, self._slots = self._slots, {}
        conns = [s.connection.conn for s in slots.values() if s.connection is not None]
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.wait_closed()

    def drop(self, address: str, port: int, host_public_key: str) -> None:
        slot = self._slots.get((address, port, host_public_key.strip()))
        if slot is not None and slot.connection is not None:
            self._forget((address, port, host_public_key.strip()), slot.connection)

    async def _connection(self, key: _Key) -> tuple[_Connection, bool]:
        """The live connection for `key`, dialling if there is none; also says whether it was reused."""
        slot = self._slots.setdefault(key, _Slot())
        async with slot.lock:
            if slot.connection is not None and not slot.connection.conn.is_closed():
                return slot.connection, True
            slot.connection = None
            self._prune(key)
            conn = await self._connect(*key)
            slot.connection = _Connection(conn, asyncio.Semaphore(self._max_channels))
            return slot.connection, False

    def _prune(self, key: _Key) -> None:
        """Forget idle entries for the same address:port under another host key (VM reprovisioned)."""
        for other, slot in list(self._slots.items()):
            if other[:2] != key[:2] or other == key or slot.lock.locked():
                continue
            if slot.connection is None or slot.connection.conn.is_closed():
                del self._slots[other]

    def _forget(self, key: _Key, connection: _Connection) -> None:
        """Drop `connection` from the cache (if still cached) and close it."""
        slot = self._slots.get(key)
        if slot is not None and slot.connection is connection:
            slot.connection = None
        connection.conn.close()

    async def _connect(
        self, address: str, port: int, host_public_key: str
    ) -> asyncssh.SSHClientConnection:
        """Open and authenticate one SSH connection, mapping asyncssh failures to operator errors."""
        where = f"{address}:{port}"
        known_hosts = _known_hosts(host_public_key)
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await asyncssh.connect(
                    address,
                    port,
                    username=USERNAME,
                    client_keys=[self._client_key],
                    known_hosts=known_hosts,
                    config=[],
                    agent_path=None,
                    password=None,
                    kbdint_auth=False,
                    gss_auth=False,
                    preferred_auth="publickey",
                    x509_trusted_certs=None,
                )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostKeyMismatch(
                f"system VM at {where} presented a host key that doesn't match the one generated "
                f"at provisioning; refusing to connect (reprovision the VM if it was rebuilt)"
            ) from exc
        except asyncssh.PermissionDenied as exc:
            raise TransportError(
                f"system VM at {where} refused the engine's SSH key: {exc.reason}"
            ) from exc
        except TimeoutError as exc:
            raise TransportTimeout(
                f"cannot reach system VM at {where}: no SSH handshake within {self._connect_timeout:g}s"
            ) from exc
        except (OSError, asyncssh.Error) as exc:
            raise TransportError(f"cannot reach system VM at {where}: {_reason(exc)}") from exc

    async def _run_on(
        self, connection: _Connection, where: str, command: str, data: bytes | None
    ) -> CommandResult:
        """Run one command on one channel of `connection`, holding a channel slot throughout."""
        async with connection.channels:
            process: asyncssh.SSHClientProcess[bytes] | None = None
            try:
                async with asyncio.timeout(self._command_timeout):
                    try:
                        process = await connection.conn.create_process(
                            command, input=data, encoding=None
                        )
                    except (asyncssh.ChannelOpenError, asyncssh.DisconnectError, OSError) as exc:
                        raise _ChannelNotOpened(_reason(exc)) from exc
                    try:
                        completed = await process.wait(check=False)
                    except asyncio.CancelledError:
                        process.close()  # the caller gave up: tell the command to stop
                        raise
            except TimeoutError as exc:
                if process is not None:
                    process.close()
                raise TransportTimeout(
                    f"command on system VM at {where} did not finish within {self._command_timeout:g}s"
                ) from exc
            except (asyncssh.Error, OSError) as exc:
                raise TransportError(
                    f"connection to system VM at {where} broke during a command: {_reason(exc)}"
                ) from exc
        if completed.returncode is None:
            raise TransportError(
                f"connection to system VM at {where} closed before the command reported an exit status"
            )
        return CommandResult(
            exit_status=completed.returncode,
            stdout=_text(completed.stdout),
            stderr=_text(completed.stderr),
        )


async def _feed_stdin(
    process: asyncssh.SSHClientProcess[bytes], stdin: bytes | str | AsyncIterator[bytes] | None
) -> None:
    """Send `stdin` to the remote command with flow control, then end of file.

    The remote side may stop reading (it failed, or finished early): a broken pipe ends the feed
    quietly, the exit status tells the story. An error of the caller's iterator closes the channel.
    """
    try:
        if isinstance(stdin, str):
            stdin = stdin.encode()
        if isinstance(stdin, bytes):
            process.stdin.write(stdin)
        elif stdin is not None:
            async for chunk in stdin:
                process.stdin.write(chunk)
                await process.stdin.drain()
        process.stdin.write_eof()
        await process.stdin.drain()
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        pass
    except Exception:
        process.channel.abort()
        raise


async def _stderr_tail(process: asyncssh.SSHClientProcess[bytes]) -> str:
    """Read stderr to the end (so it never blocks the channel), keeping the last few KiB."""
    tail = b""
    with contextlib.suppress(asyncssh.Error, OSError):
        while chunk := await process.stderr.read(65536):
            tail = (tail + chunk)[-STDERR_TAIL_BYTES:]
    return _text(tail)


class _ChannelNotOpened(Exception):
    """A session could not be opened on a connection, so the command was never started."""


def _reason(exc: BaseException) -> str:
    """A short human reason for an asyncssh or socket failure."""
    if isinstance(exc, asyncssh.DisconnectError | asyncssh.ChannelOpenError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _text(output: object) -> str:
    """Decode command output as UTF-8, replacing undecodable bytes."""
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return "" if output is None else str(output)

"""The engine's SSH client to system VMs: strict host keys, one reused connection per VM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from backend.errors import (
    ConfigError,
    HostKeyMismatch,
    InvalidInput,
    TransportError,
    TransportTimeout,
)
from backend.transport.loop_thread import LoopThread, LoopThreadStopped

log = logging.getLogger(__name__)

KEY_ALGORITHM = "ssh-ed25519"
USERNAME = "root"
STDERR_TAIL_BYTES = 4096
_CLOSED = "the SSH transport was closed while the command ran"

T = TypeVar("T")


@dataclass(frozen=True)
class CommandResult:
    """What a command on a system VM answered: exit status (negative signal number if killed) and output."""

    exit_status: int
    stdout: str
    stderr: str


class CommandFailed(TransportError):
    """A streamed command exited non-zero; its stdout lines were already yielded (the last usually says why)."""

    code = "command_failed"

    def __init__(self, message: str, exit_status: int, stderr_tail: str) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr_tail = stderr_tail


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 via a temporary file and rename, so `path` is whole or absent."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def generate_keypair(path: Path) -> None:
    """Create the engine's ed25519 client key at `path` (0600) and `path.with_suffix('.pub')` unless it exists."""
    pub_path = path.with_suffix(".pub")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        if not pub_path.exists():
            key = load_client_key(path)
            _write_atomically(pub_path, key.export_public_key("openssh"))
        return
    key = asyncssh.generate_private_key(KEY_ALGORITHM, comment="sysvm-engine")
    # Public half first: a crash in between leaves no private key, so the next call starts over.
    _write_atomically(pub_path, key.export_public_key("openssh"))
    _write_atomically(path, key.export_private_key("openssh"))


def load_client_key(path: Path) -> asyncssh.SSHKey:
    """Read the engine's private client key; a missing or unreadable key is a ConfigError."""
    try:
        return asyncssh.read_private_key(str(path))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(
            f"cannot read the engine's SSH key {path}: {exc}; remove it to have a new one generated"
        ) from exc


def new_host_key() -> tuple[str, str]:
    """Generate a system VM's ed25519 host key: (private key in OpenSSH format, public key line)."""
    key = asyncssh.generate_private_key(KEY_ALGORITHM, comment="sysvm-host")
    private = key.export_private_key("openssh").decode()
    public = key.export_public_key("openssh").decode().strip()
    return private, public


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


class SystemVMTransport:
    """Runs fixed engine commands on system VMs over SSH as root, trusting only each VM's provisioned host key.

    One connection per (address, port, host key) is kept and reused; at most `max_channels`
    commands run on it at once (OpenSSH's sshd allows 10 sessions per connection by default).
    All SSH work (key exchange, encryption, the connections themselves) runs on an event loop of
    the transport's own thread, so hundreds of handshakes at once do not stall the caller's loop;
    the public methods are awaited from any loop and bridge to it.
    """

    def __init__(
        self,
        client_key: asyncssh.SSHKey,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
        max_channels: int = 8,
    ) -> None:
        if max_channels < 1:
            raise InvalidInput("max_channels", "must be at least 1")
        self._client_key = client_key
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._max_channels = max_channels
        self._slots: dict[_Key, _Slot] = {}
        self._thread = LoopThread("sysvm-ssh")

    async def run(
        self,
        address: str,
        port: int,
        host_public_key: str,
        command: str,
        stdin: bytes | str | None = None,
    ) -> CommandResult:
        """Run `command` on the system VM at address:port and return its exit status and output.

        `command` is a fixed command line chosen by the engine, never user input: rule text and
        other data go on `stdin`. Raises HostKeyMismatch, TransportError or TransportTimeout
        (the command timeout starts once a channel slot is free). A non-zero exit is not an error.
        Cancelling the caller closes the command's channel, which tells the command to stop.
        """
        return await self._bridged(self._run_here(address, port, host_public_key, command, stdin))

    async def stream(
        self,
        address: str,
        port: int,
        host_public_key: str,
        command: str,
        stdin: bytes | str | AsyncIterator[bytes] | None = None,
        *,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[str]:
        """Run `command` on the system VM and yield its stdout lines (without the newline) as they come.

        `stdin` is sent whole (bytes or text), or chunk by chunk with flow control (an async
        iterator of bytes, advanced on the caller's loop), then end of file. When the command
        exits non-zero, CommandFailed (a TransportError carrying the exit status and the tail of
        stderr) is raised after the last line. With `idle_timeout`, TransportTimeout is raised
        when no line comes for that long. No overall timeout: a download may take hours. Closing
        the iterator early (`break` inside `async with contextlib.aclosing(...)`, or cancelling
        the consuming task) closes the SSH channel at once, which is how a remote command is
        told to stop. Raises HostKeyMismatch, TransportError or TransportTimeout like `run`.
        """
        if stdin is not None and not isinstance(stdin, bytes | str):
            stdin = self._thread.pull(stdin, asyncio.get_running_loop())
        lines = self._stream_here(
            address, port, host_public_key, command, stdin, idle_timeout=idle_timeout
        )
        try:
            async for line in self._thread.iterate(lines):
                yield line
        except LoopThreadStopped as exc:
            raise TransportError(_CLOSED) from exc

    async def close(self) -> None:
        """Close every connection this transport holds (and its thread; a later call starts it again)."""
        if self._thread.running_loop is not None:
            await self._bridged(self._close_here())
            await self._thread.stop()

    def drop(self, address: str, port: int, host_public_key: str) -> None:
        """Close the cached connection to that VM, so the next command dials a new one (as a
        commit-confirm must: it proves the control path still works after an apply)."""
        if self._thread.running_loop is not None:  # done before any command submitted after it
            self._thread.call_soon(self._drop_here, address, port, host_public_key)

    async def _bridged(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the transport's thread."""
        try:
            return await self._thread.call(coro)
        except LoopThreadStopped as exc:
            raise TransportError(_CLOSED) from exc

    # -- on the transport's thread -------------------------------------------------------------

    async def _run_here(
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

    async def _stream_here(
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

    async def _close_here(self) -> None:
        slots, self._slots = self._slots, {}
        conns = [s.connection.conn for s in slots.values() if s.connection is not None]
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.wait_closed()

    def _drop_here(self, address: str, port: int, host_public_key: str) -> None:
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

"""The engine's SSH client to system VMs: strict host keys, one reused connection per VM.

The connections themselves live in a worker process (`ssh_worker`), so the CPU that SSH takes
(key exchanges, encryption) never holds the interpreter lock the engine's event loop needs.
`SystemVMTransport` is its engine side: it starts the worker on first use, sends it requests
and hands back results, lines and errors as if the work were done here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh

from backend.errors import (
    ConfigError,
    HostKeyMismatch,
    InvalidInput,
    TransportError,
    TransportTimeout,
)
from backend.helper_processes import helper_env
from backend.transport import frames
from backend.transport.results import CommandFailed, CommandResult
from backend.turns import take_turn

__all__ = [
    "CommandFailed",
    "CommandResult",
    "SystemVMTransport",
    "generate_keypair",
    "load_client_key",
    "new_host_key",
]

log = logging.getLogger(__name__)

KEY_ALGORITHM = "ssh-ed25519"
_CLOSED = "the SSH transport was closed while the command ran"
WORKER_MODULE = "backend.transport.ssh_worker"
START_TIMEOUT = 30.0
"""How long the worker process may take to start (it imports asyncssh and cryptography)."""
CANCEL_TIMEOUT = 10.0
"""How long a cancelled request waits for the worker to say it stopped."""
_FINAL = frozenset({"result", "end", "error", "cancelled"})
_ERRORS: dict[str, type[TransportError] | type[HostKeyMismatch]] = {
    "TransportError": TransportError,
    "TransportTimeout": TransportTimeout,
    "HostKeyMismatch": HostKeyMismatch,
}


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


class _Call:
    """One request in flight: the worker's frames for it, in order."""

    def __init__(self, call_id: int) -> None:
        self.id = call_id
        self.frames: asyncio.Queue[tuple[dict[str, Any], bytes]] = asyncio.Queue()
        self.ended = asyncio.Event()  # its last frame came (or the worker is gone)
        self.on_more: Callable[[], None] | None = None

    async def next(self) -> tuple[dict[str, Any], bytes]:
        return await self.frames.get()

    def put(self, header: dict[str, Any], payload: bytes) -> None:
        self.frames.put_nowait((header, payload))
        if header["op"] in _FINAL:
            self.ended.set()


class _Worker:
    """The running worker process, the socket to it and the requests in flight."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.loop = loop
        self.process = process
        self._reader = reader
        self._writer = writer
        self.calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self.gone: str | None = None  # why it can take no more requests
        self._tasks = [
            loop.create_task(self._read(), name="ssh-worker-reader"),
            loop.create_task(self._log_stderr(), name="ssh-worker-stderr"),
        ]

    @classmethod
    async def start(cls, init: dict[str, Any], key: bytes) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                WORKER_MODULE,
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=helper_env(),
                cwd="/",
            )
        except OSError as exc:
            ours.close()
            raise TransportError(f"cannot start the SSH worker process: {exc}") from exc
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 20)
        writer.write(frames.encode(init, key))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                first = await frames.read(reader)
        except (TimeoutError, frames.FrameError, ConnectionError):
            first = None
        if first is None or first[0]["op"] != "ready":
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            why = b""
            if process.stderr is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        why = await process.stderr.read()
            writer.close()
            await process.wait()
            last = why.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise TransportError(f"the SSH worker process did not start: {last[0]}")
        return cls(asyncio.get_running_loop(), process, reader, writer)

    def open(self) -> _Call:
        call = _Call(next(self._ids))
        self.calls[call.id] = call
        return call

    def send_nowait(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self.gone is None and not self._writer.is_closing():
            self._writer.write(frames.encode(header, payload))

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Send a frame, waiting while the socket's buffer is full (stdin of an upload)."""
        self.send_nowait(header, payload)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def _read(self) -> None:
        why = "the SSH worker process exited"
        try:
            while (frame := await frames.read(self._reader)) is not None:
                header, payload = frame
                if header["op"] == "log":
                    logging.getLogger(str(header.get("name", WORKER_MODULE))).log(
                        int(header.get("level", logging.INFO)), "%s", header.get("message")
                    )
                    continue
                call = self.calls.get(header.get("id", 0))
                if call is None:
                    continue
                if header["op"] == "more":
                    if call.on_more is not None:
                        call.on_more()
                    continue
                call.put(header, payload)
        except (frames.FrameError, ConnectionError) as exc:
            why = f"the SSH worker process broke the protocol: {exc}"
        finally:
            self.gone = self.gone or why
            for call in self.calls.values():
                if not call.ended.is_set():
                    call.put({"op": "gone", "id": call.id, "message": self.gone}, b"")
                    call.ended.set()

    async def _log_stderr(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            log.warning("SSH worker: %s", line.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        """Ask the worker to close its connections and exit; kill it if it does not."""
        self.send_nowait({"op": "close"})
        self.gone = self.gone or _CLOSED
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        self._writer.close()
        for task in self._tasks:
            with contextlib.suppress(Exception):
                await task

    def abandon(self) -> None:
        """Kill it without waiting (its loop is another, perhaps closed, one)."""
        self.gone = self.gone or _CLOSED
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


def _raise_error(header: dict[str, Any]) -> None:
    """Raise the error a worker's final frame says (it was not a result)."""
    op, message = header["op"], str(header.get("message", ""))
    if op == "cancelled":
        raise TransportError(_CLOSED)
    if op == "gone":
        raise TransportError(_CLOSED if message == _CLOSED else f"{_CLOSED} ({message})")
    kind = header.get("kind")
    if kind == "CommandFailed":
        raise CommandFailed(message, int(header["exit_status"]), str(header.get("tail", "")))
    if kind == "InvalidInput":
        raise InvalidInput(str(header["field"]), str(header["reason"]))
    raise _ERRORS.get(str(kind), TransportError)(message)


async def _wait_ended(call: _Call) -> None:
    """Wait (even through cancellations) until the worker ended `call`, at most CANCEL_TIMEOUT."""
    loop = asyncio.get_running_loop()
    until = loop.time() + CANCEL_TIMEOUT
    while not call.ended.is_set() and loop.time() < until:
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.shield(asyncio.wait_for(call.ended.wait(), until - loop.time()))


class SystemVMTransport:
    """Runs fixed engine commands on system VMs over SSH as root, trusting only each VM's provisioned host key.

    One connection per (address, port, host key) is kept and reused; at most `max_channels`
    commands run on it at once (OpenSSH's sshd allows 10 sessions per connection by default).
    The connections live in the transport's worker process (`ssh_worker`), started on first
    use and again after `close()` or if it died; hundreds of handshakes at once take none of
    the caller's CPU or interpreter lock.
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
        self._key = client_key.export_private_key("openssh")
        self._init = {
            "op": "init",
            "connect_timeout": connect_timeout,
            "command_timeout": command_timeout,
            "max_channels": max_channels,
            "log_level": logging.getLogger("backend").getEffectiveLevel(),
        }
        self._worker: _Worker | None = None
        self._starting: asyncio.Future[_Worker] | None = None

    @property
    def worker_pid(self) -> int | None:
        """The worker process's pid while it runs."""
        worker = self._worker
        return worker.process.pid if worker is not None and worker.gone is None else None

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
        data = stdin.encode() if isinstance(stdin, str) else stdin
        async with self._request() as (worker, call):
            await worker.send(
                {
                    "op": "run",
                    "id": call.id,
                    "address": address,
                    "port": port,
                    "host_key": host_public_key,
                    "command": command,
                    "stdin": data is not None,
                },
                data or b"",
            )
            header, payload = await call.next()
        await take_turn()
        if header["op"] != "result":
            _raise_error(header)
        out = int(header["out"])
        return CommandResult(
            exit_status=int(header["exit_status"]),
            stdout=payload[:out].decode(errors="replace"),
            stderr=payload[out:].decode(errors="replace"),
        )

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
        source = None if stdin is None or isinstance(stdin, bytes | str) else stdin
        data = (
            stdin.encode()
            if isinstance(stdin, str)
            else stdin
            if isinstance(stdin, bytes)
            else None
        )
        stdin_failed: list[BaseException] = []
        pulling: list[asyncio.Task[None]] = []  # the chunk being pulled (one at a time)
        async with self._request() as (worker, call):
            if source is not None:
                chunks = source

                def pull_next() -> None:  # the worker asked for the next chunk
                    pull = _pull_one(worker, call.id, chunks, stdin_failed)
                    pulling[:] = [asyncio.ensure_future(pull)]

                call.on_more = pull_next
            mode = "iterator" if source is not None else "bytes" if data is not None else None
            try:
                await worker.send(
                    {
                        "op": "stream",
                        "id": call.id,
                        "address": address,
                        "port": port,
                        "host_key": host_public_key,
                        "command": command,
                        "stdin": mode,
                        "idle_timeout": idle_timeout,
                    },
                    data or b"",
                )
                while True:
                    header, _ = await call.next()
                    if header["op"] != "lines":
                        break
                    for line in header["lines"]:
                        yield line
                    worker.send_nowait({"op": "credit", "id": call.id, "n": len(header["lines"])})
            finally:
                for task in pulling:
                    task.cancel()
        if stdin_failed:
            raise stdin_failed[0]
        if header["op"] != "end":
            _raise_error(header)

    async def start(self) -> None:
        """Start the worker now, not on the first command (it takes ~0.3 s: asyncssh's import)."""
        await self._ready()

    async def close(self) -> None:
        """Close every connection this transport holds and end its worker (a later call starts
        a new one)."""
        loop = asyncio.get_running_loop()
        workers: list[_Worker] = []
        starting, self._starting = self._starting, None
        if starting is not None and starting.get_loop() is loop:
            with contextlib.suppress(TransportError):
                workers.append(await asyncio.shield(starting))
        worker, self._worker = self._worker, None
        if worker is not None and worker not in workers:
            workers.append(worker)
        for each in workers:
            if each.loop is loop:
                await each.stop()
            else:
                each.abandon()

    def drop(self, address: str, port: int, host_public_key: str) -> None:
        """Close the cached connection to that VM, so the next command dials a new one (as a
        commit-confirm must: it proves the control path still works after an apply). Done
        before any command submitted after it."""
        worker = self._worker
        if worker is not None:
            worker.send_nowait(
                {"op": "drop", "address": address, "port": port, "host_key": host_public_key}
            )

    @contextlib.asynccontextmanager
    async def _request(self) -> AsyncIterator[tuple[_Worker, _Call]]:
        """A new request to the worker. Left early (the caller was cancelled, or a stream was
        closed), the request is cancelled there and waited for: its channel is closed and its
        slot free before the caller goes on, as if the work had been done on its own loop."""
        worker = await self._ready()
        call = worker.open()
        try:
            yield worker, call
        except BaseException:
            if not call.ended.is_set():
                worker.send_nowait({"op": "cancel", "id": call.id})
                await _wait_ended(call)
            raise
        finally:
            worker.calls.pop(call.id, None)

    async def _ready(self) -> _Worker:
        """The running worker, started (once, however many callers wait) if there is none."""
        loop = asyncio.get_running_loop()
        worker = self._worker
        if worker is not None and worker.gone is None and worker.loop is loop:
            return worker
        if worker is not None:
            self._worker = None
            if worker.loop is not loop:
                worker.abandon()
            else:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
        starting = self._starting
        if starting is None or starting.get_loop() is not loop or starting.done():
            starting = self._starting = asyncio.ensure_future(_Worker.start(self._init, self._key))
        try:
            worker = await asyncio.shield(starting)
        finally:
            if self._starting is starting and starting.done():
                self._starting = None
        self._worker = worker
        return worker


async def _pull_one(
    worker: _Worker, call_id: int, source: AsyncIterator[bytes], failed: list[BaseException]
) -> None:
    """The worker asked for the next chunk of a stream's stdin: send it, or its end or failure."""
    try:
        chunk = await source.__anext__()
    except StopAsyncIteration:
        worker.send_nowait({"op": "stdin", "id": call_id, "end": True})
        return
    except Exception as exc:  # noqa: BLE001 - raised to the stream's caller, not here
        failed.append(exc)
        worker.send_nowait({"op": "stdin", "id": call_id, "error": True})
        return
    await worker.send({"op": "stdin", "id": call_id}, chunk)

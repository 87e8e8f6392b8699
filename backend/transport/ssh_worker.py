"""The engine's SSH worker: a process of its own holding every SSH connection to system VMs.

Key exchanges, packet encryption and asyncssh's protocol work take CPU in bursts; in a thread of
the engine they held the interpreter lock the engine's event loop needs, and a busy apply of 100
routers stalled the loop by tens of milliseconds. In this process they take none of it.

Started by `SystemVMTransport` as `python -m backend.transport.ssh_worker FD`: FD is its end of
a socket pair, over which frames (`frames`) come and go. The first frame is "init" (the engine's
private key as payload, the timeouts); then requests, each with an id the engine chose:
- "run": run a command, stdin as payload; answered by one "result" (exit status, stdout and
  stderr lengths, both as payload) or "error".
- "stream": run a command and send its stdout lines one "lines" frame at a time, at most WINDOW
  not yet acknowledged ("credit"); stdin is the payload, or pulled chunk by chunk with "more"
  (answered by "stdin" frames) when it is an iterator on the engine's side. Ends with "end" or
  "error".
- "cancel": stop that request (its channel is closed, which tells the command to stop); it ends
  with "cancelled" unless it had already ended.
- "drop": close the cached connection to one system VM. "close": close every connection, exit.
The worker also exits when the engine's end of the socket closes (the engine died), so it never
outlives it. Its log records go to the engine as "log" frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncssh

from backend.errors import InvalidInput, SysvmError
from backend.helper_processes import lower_priority
from backend.transport import frames
from backend.transport.results import CommandFailed
from backend.transport.ssh_connections import SSHConnections

WINDOW = 64
"""How many stdout lines of a stream may be sent ahead of the engine's acknowledgement."""


class StdinFailed(Exception):
    """The engine's stdin iterator raised; the engine raises that error itself."""


def error_header(call_id: int, exc: BaseException) -> dict[str, Any]:
    """An "error" frame for `exc`: its class name (one the engine knows) and what it carries."""
    header: dict[str, Any] = {"op": "error", "id": call_id, "message": str(exc)}
    if isinstance(exc, CommandFailed):
        header.update(kind="CommandFailed", exit_status=exc.exit_status, tail=exc.stderr_tail)
    elif isinstance(exc, InvalidInput):
        header.update(kind="InvalidInput", field=exc.field, reason=exc.reason)
    elif isinstance(exc, StdinFailed):
        header.update(kind="StdinFailed")
    elif isinstance(exc, SysvmError):
        header.update(kind=type(exc).__name__)
    else:
        header.update(kind="TransportError", message=f"SSH worker: {type(exc).__name__}: {exc}")
    return header


class _Stdin:
    """A stream's stdin pulled from the engine chunk by chunk."""

    def __init__(self, worker: Worker, call_id: int) -> None:
        self._worker = worker
        self._id = call_id
        self._chunks: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def feed(self, header: dict[str, Any], payload: bytes) -> None:
        kind = "error" if header.get("error") else "end" if header.get("end") else "chunk"
        self._chunks.put_nowait((kind, payload if kind == "chunk" else b""))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        self._worker.send({"op": "more", "id": self._id})
        kind, chunk = await self._chunks.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "error":
            raise StdinFailed("the engine's stdin failed")
        return chunk


class Worker:
    """The engine's requests in flight in this process, and the frames that answer them."""

    def __init__(self, writer: asyncio.StreamWriter, connections: SSHConnections) -> None:
        self._writer = writer
        self._connections = connections
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._credit: dict[int, asyncio.Semaphore] = {}
        self._stdin: dict[int, _Stdin] = {}

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if not self._writer.is_closing():
            self._writer.write(frames.encode(header, payload))

    def handle(self, header: dict[str, Any], payload: bytes) -> bool:
        """Act on one frame from the engine; False when the worker should exit."""
        op, call_id = header["op"], int(header.get("id", 0))
        if op in ("run", "stream"):
            work = self._run(header, payload) if op == "run" else self._stream(header, payload)
            started = self._tasks[call_id] = asyncio.create_task(work)
            started.add_done_callback(lambda done: self._finished(call_id, done))
        elif op == "cancel":
            if (running := self._tasks.get(call_id)) is not None:
                running.cancel()
        elif op == "credit":
            if (window := self._credit.get(call_id)) is not None:
                for _ in range(int(header.get("n", 1))):
                    window.release()
        elif op == "stdin":
            if (stdin := self._stdin.get(call_id)) is not None:
                stdin.feed(header, payload)
        elif op == "drop":
            self._connections.drop(header["address"], int(header["port"]), header["host_key"])
        elif op == "close":
            return False
        return True

    def _finished(self, call_id: int, task: asyncio.Task[None]) -> None:
        """A request ended: its answer was sent, or now its cancellation or error is. (A done
        callback, so a request cancelled before it ever ran is answered too.)"""
        self._tasks.pop(call_id, None)
        self._credit.pop(call_id, None)
        self._stdin.pop(call_id, None)
        if task.cancelled():
            self.send({"op": "cancelled", "id": call_id})
        elif (exc := task.exception()) is not None:
            self.send(error_header(call_id, exc))

    async def _run(self, header: dict[str, Any], payload: bytes) -> None:
        result = await self._connections.run(
            header["address"],
            int(header["port"]),
            header["host_key"],
            header["command"],
            payload if header.get("stdin") else None,
        )
        out, err = result.stdout.encode(), result.stderr.encode()
        self.send(
            {
                "op": "result",
                "id": header["id"],
                "exit_status": result.exit_status,
                "out": len(out),
            },
            out + err,
        )

    async def _stream(self, header: dict[str, Any], payload: bytes) -> None:
        call_id = header["id"]
        stdin: bytes | _Stdin | None = None
        if header.get("stdin") == "bytes":
            stdin = payload
        elif header.get("stdin") == "iterator":
            stdin = self._stdin[call_id] = _Stdin(self, call_id)
        window = self._credit[call_id] = asyncio.Semaphore(WINDOW)
        lines = self._connections.stream(
            header["address"],
            int(header["port"]),
            header["host_key"],
            header["command"],
            stdin,
            idle_timeout=header.get("idle_timeout"),
        )
        async with contextlib.aclosing(lines):  # type: ignore[type-var]
            async for line in lines:
                await window.acquire()
                self.send({"op": "lines", "id": call_id, "lines": [line]})
        self.send({"op": "end", "id": call_id})

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self._connections.close()


class _ToEngine(logging.Handler):
    """Log records of the worker, sent to the engine to be logged there."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self._worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            self._worker.send(
                {"op": "log", "level": record.levelno, "name": record.name, "message": message}
            )


async def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    first = await frames.read(reader)
    if first is None or first[0]["op"] != "init":
        return
    init, key = first
    connections = SSHConnections(
        asyncssh.import_private_key(key),
        connect_timeout=float(init["connect_timeout"]),
        command_timeout=float(init["command_timeout"]),
        max_channels=int(init["max_channels"]),
    )
    worker = Worker(writer, connections)
    root = logging.getLogger()
    root.handlers[:] = [_ToEngine(worker)]
    root.setLevel(int(init.get("log_level", logging.INFO)))
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    worker.send({"op": "ready"})
    try:
        while (frame := await frames.read(reader)) is not None and worker.handle(*frame):
            pass
    except (frames.FrameError, ConnectionError):
        pass
    finally:
        await worker.stop()
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].isdigit():
        sys.exit("usage: python -m backend.transport.ssh_worker FD (started by the engine)")
    lower_priority()
    asyncio.run(serve(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])

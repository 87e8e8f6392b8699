"""The database's worker process: where commands, the units of work that need nothing of the
engine's memory, run.

A unit of work run in one of the engine's own threads holds the GIL while SQLAlchemy's Python
code runs, and the event loop then waits for it: with a hundred router applies at once, the
loop went to sleep on the GIL dozens of times in one iteration and stalled 20-80 ms
(`bench/bench_router_concurrent.py --trace-stalls`). In a process of its own that code takes
nothing from the loop; the loop only pickles the command and unpickles its answer.

A command is a module-level function `f(session, **arguments)` marked `@command`: it reads
and writes only through the session and its arguments, which must pickle, as must its result
(plain values, dataclasses, or ORM objects loaded with what the caller needs: they arrive
detached). `Database.run_read(functools.partial(f, ...))` sends it here; a unit that is not a
command (a closure) runs in the engine's threads as before.

Each worker is forked by a server process (one per engine process, started with the first
worker) that imported SQLAlchemy and the modules defining commands once: an engine starts its
worker in milliseconds, not the ~0.8 s of CPU those imports take (a test run starts hundreds
of engines). The server has no thread, so forking it is safe. A worker reads commands from its
socket, runs reads in one thread and writes (each its own transaction, committed at the end)
in another, and answers each with its result or its exception. It ends when the engine closes
the socket, after the commands it has already received; the server ends when the engine's
process does (its socket closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from backend.errors import SysvmError
from backend.helper_processes import helper_env, lower_priority

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

READ, WRITE = 0, 1
_HEAD = struct.Struct("!QBI")
"""A frame: the call's number, its kind (READ/WRITE; in an answer 1 for a result, 0 for an
exception) and the length of the pickle that follows."""

UNPICKLE_INLINE = 256 * 1024
"""An answer longer than this (the rules of a large network) is unpickled in a thread."""

PRELOAD = [
    "backend.db.models",
    "backend.engine.jobs",
    "backend.engine.events",
    "backend.services.routers",
    "backend.services.status",
    "backend.orchestration.reconciler",
    "backend.orchestration.host_monitor",
]
"""What the server process that forks the workers imports once: the models and the modules
that define commands."""

ONE_CPU = "not started: the engine may use one CPU only"
"""Why an engine kept to one CPU runs its commands in its threads: a worker process would take
that CPU from the loop (`bench/bench_router_concurrent.py --engine-apart`, 100 routers: the
loop's longest stall 28-35 ms with the worker against 11-17 ms without, 6 runs each)."""

START_TIMEOUT = 60.0
"""Seconds the fork server may take to import PRELOAD (~1 s here)."""
STOP_TIMEOUT = 30.0
"""Seconds a closed worker may take to finish what it received before it is killed."""


def command(fn: F) -> F:
    """Mark `fn(session, **arguments)` as a command: it uses only the session and its
    arguments (no state of the engine's process), so it may run in the worker process."""
    fn.sysvm_database_command = True  # type: ignore[attr-defined]
    return fn


def is_command(work: object) -> bool:
    """Whether `work` is a command, or a partial of one."""
    fn = work.func if isinstance(work, functools.partial) else work
    return getattr(fn, "sysvm_database_command", False) is True


class WorkerGone(SysvmError):
    """The database's worker process ended while a command was in it: the command's outcome
    is unknown (a write may or may not have been committed)."""


class DatabaseWorker:
    """The engine's end: starts the worker, sends it commands and hands back their answers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._answers: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[tuple[bool, bytes]]] = {}
        self._next = 0
        self.gone: str | None = None

    async def start(self) -> None:
        """Start the worker, unless the engine may use one CPU only; if it cannot start, say
        why (`gone`): commands then run in the engine's threads."""
        if len(os.sched_getaffinity(0)) < 2:
            self.gone = ONE_CPU
            return
        try:
            await self._start()
        except Exception as exc:
            log.warning("no database worker process (%s); commands run in the engine", exc)
            self.gone = f"it could not start: {exc}"

    async def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            # The first start also starts the fork server (it imports PRELOAD): not on the loop.
            self.pid = await asyncio.to_thread(_fork_worker, str(self.path), theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=ours)
        self._answers = asyncio.create_task(self._read_answers(reader), name="db-worker-answers")

    @property
    def running(self) -> bool:
        return self._writer is not None and self.gone is None

    async def call(self, kind: int, unit: Callable[..., T]) -> T:
        """Run `unit` (a command) in the worker; its result, or its exception raised here."""
        if not self.running:
            raise WorkerGone(f"the database's worker process is not running ({self.gone})")
        assert self._writer is not None
        payload = pickle.dumps(unit, protocol=5)
        self._next += 1
        number = self._next
        answer = self._waiting[number] = asyncio.get_running_loop().create_future()
        self._writer.write(_HEAD.pack(number, kind, len(payload)) + payload)
        try:
            ok, data = await answer
        finally:
            self._waiting.pop(number, None)
        if len(data) > UNPICKLE_INLINE:
            value = await asyncio.to_thread(pickle.loads, data)
        else:
            value = pickle.loads(data)
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                head = await reader.readexactly(_HEAD.size)
                number, ok, length = _HEAD.unpack(head)
                data = await reader.readexactly(length)
                answer = self._waiting.get(number)
                if answer is not None and not answer.done():
                    answer.set_result((bool(ok), data))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self._writer is None:
                self.gone = "the database was closed"
            else:
                self.gone = "it ended (its socket closed)"
                log.error(
                    "the database's worker process %s ended; commands now run in the engine's "
                    "threads",
                    self.pid,
                )
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(
                        WorkerGone(
                            f"the database's worker process ended ({self.gone}) while a "
                            "command was in it; whether that command took effect is unknown"
                        )
                    )

    async def stop(self) -> None:
        """Send no more: the worker finishes what it received (its answers still arrive) and
        exits, which closes its end; one that has not within STOP_TIMEOUT is killed."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        with contextlib.suppress(OSError):
            writer.write_eof()
        if self._answers is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._answers), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("the database's worker process %s did not exit; killing it", self.pid)
                if self.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                self._answers.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._answers
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


_server_lock = threading.Lock()
_server: tuple[subprocess.Popen[bytes], socket.socket] | None = None


def _fork_worker(path: str, sock: socket.socket) -> int:
    """Have the fork server (started on first use) fork a worker for the database at `path`
    that serves `sock`; the worker's pid. Blocking: run in a thread."""
    global _server
    with _server_lock:
        if _server is None or _server[0].poll() is not None:
            _server = _start_server()
        process, control = _server
        try:
            socket.send_fds(control, [path.encode()], [sock.fileno()])
            answer = _receive(control, 4)
        except OSError as exc:
            process.kill()
            _server = None
            raise SysvmError(f"the database's fork server failed: {exc}") from exc
        return int(struct.unpack("!i", answer)[0])


def _start_server() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, "--fork-server", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=helper_env(),
            cwd="/",
            start_new_session=True,  # a ^C in the operator's terminal is the engine's to handle
        )
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.settimeout(START_TIMEOUT)
    try:
        if _receive(ours, 1) != b"r":
            raise OSError("it did not say it was ready")
    except OSError as exc:
        process.kill()
        process.wait()
        ours.close()
        raise SysvmError(f"the database's fork server did not start: {exc}") from exc
    return process, ours


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise OSError("the fork server closed its socket")
        data += more
    return data


def _fork_server(control: socket.socket) -> None:
    """The fork server: import PRELOAD, then fork a worker for each database asked for, until
    the engine's process closes the socket. Single-threaded, so a fork copies no lock held."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    lower_priority()  # the workers too: the engine's loop gets a CPU first
    for name in PRELOAD:
        importlib.import_module(name)
    control.sendall(b"r")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 4096, 1)
        except OSError:
            return
        if not message or not fds:
            return
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            control.close()
            code = 1
            try:
                serve(socket.socket(fileno=fds[0]), message.decode())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(fds[0])
        control.sendall(struct.pack("!i", pid))


def serve(sock: socket.socket, path: str) -> None:
    """The worker process: run the commands read from `sock` until it closes."""
    from backend.db.database import run_unit, sync_sessions

    engine, sessions = sync_sessions(Path(path))
    sending = threading.Lock()

    def answer(number: int, ok: bool, data: bytes) -> None:
        with sending, contextlib.suppress(OSError):
            sock.sendall(_HEAD.pack(number, ok, len(data)) + data)

    def run(inbox: queue.SimpleQueue[tuple[int, bytes] | None], write: bool) -> None:
        while (item := inbox.get()) is not None:
            number, payload = item
            try:
                result = run_unit(sessions, pickle.loads(payload), write=write)
                answer(number, True, pickle.dumps(result, protocol=5))
            except Exception as exc:  # handed to the caller, raised there
                answer(number, False, _pickled(exc))

    inboxes: list[queue.SimpleQueue[tuple[int, bytes] | None]] = [
        queue.SimpleQueue(),
        queue.SimpleQueue(),
    ]
    threads = [
        threading.Thread(target=run, args=(inboxes[kind], kind == WRITE), name=name)
        for kind, name in ((READ, "db-read"), (WRITE, "db-write"))
    ]
    for thread in threads:
        thread.start()
    stream = sock.makefile("rb")
    try:
        while len(head := stream.read(_HEAD.size)) == _HEAD.size:
            number, kind, length = _HEAD.unpack(head)
            payload = stream.read(length)
            if len(payload) != length:
                break
            inboxes[WRITE if kind == WRITE else READ].put((number, payload))
    finally:
        for inbox in inboxes:
            inbox.put(None)
        for thread in threads:
            thread.join()
        engine.dispose()
        sock.close()


def _pickled(exc: Exception) -> bytes:
    """`exc` pickled so that it unpickles (not every exception does: one whose constructor
    takes other arguments than it stores), else a SysvmError that says what it was."""
    try:
        data = pickle.dumps(exc, protocol=5)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(SysvmError(f"{type(exc).__name__}: {exc}"), protocol=5)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--fork-server" or not sys.argv[2].isdigit():
        sys.exit("usage: python -m backend.db.worker --fork-server FD (started by the engine)")
    _fork_server(socket.socket(fileno=int(sys.argv[2])))

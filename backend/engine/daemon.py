"""One engine process per SYSVM_HOME, on a unix socket; clients start it on demand, like tmux.

Files under the home: `engine.sock` (the API), `engine.lock` (held by the running engine, so a
second one refuses to start and a socket left by a crash is known to be stale), `engine.pid`,
`engine.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import IO

from websockets.asyncio.server import unix_serve

from backend.api.connect import pid_of, socket_path
from backend.api.server import ApiServer
from backend.config import Config
from backend.engine.core import Engine
from backend.errors import EngineAlreadyRunning, SysvmError
from backend.log_file import log_to_file

log = logging.getLogger(__name__)

SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class EngineLock:
    """The engine's exclusive lock on its home (released by the kernel when the process dies)."""

    def __init__(self, home: Path) -> None:
        self.path = home / "engine.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        f = open(self.path, "a+")  # noqa: SIM115 - held for the life of the engine
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            pid = pid_of(self.path.parent)
            raise EngineAlreadyRunning(
                f"an engine already runs for {self.path.parent}"
                + (f" (pid {pid})" if pid else "")
                + "; use it, or stop it with `sysvm engine stop`"
            ) from None
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def setup_logging(home: Path, level: str) -> None:
    """Engine logs go to `engine.log` under the home, never to a terminal."""
    log_to_file(home / "engine.log", level)


async def serve(config: Config) -> None:
    """Run the engine until `shutdown` or SIGTERM/SIGINT; clean up socket and pid file."""
    home = config.home
    sock = socket_path(home)
    if len(str(sock)) > SOCKET_PATH_MAX:
        raise SysvmError(
            f"socket path {sock} is longer than {SOCKET_PATH_MAX} bytes (a unix socket limit); "
            "use a shorter SYSVM_HOME"
        )
    lock = EngineLock(home)
    lock.acquire()
    try:
        if sock.exists() or sock.is_symlink():
            log.info("removing stale socket %s left by an engine that is gone", sock)
            sock.unlink()
        (home / "engine.pid").write_text(f"{os.getpid()}\n")
        engine = Engine(config)
        await engine.start()
        api = ApiServer(engine, read_only=engine.read_only)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, engine.shutdown_requested.set)
        old_umask = os.umask(0o177)  # the socket is the engine's front door: owner only
        try:
            server = await unix_serve(api.handle, str(sock), max_size=64 * 2**20)
        finally:
            os.umask(old_umask)
        log.info("engine serving on %s (pid %d)", sock, os.getpid())
        try:
            await engine.shutdown_requested.wait()
        finally:
            server.close()
            await server.wait_closed()
            await engine.stop()
    finally:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        with contextlib.suppress(FileNotFoundError):
            (home / "engine.pid").unlink()
        lock.release()

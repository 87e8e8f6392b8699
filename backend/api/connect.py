"""Finding this home's engine, starting it on demand (like tmux's server), and stopping it.

Client side only: importing this never loads the engine, the database or libvirt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from backend.api.client import RemoteEngine
from backend.config import Config
from backend.errors import EngineUnavailable, SysvmError

# Exit status of `sysvm engine serve` when another engine already holds the home.
EXIT_ALREADY_RUNNING = 3


def socket_path(home: Path) -> Path:
    return home / "engine.sock"


def pid_of(home: Path) -> int | None:
    try:
        return int((home / "engine.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """True while `pid` runs; an exited process waiting to be reaped (a zombie) counts as gone."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _log_tail(home: Path, lines: int = 5) -> str:
    try:
        text = (home / "engine.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def spawn_engine(home: Path) -> subprocess.Popen[bytes]:
    """Start `sysvm engine serve` detached from this terminal, logging to engine.log."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = dict(os.environ, SYSVM_HOME=str(home))
    with open(home / "engine.log", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "engine", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )


async def connect(config: Config, *, autostart: bool = True) -> RemoteEngine:
    """Connect to this home's engine, starting one in the background when none answers."""
    sock = socket_path(config.home)
    timeout = float(config["engine.connect_timeout"])
    try:
        return await RemoteEngine.connect_unix(sock, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        if not autostart:
            raise EngineUnavailable(
                f"no engine answers on {sock} ({exc.__class__.__name__}); start one with "
                "`sysvm engine serve` or run any command without --no-start"
            ) from exc
    proc = spawn_engine(config.home)
    deadline = time.monotonic() + float(config["engine.start_timeout"])
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        code = proc.poll()
        if code is not None and code != EXIT_ALREADY_RUNNING:
            raise EngineUnavailable(
                f"the engine exited with status {code} while starting: {_log_tail(config.home)}"
            )
        with contextlib.suppress(OSError, TimeoutError):
            return await RemoteEngine.connect_unix(sock, timeout=timeout)
    raise EngineUnavailable(
        f"the engine did not answer on {sock} within {config['engine.start_timeout']} s "
        f"(see {config.home / 'engine.log'}): {_log_tail(config.home)}"
    )


async def stop(config: Config, *, timeout: float = 20.0) -> int | None:
    """Ask the running engine to stop and wait until its process is gone; None if none ran."""
    sock = socket_path(config.home)
    pid = pid_of(config.home)
    try:
        client = await RemoteEngine.connect_unix(
            sock, timeout=float(config["engine.connect_timeout"])
        )
    except (OSError, TimeoutError):
        return None
    info = await client.engine_info()
    pid = int(info["pid"])
    await client.shutdown()
    await client.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return pid
        await asyncio.sleep(0.05)
    raise SysvmError(f"engine pid {pid} did not stop within {timeout} s; see engine.log")

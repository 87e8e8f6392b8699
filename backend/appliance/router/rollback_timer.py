"""The commit-confirmed rollback timer: a detached process, armed before new rules go live.

`TimerLaunch` starts `python -S .../rollback_timer_process.py` in a new session, early
(its interpreter starts while the bundle is parsed and rendered); the process forks once more (so
it is nobody's child and never a zombie), reports its pid, and waits for one line on stdin.
`activate` sends the version and deadline and closes the pipe: from then on the timer holds no
stdio of the command that armed it and nothing ties it to the SSH session. It sleeps until the
deadline, takes the router's lock and, unless the window was confirmed (a confirm marker for
its version) or superseded (another token in pending.json), rolls back to the last confirmed
snapshot. `cancel` (end of file instead of a line) makes it exit. The session, or the whole
appliance command host, may die after activation and the rollback still happens, which
Debian's `iptables-apply` does not do. The process imports next to nothing until its deadline
passes, so it starts fast (see `rollback_timer_process`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from backend.appliance.router.site import RouterSite
from backend.appliance.router.state_dir import PendingConfirm, RouterStateDir

PROCESS_FILE = str(Path(__file__).with_name("rollback_timer_process.py"))
START_TIMEOUT = 10.0
# The directory holding the `backend` package, for the timer's interpreter to import it from.
_IMPORT_ROOT = str(Path(__file__).resolve().parents[3])


class TimerNotArmed(Exception):
    """The rollback timer could not be started; nothing was applied."""


class TimerLaunch:
    """A rollback timer started ahead of need: `activate` arms it, `cancel` lets it go."""

    def __init__(self, site: RouterSite, state: RouterStateDir) -> None:
        self.token = secrets.token_hex(12)
        self._log = state.timer_log
        argv = [
            sys.executable,
            "-S",  # no site-packages: the timer needs the standard library and our package only
            PROCESS_FILE,
            *site.argv(),
            "--token",
            self.token,
        ]
        self._pid: int | None = None
        self._eof = False
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_IMPORT_ROOT, env.get("PYTHONPATH")) if p)
        with open(state.timer_log, "ab") as log:
            self._child: subprocess.Popen[bytes] | None = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd="/",
                env=env,
                start_new_session=True,
                close_fds=True,
            )

    def activate(self, *, version: int, timeout: float, rollback_to: int | None) -> PendingConfirm:
        """Arm the timer: the window closes `timeout` seconds from now. Returns the window, for
        the caller to record in pending.json before the new rules go live."""
        child = self._child
        if child is None:
            raise TimerNotArmed("the rollback timer was already used")
        assert child.stdin is not None and child.stdout is not None
        try:
            pid = self._pid if self._pid is not None else self._read_pid(START_TIMEOUT)
            if pid is None:
                raise TimerNotArmed(
                    f"the rollback timer did not start within {START_TIMEOUT:g}s (see {self._log})"
                )
            deadline = time.time() + timeout
            child.stdin.write(f"{version} {deadline!r} {timeout!r}\n".encode())
            child.stdin.flush()
        except OSError as exc:
            raise TimerNotArmed(f"the rollback timer went away: {exc}") from exc
        finally:
            self._release()
        return PendingConfirm(version, self.token, deadline, timeout, pid, rollback_to)

    @property
    def used(self) -> bool:
        """Armed or cancelled: it cannot be armed (again)."""
        return self._child is None

    def healthy(self) -> bool:
        """Whether it can still be armed: its timer is starting, or waiting to be armed. (A
        launch kept for a later apply may have been killed meanwhile.)"""
        if self._child is None:
            return False
        if self._pid is None:
            self._pid = self._read_pid(0.0)
            if self._pid is None:
                return not self._eof  # still starting, or gone before it reported
        return Path(f"/proc/{self._pid}").exists()

    def _read_pid(self, wait: float) -> int | None:
        """The timer's pid once it reported it (None: not within `wait` seconds, or never)."""
        child = self._child
        assert child is not None and child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], wait)
        if not ready:
            return None
        line = child.stdout.readline()
        if not line.strip().isdigit():
            self._eof = True
            return None
        self._pid = int(line)
        return self._pid

    def cancel(self) -> None:
        """Let an unarmed timer exit (end of file on its stdin); nothing if already armed."""
        self._release()

    def _release(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        for pipe in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        try:
            child.wait(START_TIMEOUT)  # the first child exits as soon as it has forked
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def disarm(pending: PendingConfirm) -> None:
    """Stop the window's timer if it still runs (checked by its token, so a reused pid is safe).
    The timer also stands down by itself once the window is confirmed or superseded."""
    try:
        cmdline = Path(f"/proc/{pending.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if pending.token.encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pending.pid, signal.SIGTERM)

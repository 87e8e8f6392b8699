"""The commit-confirmed rollback timer: a detached process, armed before new rules go live.

`arm` starts `python -m backend.appliance.router.rollback_timer` in a new session with its stdio
cut from the command that armed it; it forks once more (so it is nobody's child and never a
zombie), reports its pid, sleeps until the window's deadline, then takes the router's lock and,
unless the window was confirmed (a confirm marker for its version) or superseded (another token
in pending.json), rolls back to the last confirmed snapshot. Nothing ties it to the SSH session
that applied the bundle: the session (or the whole appliance command host) may die and the
rollback still happens, which Debian's `iptables-apply` does not do. Standard library only, so it
starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from backend.appliance.router.rollback import roll_back
from backend.appliance.router.site import RouterSite
from backend.appliance.router.state_dir import PendingConfirm, RouterStateDir

MODULE = "backend.appliance.router.rollback_timer"
START_TIMEOUT = 10.0
# The directory holding the `backend` package, for the timer's interpreter to import it from.
_IMPORT_ROOT = str(Path(__file__).resolve().parents[3])


class TimerNotArmed(Exception):
    """The rollback timer could not be started; nothing was applied."""


def arm(
    site: RouterSite,
    state: RouterStateDir,
    *,
    version: int,
    timeout: float,
    rollback_to: int | None,
) -> PendingConfirm:
    """Start the detached timer for `version` and return the window it guards (not yet recorded:
    the caller writes it to pending.json before the new rules go live)."""
    token = secrets.token_hex(12)
    deadline = time.time() + timeout
    argv = [
        sys.executable,
        "-m",
        MODULE,
        *site.argv(),
        "--version",
        str(version),
        "--token",
        token,
        "--deadline",
        repr(deadline),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    with open(state.timer_log, "ab") as log:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd="/",
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    assert child.stdout is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], START_TIMEOUT)
        line = child.stdout.readline() if ready else b""
    finally:
        child.stdout.close()
        try:
            child.wait(START_TIMEOUT)  # the first child exits as soon as it has forked
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if not line.strip().isdigit():
        raise TimerNotArmed(
            f"the rollback timer did not start within {START_TIMEOUT:g}s (see {state.timer_log})"
        )
    return PendingConfirm(version, token, deadline, timeout, int(line), rollback_to)


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


def _run(site: RouterSite, version: int, token: str, deadline: float) -> None:
    state = RouterStateDir(site.root)
    while (left := deadline - time.time()) > 0:
        time.sleep(left)
    with state.lock():
        pending = state.read_pending()
        if pending is None or pending.token != token or state.is_confirmed(version):
            return
        record = roll_back(
            site,
            state,
            by="timer",
            reason=f"version {version} was not confirmed within {pending.timeout:g}s",
        )
    print(
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')} rolled back from {record.from_version} to "
        f"{record.to_version}: {'ok' if record.ok else record.error}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--root", required=True)
    parser.add_argument("--netns")
    parser.add_argument("--iptables", default="iptables")
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--deadline", type=float, required=True)
    args = parser.parse_args(argv)
    site = RouterSite(Path(args.root), args.netns, args.iptables)
    if os.fork() > 0:
        os._exit(0)  # the launcher reaps this first child at once; the timer lives on, detached
    sys.stdout.write(f"{os.getpid()}\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # drop the pipe to the launcher: the timer holds no stdio of the session
    os.close(devnull)
    _run(site, args.version, args.token, args.deadline)


if __name__ == "__main__":
    main()

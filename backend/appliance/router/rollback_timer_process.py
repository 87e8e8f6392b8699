"""The rollback timer's own process, started by `rollback_timer.TimerLaunch` (see there).

Every windowed apply starts one, and on a router with one vCPU its start competes with the apply
it guards. So it is run as a file (`python -S .../rollback_timer_process.py`: no site-packages,
no runpy) and imports only `os`, `sys` and `time` until its deadline passes: it starts in 10-20
ms, against 80-90 ms when it imported the rollback code up front. A confirmed window
kills it (`rollback_timer.disarm`) before it ever needs more.

Its command line is made by the launcher, never by a person; anything else is refused (exit 2).
"""

from __future__ import annotations

import os
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # run as a file: its directory must not shadow modules by name

USAGE = (
    "usage: rollback_timer_process.py --root DIR [--netns NAME --iptables COMMAND] [--services] "
    "--token TOKEN"
)
_VALUED = ("--root", "--netns", "--iptables", "--token")


def options(argv: list[str]) -> dict[str, str | bool]:
    """The launcher's options as {name: value}, `--services` as True; ValueError if malformed."""
    out: dict[str, str | bool] = {}
    words = iter(argv)
    for word in words:
        if word == "--services":
            out[word] = True
        elif word in _VALUED:
            value = next(words, None)
            if value is None or value.startswith("--"):
                raise ValueError(f"{word} needs a value")
            out[word] = value
        else:
            raise ValueError(f"unknown argument {word!r}")
    for required in ("--root", "--token"):
        if required not in out:
            raise ValueError(f"{required} is required")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        opts = options(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"{USAGE}\n{exc}", file=sys.stderr)
        return 2
    if os.fork() > 0:
        os._exit(0)  # the launcher reaps this first child at once; the timer lives on, detached
    try:
        os.write(1, f"{os.getpid()}\n".encode())
    except OSError:
        return 0  # the launcher went away before arming: there is nothing to guard
    line = sys.stdin.readline()  # "VERSION DEADLINE TIMEOUT", or end of file: not needed
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # drop both pipes: the timer keeps no stdio of the session that armed it
        os.dup2(devnull, fd)
    os.close(devnull)
    if not line.strip():
        return 0
    version, deadline, timeout = line.split()
    while (left := float(deadline) - time.time()) > 0:
        time.sleep(left)
    _expire(opts, int(version), float(timeout))
    return 0


def _expire(opts: dict[str, str | bool], version: int, timeout: float) -> None:
    """The window closed: roll back unless it was confirmed or superseded meanwhile."""
    from pathlib import Path

    from backend.appliance.router.rollback import roll_back
    from backend.appliance.router.site import RouterSite
    from backend.appliance.router.state_dir import RouterStateDir

    netns = opts.get("--netns")
    site = RouterSite(
        Path(str(opts["--root"])),
        str(netns) if netns else None,
        str(opts.get("--iptables", "iptables")),
        bool(opts.get("--services")),
    )
    state = RouterStateDir(site.root)
    if not state.applier_dir.is_dir():
        return  # the router's state is gone (a lab torn down): nothing to roll back
    with state.lock():
        pending = state.read_pending()
        if pending is None or pending.token != opts["--token"] or state.is_confirmed(version):
            return
        record = roll_back(
            site,
            state,
            by="timer",
            reason=f"version {version} was not confirmed within {timeout:g}s",
        )
    print(
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')} rolled back from {record.from_version} to "
        f"{record.to_version}: {'ok' if record.ok else record.error}",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())

"""The engine's helper processes (the database's worker, the SSH worker): what they run with.

They import the engine's code from where the engine runs (`helper_env`), whatever the
directory they start in, and they yield the CPU to its event loop (`lower_priority`).

The database's worker and the SSH worker do the engine's bulk CPU work (SQL, encryption) beside
its event loop, which answers every client. On a machine with few CPUs all three want one at
once when a hundred routers are applied together, and the loop then waited up to ~20 ms for a
CPU in one iteration (`bench/bench_router_concurrent.py --trace-stalls`). The helpers run at a
lower priority (a higher nice value), so the loop gets a CPU first and they use the rest.
Measured here with 100 routers applied at once (4 runs each): the loop's longest stall 15-25 ms
at nice 10 against 24-69 ms at the engine's own, and no slower.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_IMPORT_ROOT = str(Path(__file__).resolve().parents[1])

HELPER_NICENESS = 10
"""Added to the niceness of the engine's helper processes (capped by the system at 19)."""


def lower_priority() -> None:
    """Make the calling process (and what it starts) a helper of the engine: nicer by
    HELPER_NICENESS."""
    with contextlib.suppress(OSError):
        os.nice(HELPER_NICENESS)


def helper_env() -> dict[str, str]:
    """The engine's environment, with its code first on PYTHONPATH (`python -m backend...`
    then works from any directory)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    return env

"""What one database lookup costs the engine's event loop: through an async session (aiosqlite:
a hop to its thread for every statement, fetch and rollback) against a unit of work run whole in
the database's reading thread (`Database.run_read`: one hop).

Prints one JSON object: the loop thread's CPU time per lookup each way (median of rounds) and
their ratio, measured in the same run. `python bench/bench_db_hops.py [--lookups N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.db.database import Database  # noqa: E402

LOOKUP = text("SELECT x FROM t WHERE x = 7")


async def loop_cpu_ms(one: Callable[[], Awaitable[int]], lookups: int, concurrent: bool) -> float:
    """The loop thread's CPU time per lookup, in ms, for `lookups` done one after another or
    all at once."""
    started = time.thread_time()
    if concurrent:
        got = await asyncio.gather(*(one() for _ in range(lookups)))
    else:
        got = [await one() for _ in range(lookups)]
    assert got == [7] * lookups
    return (time.thread_time() - started) * 1000 / lookups


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="sysvm-bench-"))
    db = Database(home / "sysvm.db")
    await db.open()
    try:
        await db.run_write(lambda s: s.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)")))
        await db.run_write(lambda s: s.execute(text("INSERT INTO t VALUES (7)")))

        async def by_session() -> int:
            async with db.read() as s:
                return int((await s.execute(LOOKUP)).scalar_one())

        async def by_unit() -> int:
            return await db.run_read(lambda s: int(s.execute(LOOKUP).scalar_one()))

        figures = {}
        for concurrent in (False, True):
            per: dict[str, list[float]] = {"async_session": [], "unit_of_work": []}
            for _ in range(args.rounds):  # alternating, so drift hits both alike
                per["async_session"].append(await loop_cpu_ms(by_session, args.lookups, concurrent))
                per["unit_of_work"].append(await loop_cpu_ms(by_unit, args.lookups, concurrent))
            medians = {k: round(statistics.median(v), 4) for k, v in per.items()}
            figures["all_at_once" if concurrent else "one_after_another"] = {
                "loop_cpu_ms_per_lookup": medians,
                "ratio": round(medians["async_session"] / medians["unit_of_work"], 1),
            }
    finally:
        await db.close()
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps({"name": "db_hops", "lookups": args.lookups, "figures": figures}))


if __name__ == "__main__":
    asyncio.run(main())

"""IP allocation: never two holders of one address, even when many allocate at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db import ip_allocator
from backend.db.database import Database
from backend.db.models import IpAddress, IpRange, Zone

ROOT = Path(__file__).resolve().parent.parent


async def _db_with_range(path: Path, start: str, end: str) -> tuple[Database, int]:
    db = Database(path)
    await db.open()

    async def work(s: AsyncSession) -> int:
        zone = Zone(name="z")
        s.add(zone)
        await s.flush()
        rng = IpRange(
            zone_id=zone.id, purpose="control", cidr="169.254.0.0/16", start_ip=start, end_ip=end
        )
        s.add(rng)
        await s.flush()
        return rng.id

    return db, await db.write(work)


async def _allocate(db: Database, range_id: int, holder: str) -> str:
    async def work(s: AsyncSession) -> str:
        rng = await s.get(IpRange, range_id)
        assert rng is not None
        return (await ip_allocator.allocate(s, rng, holder)).address

    return await db.write(work)


async def test_lowest_free_address_is_reused_after_release(tmp_path: Path) -> None:
    db, rid = await _db_with_range(tmp_path / "db", "169.254.0.2", "169.254.0.9")
    got = [await _allocate(db, rid, f"h{i}") for i in range(3)]
    assert got == ["169.254.0.2", "169.254.0.3", "169.254.0.4"]

    async def release_middle(s: AsyncSession) -> None:
        row = (await s.scalars(select(IpAddress).where(IpAddress.address == "169.254.0.3"))).one()
        await ip_allocator.release(s, row.id)

    await db.write(release_middle)
    assert await _allocate(db, rid, "again") == "169.254.0.3"
    await db.close()


async def test_exhausted_range_says_so(tmp_path: Path) -> None:
    db, rid = await _db_with_range(tmp_path / "db", "169.254.0.2", "169.254.0.3")
    await _allocate(db, rid, "a")
    await _allocate(db, rid, "b")
    with pytest.raises(ip_allocator.RangeExhausted, match="no free address"):
        await _allocate(db, rid, "c")
    await db.close()


async def test_database_refuses_a_second_holder_of_one_address(tmp_path: Path) -> None:
    db, rid = await _db_with_range(tmp_path / "db", "169.254.0.2", "169.254.0.9")
    await _allocate(db, rid, "first")

    async def duplicate(s: AsyncSession) -> None:
        s.add(IpAddress(range_id=rid, address="169.254.0.2", address_int=0, holder="second"))
        await s.flush()

    with pytest.raises(IntegrityError):
        await db.write(duplicate)
    await db.close()


async def test_concurrent_allocations_from_two_engines_never_share_an_address(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db"
    db1, rid = await _db_with_range(path, "169.254.1.0", "169.254.1.199")
    db2 = Database(path)  # a second engine's connection pool on the same database
    tasks = [_allocate(db1 if i % 2 else db2, rid, f"h{i}") for i in range(200)]
    got = await asyncio.gather(*tasks)
    assert len(set(got)) == 200
    with pytest.raises(ip_allocator.RangeExhausted):
        await _allocate(db1, rid, "one too many")
    await db1.close()
    await db2.close()


def test_concurrent_allocations_from_four_processes_never_share_an_address(tmp_path: Path) -> None:
    path = tmp_path / "db"

    async def setup() -> int:
        db, rid = await _db_with_range(path, "169.254.2.0", "169.254.2.255")
        await db.close()
        return rid

    rid = asyncio.run(setup())
    worker = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from tests.test_ip_allocation import _allocate
        from backend.db.database import Database
        async def main():
            db = Database(Path({str(path)!r}))
            got = await asyncio.gather(*(_allocate(db, {rid}, f"p{{sys.argv[1]}}-{{i}}") for i in range(40)))
            print("\\n".join(got))
            await db.close()
        asyncio.run(main())
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, str(n)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for n in range(4)
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    everything = [a for out in outputs for a in out]
    assert len(everything) == 160
    assert len(set(everything)) == 160, "an address was handed to two holders"

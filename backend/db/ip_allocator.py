"""Address allocation from IP ranges: the lowest free address, never two holders of one address.

The unique constraint `one_holder_per_address` is the guarantee; the allocator only picks a
candidate and retries (inside a savepoint) when another transaction took it first.
"""

from __future__ import annotations

import ipaddress

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from backend.db.models import IpAddress, IpRange
from backend.errors import Conflict


class RangeExhausted(Conflict):
    """Every address of the range has a holder."""


async def _lowest_free(session: AsyncSession, rng: IpRange) -> int | None:
    start = int(ipaddress.ip_address(rng.start_ip))
    end = int(ipaddress.ip_address(rng.end_ip))
    taken_start = await session.scalar(
        select(IpAddress.id).where(IpAddress.range_id == rng.id, IpAddress.address_int == start)
    )
    if taken_start is None:
        return start
    nxt = aliased(IpAddress)
    gap = await session.scalar(
        select(func.min(IpAddress.address_int + 1))
        .outerjoin(
            nxt,
            (nxt.range_id == IpAddress.range_id) & (nxt.address_int == IpAddress.address_int + 1),
        )
        .where(IpAddress.range_id == rng.id, nxt.id.is_(None), IpAddress.address_int >= start)
    )
    if gap is None or gap > end:
        return None
    return int(gap)


async def allocate(
    session: AsyncSession, rng: IpRange, holder: str, *, attempts: int = 50
) -> IpAddress:
    """Allocate the lowest free address of `rng` to `holder` within the caller's transaction."""
    for _ in range(attempts):
        candidate = await _lowest_free(session, rng)
        if candidate is None:
            raise RangeExhausted(
                f"no free address left in {rng.purpose} range {rng.start_ip}-{rng.end_ip}; "
                "add a range or release addresses"
            )
        row = IpAddress(
            range_id=rng.id,
            address=str(ipaddress.ip_address(candidate)),
            address_int=candidate,
            holder=holder,
        )
        try:
            async with session.begin_nested():
                session.add(row)
                await session.flush()
            return row
        except IntegrityError:
            continue  # another transaction took it between our read and insert
    raise Conflict(f"could not allocate from {rng.purpose} range after {attempts} attempts")


async def release(session: AsyncSession, address_id: int | None) -> None:
    """Give an address back to its range (no-op for None)."""
    if address_id is None:
        return
    row = await session.get(IpAddress, address_id)
    if row is not None:
        await session.delete(row)

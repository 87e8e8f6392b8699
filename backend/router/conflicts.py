"""Conflicts between the rules of one network, as claims on shared resources.

Every rule states what it occupies: a port range on a public IP and protocol, the use of a public IP
(shared, or exclusive for static NAT), a unique name or address. A new rule is refused when one of
its claims meets an existing one. The index answers in O(log n) per claim, so checking a bundle of
10,000 rules stays fast.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple

from backend.errors import InvalidInput


class Claim(NamedTuple):
    """One thing a rule occupies (a named tuple: a large bundle makes tens of thousands).

    `resource` names the thing (`("port", "203.0.113.5", "tcp")`, `("dhcp-mac", mac)`); claims on
    the same resource conflict when their [start, end] ranges overlap, unless both are `shared`
    (shared claims coexist with each other but never with an exclusive one). `field` is the field
    of the claiming rule to blame; `what` says in words what is claimed.
    """

    resource: tuple[str, ...]
    field: str
    what: str
    start: int = 0
    end: int = 0
    shared: bool = False


@dataclass
class _Ranges:
    """Disjoint [start, end] ranges of one resource, sorted by start."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    owners: list[tuple[str, Claim]] = field(default_factory=list)

    def overlapping(self, start: int, end: int) -> tuple[str, Claim] | None:
        # Ranges are disjoint and sorted, so only the last one starting at or before `end` can overlap.
        i = bisect.bisect_right(self.starts, end) - 1
        if i >= 0 and self.ends[i] >= start:
            return self.owners[i]
        return None

    def insert(self, owner: str, claim: Claim) -> None:
        i = bisect.bisect_right(self.starts, claim.start)
        self.starts.insert(i, claim.start)
        self.ends.insert(i, claim.end)
        self.owners.insert(i, (owner, claim))


class ClaimIndex:
    """What the rules of one network occupy; `check` refuses a conflicting rule, `add` records one."""

    def __init__(self) -> None:
        self._ranges: dict[tuple[str, ...], _Ranges] = {}
        # The first shared and the first exclusive holder of each resource without ranges.
        self._shared: dict[tuple[str, ...], tuple[str, Claim]] = {}
        self._exclusive: dict[tuple[str, ...], tuple[str, Claim]] = {}

    def check(self, claims: tuple[Claim, ...]) -> None:
        """Raise InvalidInput (naming the claim's field) if a claim meets one already recorded."""
        for claim in claims:
            hit = self._find(claim)
            if hit is not None:
                owner, held = hit
                raise InvalidInput(
                    claim.field, f"{claim.what} conflicts with {owner} ({held.what})"
                )

    def add(self, owner: str, claims: tuple[Claim, ...]) -> None:
        """Check the claims (also against each other), then record them as held by `owner`."""
        self.check(claims)
        for i, claim in enumerate(claims):
            if i:
                ClaimIndex._check_pair(claims[:i], claim)
            self._record(owner, claim)

    @staticmethod
    def _check_pair(earlier: tuple[Claim, ...], claim: Claim) -> None:
        for other in earlier:
            if other.resource == claim.resource and not (other.shared and claim.shared):
                if other.start <= claim.end and claim.start <= other.end:
                    raise InvalidInput(claim.field, f"{claim.what} conflicts with {other.what}")

    def record(self, owner: str, claims: tuple[Claim, ...]) -> None:
        """Record claims known not to conflict (they were checked together before)."""
        for claim in claims:
            self._record(owner, claim)

    def _find(self, claim: Claim) -> tuple[str, Claim] | None:
        if claim.start or claim.end:
            ranges = self._ranges.get(claim.resource)
            return ranges.overlapping(claim.start, claim.end) if ranges else None
        exclusive = self._exclusive.get(claim.resource)
        if exclusive is not None or claim.shared:
            return exclusive
        return self._shared.get(claim.resource)

    def _record(self, owner: str, claim: Claim) -> None:
        if claim.start or claim.end:
            ranges = self._ranges.get(claim.resource)
            if ranges is None:
                ranges = self._ranges[claim.resource] = _Ranges()
            ranges.insert(owner, claim)
        else:
            holders = self._shared if claim.shared else self._exclusive
            holders.setdefault(claim.resource, (owner, claim))

"""The fast path for small changes: `iptables-restore --noflush` input that rewrites only changed chains.

As OpenStack Neutron's iptables manager does, the whole desired ruleset is computed for both the old
and the new bundle and compared chain by chain; a chain whose lines differ is declared (which, with
--noflush, empties it) and refilled, a chain that is gone is emptied and deleted, and everything else
is left alone. Bucket chains keep this small: one changed rule rewrites one chain per section.

The caller must only use a delta when the live state is the old bundle's (its live digest matches);
otherwise it applies the complete ruleset.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.appliance.router.layout import RouterInterfaces
from backend.appliance.router.netfilter import TABLES, Chain, Ruleset, render_ruleset
from backend.router.bundle import RouterBundle


@dataclass(frozen=True)
class RulesetDelta:
    """Chains to rewrite and chains to delete, by table."""

    rewrite: tuple[Chain, ...]
    delete: tuple[Chain, ...]

    @property
    def empty(self) -> bool:
        return not self.rewrite and not self.delete

    def touched(self) -> list[tuple[str, str]]:
        """(table, chain) of every chain the delta changes."""
        return sorted((c.table, c.name) for c in (*self.rewrite, *self.delete))

    def restore_text(self) -> str:
        """`iptables-restore --noflush` input; empty when nothing changed."""
        out: list[str] = []
        for table in TABLES:
            rewrite = [c for c in self.rewrite if c.table == table]
            delete = [c for c in self.delete if c.table == table]
            if not rewrite and not delete:
                continue
            out.append(f"*{table}")
            # Declaring a user chain creates it or, under --noflush, empties it; declaring a
            # built-in chain only sets its policy, so built-ins are flushed explicitly.
            out.extend(c.declaration() for c in rewrite)
            out.extend(c.declaration() for c in delete)
            out.extend(f"-F {c.name}" for c in rewrite if c.builtin)
            for c in rewrite:
                out.extend(c.lines)
            out.extend(f"-X {c.name}" for c in delete)
            out.append("COMMIT")
        return "\n".join(out) + "\n" if out else ""


def diff_rulesets(old: Ruleset, new: Ruleset) -> RulesetDelta:
    """What turns `old` into `new`, chain by chain."""
    rewrite = tuple(c for key, c in sorted(new.chains.items()) if old.chains.get(key) != c)
    delete = tuple(c for key, c in sorted(old.chains.items()) if key not in new.chains)
    return RulesetDelta(rewrite, delete)


def render_delta(old: RouterBundle, new: RouterBundle, ifs: RouterInterfaces | None = None) -> str:
    """`iptables-restore --noflush` input changing only the chains that differ ('' if none)."""
    return diff_rulesets(render_ruleset(old, ifs), render_ruleset(new, ifs)).restore_text()

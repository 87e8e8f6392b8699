"""The live digest: one hash of what a router actually runs, comparable with what its bundle predicts.

It covers the three tables we own as `iptables-save` prints them (built-in chains' policies and
lines, and every `SYSVM_*` chain; counters, comments and the order chains are listed in are
ignored) and the contents of the service config files. The renderer writes iptables lines in
iptables-save's own form, so a router whose state is exactly its bundle's has the live digest the
bundle predicts (`expected_live_digest`), and any difference is drift.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from backend.appliance.router.netfilter import BUILTIN, PREFIX, TABLES, Ruleset


def netfilter_state(save_text: str) -> dict[str, dict[str, tuple[str, list[str]]]]:
    """Parse iptables-save (or iptables-restore) text into table -> chain -> (policy, lines),
    keeping only built-in chains and ours."""
    state: dict[str, dict[str, tuple[str, list[str]]]] = {}
    table: dict[str, tuple[str, list[str]]] | None = None
    table_name = ""
    for raw in save_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table_name = line[1:]
            table = state.setdefault(table_name, {}) if table_name in TABLES else None
        elif table is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            if _ours(table_name, name):
                table[name] = (policy, table.get(name, (policy, []))[1])
        elif line.startswith("-A "):
            name = line.split(" ", 2)[1]
            if _ours(table_name, name):
                table.setdefault(name, ("-", []))[1].append(line)
    return state


def _ours(table: str, chain: str) -> bool:
    return chain in BUILTIN[table] or chain.startswith(PREFIX)


def canonical_netfilter(save_text: str) -> str:
    """The owned tables as one canonical text (tables and chains by name, lines in order)."""
    state = netfilter_state(save_text)
    out: list[str] = []
    for table in sorted(TABLES):
        out.append(f"*{table}")
        for name, (policy, lines) in sorted(state.get(table, {}).items()):
            out.append(f":{name} {policy}")
            out.extend(lines)
    return "\n".join(out) + "\n"


def live_digest(iptables_save: str, files: Mapping[str, str]) -> str:
    """sha256 (hex) over the owned netfilter state and the service config files (name -> text)."""
    return digest_of(canonical_netfilter(iptables_save), files)


def digest_of(canonical: str, files: Mapping[str, str]) -> str:
    """The live digest of netfilter state already in canonical form (`canonical_netfilter`)."""
    h = hashlib.sha256()
    h.update(canonical.encode())
    for name in sorted(files):
        data = files[name].encode()
        h.update(f"\n=== {name} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def save_shows(save_text: str, ruleset: Ruleset) -> bool:
    """True when `iptables-save` text shows exactly `ruleset` in the tables we own: every chain
    declared with its policy and holding its lines, and no other chain. Then its canonical form
    (and live digest) is the ruleset's, which spares parsing 10,000 lines line by line.

    iptables-save prints a table's chain declarations, then every chain's lines in that same
    order, so the lines part must equal the ruleset's lines joined in that order. Anything else
    (a chain more or less, another policy, a line changed, counters) answers False, and the
    caller parses the text exactly (`live_digest`)."""
    for table in TABLES:
        start = save_text.find(f"*{table}\n")
        if start < 0:
            return False
        start += len(table) + 2
        end = save_text.find("COMMIT\n", start)
        if end < 0:
            return False
        first_rule = save_text.find("-A ", start, end)
        if first_rule < 0:
            first_rule = end
        expected = {c.name: c for c in ruleset.table(table)}
        order = []
        for decl in save_text[start:first_rule].splitlines():
            name, policy = (decl[1:].split() + ["", ""])[:2]
            chain = expected.get(name)
            if not decl.startswith(":") or chain is None or policy != (chain.policy or "-"):
                return False
            order.append(chain)
        if len(order) != len(expected) or len({c.name for c in order}) != len(order):
            return False
        lines = "\n".join(line for c in order for line in c.lines)
        if save_text[first_rule:end] != (lines + "\n" if lines else ""):
            return False
    return True

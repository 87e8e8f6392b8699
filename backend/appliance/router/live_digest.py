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

from backend.appliance.router.netfilter import BUILTIN, PREFIX, TABLES


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
    h = hashlib.sha256()
    h.update(canonical_netfilter(iptables_save).encode())
    for name in sorted(files):
        data = files[name].encode()
        h.update(f"\n=== {name} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()

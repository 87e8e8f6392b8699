"""Rolling a router back to its last confirmed snapshot (the caller holds the router's lock).

The rollback timer does this when a confirm window closes unconfirmed; `confirm` does it when it
arrives too late; `boot` does it when the router restarted inside a window. The confirmed
snapshot is restored as it was rendered (complete ruleset, files), not re-rendered, so a rollback
needs nothing but the standard library. Standard library only.
"""

from __future__ import annotations

import dataclasses
import time

from backend.appliance.router.installer import Stopwatch, TablesChange, install
from backend.appliance.router.rule_tables import TablesError
from backend.appliance.router.site import RouterSite
from backend.appliance.router.state_dir import (
    CONFIRMED,
    LIVE,
    RollbackRecord,
    RouterStateDir,
    SnapshotMeta,
)


def restore_confirmed(site: RouterSite, state: RouterStateDir) -> SnapshotMeta:
    """Install the confirmed snapshot and make it the live one; returns it.
    Raises LookupError when there is none, TablesError or OSError when it cannot be installed."""
    live = state.read_meta(LIVE)
    target = state.read_meta(CONFIRMED)
    if target is None:
        raise LookupError("no confirmed snapshot to roll back to")
    data = state.read_data(target)
    install(
        state,
        site.tables(state),
        site.reloads(state),
        files=data.files,
        service_files=target.service_files,
        services_before=live.services if live is not None else {},
        services_now=target.services,
        change=TablesChange(data.iptables, test=False),
        watch=Stopwatch(),
    )
    # Live is the confirmed snapshot again; its live digest is measured when next asked.
    state.write_meta(LIVE, dataclasses.replace(target, live_digest=None))
    state.collect_data()
    return target


def roll_back(site: RouterSite, state: RouterStateDir, *, by: str, reason: str) -> RollbackRecord:
    """Make the last confirmed snapshot live again, close the confirm window, record the rollback."""
    live = state.read_meta(LIVE)
    target = state.read_meta(CONFIRMED)
    from_version = live.version if live is not None else None
    to_version = target.version if target is not None else None
    to_digest = target.digest if target is not None else None
    try:
        restore_confirmed(site, state)
    except (LookupError, TablesError, OSError, ValueError) as exc:
        record = RollbackRecord(
            from_version, to_version, to_digest, time.time(), by, reason, ok=False, error=str(exc)
        )
    else:
        record = RollbackRecord(from_version, to_version, to_digest, time.time(), by, reason)
    state.clear_pending()
    state.write_rollback(record)
    return record

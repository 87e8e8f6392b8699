"""Making a rendered router state live, as one transaction: files staged, tables loaded, files swapped, services reloaded.

Changed config files are first written under temporary names; then the ruleset is tested and
loaded; only if that worked are the files renamed into place (each rename is atomic) and the
services whose files changed reloaded. If the tables refuse the ruleset, the staged files are
discarded and nothing changed. Standard library only: the rollback timer uses this.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from backend.appliance.router.rule_tables import RuleTables, TablesError
from backend.appliance.router.service_reload import ServiceReloads, changed_services
from backend.appliance.router.state_dir import RouterStateDir, discard_staged


@dataclass
class Stopwatch:
    """Milliseconds spent per step, in the order the steps ran."""

    ms: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.ms[step] = round(self.ms.get(step, 0.0) + (now - self._last) * 1000, 2)
        self._last = now


@dataclass(frozen=True)
class TablesChange:
    """The iptables-restore input to load: a complete ruleset, or a delta (`noflush`).

    `test` runs `iptables-restore --test` first. `undo`, instead, is the complete ruleset live
    before: if loading fails part way it is loaded again, so the tables end as they were. nft
    loads all of the input as one transaction (all of it or nothing); legacy iptables commits
    table by table, so a failure in the second table would leave the first one changed.
    Loading and, only on failure, undoing costs one pass where testing first always costs two
    (each about 0.2 s for 10,000 rules)."""

    text: str
    noflush: bool = False
    test: bool = True
    undo: str | None = None


def install(
    state: RouterStateDir,
    tables: RuleTables,
    reloads: ServiceReloads,
    *,
    files: Mapping[str, str],
    service_files: Mapping[str, list[str]],
    services_before: Mapping[str, bool],
    services_now: Mapping[str, bool],
    change: TablesChange | None,
    watch: Stopwatch,
    before_tables: Callable[[], None] | None = None,
) -> dict[str, str]:
    """Make `files` the config files (those of `service_files` not in `files` are removed) and
    load `change` (None: leave the tables alone), calling `before_tables` just before. Returns each service's reload status.
    Raises TablesError (from the tables) with nothing changed."""
    managed = sorted({n for names in service_files.values() for n in names} | set(files))
    current = state.read_config_files(managed)
    changed = {n for n in managed if files.get(n) != current.get(n)}
    staged = state.stage_config_files({n: files[n] for n in changed if n in files})
    watch.lap("files_staged")
    if before_tables is not None:
        before_tables()
    try:
        if change is not None:
            if change.test:
                tables.test(change.text, noflush=change.noflush)
                watch.lap("iptables_test")
            try:
                tables.restore(change.text, noflush=change.noflush)
            except TablesError as exc:
                if change.undo is None:
                    raise
                try:
                    tables.restore(change.undo)
                except TablesError as again:
                    raise TablesError(
                        f"{exc}; loading the previous ruleset again failed too: {again}"
                    ) from exc
                raise TablesError(f"{exc} (the previous ruleset is live again)") from exc
            watch.lap("iptables_restore")
    except BaseException:
        discard_staged(staged)
        raise
    state.swap_config_files(staged, remove=[n for n in changed if n not in files])
    watch.lap("files_swapped")
    services = reloads.reload(
        changed_services(service_files, changed, services_before, services_now), services_now
    )
    watch.lap("services")
    return services

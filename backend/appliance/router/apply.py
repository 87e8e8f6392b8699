"""Applying a router bundle inside the router: parse, render, arm the rollback, go live, measure.

`RouterApplier` is one router's applier (the SSH commands in `agent.py` call it in a worker
thread). An apply parses the bundle (reusing the rules of the last one), refuses a version that
is not newer than the live one, renders it, and, with a confirm window, first arms the detached
rollback timer and records the window; then it loads the ruleset (netns mode: a `--noflush`
delta when the live tables are the previous bundle's, else the complete ruleset; either goes live
whole or not at all, see `TablesChange`), swaps the config files and reloads the services whose
files changed, and reads back what is live to answer its digest. If the delta's read-back differs from
the expected digest (someone changed the tables), the complete ruleset is loaded and read again.
The last confirmed snapshot stays on disk: a rollback and `boot` restore it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Generic, TypeVar

from backend.appliance.router import vpn
from backend.appliance.router.apply_errors import ApplyFailed, ApplyRefused
from backend.appliance.router.delta import diff_rulesets
from backend.appliance.router.installer import Stopwatch, TablesChange, install
from backend.appliance.router.layout import RouterInterfaces, RouterPaths
from backend.appliance.router.live_digest import (
    digest_of,
    live_digest,
    netfilter_state,
    save_shows,
)
from backend.appliance.router.netfilter import (
    BUILTIN,
    TABLES,
    Ruleset,
    render_ruleset,
    update_ruleset,
)
from backend.appliance.router.render import SERVICE_FILES, files_unchanged, render_files
from backend.appliance.router.rollback import restore_confirmed, roll_back
from backend.appliance.router.rollback_timer import TimerLaunch, TimerNotArmed, disarm
from backend.appliance.router.rule_tables import TablesError
from backend.appliance.router.site import RouterSite
from backend.appliance.router.state_dir import (
    CONFIRMED,
    LIVE,
    PendingConfirm,
    RollbackRecord,
    SnapshotData,
    SnapshotMeta,
    new_serial,
)
from backend.errors import InvalidInput
from backend.router.bundle import RouterBundle, changed_rule_ids
from backend.router.rules import LoadBalancerRule

MAX_DIFFERENCES = 50
_SERVICE_FILES: dict[str, list[str]] = {k: list(v) for k, v in SERVICE_FILES.items()}
_MANAGED = sorted({n for names in SERVICE_FILES.values() for n in names})


@dataclass(frozen=True)
class RenderedBundle:
    """A bundle rendered for this router: ruleset (kept for deltas), files, services."""

    bundle: RouterBundle
    ruleset: Ruleset
    files: dict[str, str]
    services: dict[str, bool]

    @cached_property
    def iptables(self) -> str:
        """The complete iptables-restore input."""
        return self.ruleset.restore_text()

    @cached_property
    def expected_live_digest(self) -> str:
        """The live digest the router has once exactly this is live."""
        return digest_of(self.ruleset.canonical_text(), self.files)


@dataclass(frozen=True)
class _LiveCache:
    """What the live snapshot rendered to (its bundle parsed), valid while its serial is live."""

    serial: str
    rendered: RenderedBundle


class RouterApplier:
    """One router's applier. Every state change holds the router's lock (shared with its timer)."""

    def __init__(self, site: RouterSite, ifs: RouterInterfaces | None = None) -> None:
        self.site = site
        self.state = site.state()
        self.state.ensure()
        try:
            self.paths = RouterPaths(str(self.state.config_dir), str(self.state.state_dir))
        except InvalidInput as exc:
            raise ApplyRefused("router_root", f"{site.root} cannot hold configs: {exc}") from None
        self.ifs = ifs or RouterInterfaces()
        self.tables = site.tables(self.state)
        self.reloads = site.reloads(self.state)
        self._cache: _LiveCache | None = None
        # netns mode (a router's one appliance): a rollback timer started ahead, after each
        # apply with a confirm window, so the next one arms at once instead of waiting for an
        # interpreter to start (~0.1 s). Not in local mode, where one process serves many.
        self._spare: TimerLaunch | None = None
        self._keeps_spare = site.mode == "netns"
        self._loads = 0  # table loads begun by this applier (see `apply`'s early undo)

    # ------------------------------------------------------------------ commands

    def apply(
        self, text: str, confirm_timeout: float = 0.0, *, patch: bool = False
    ) -> dict[str, Any]:
        """`sysvm-router apply`: make the bundle in `text` live (see the module docstring). With
        `patch`, `text` is a patch (`bundle_patch`) of the live bundle, refused (field `base`)
        when the live bundle is not its base."""
        watch = Stopwatch()
        # With a window, the timer's interpreter starts now, while the bundle is parsed and
        # rendered; it is armed just before the new rules go live.
        launch = self._launch_timer() if confirm_timeout > 0 else None
        # A router's first bundle: if loading it fails part way, what the tables hold now is
        # loaded again. It is read (three processes) while the bundle is parsed and rendered.
        early_undo: _SideWork[str] | None = None
        if self.tables.kernel and self._cache is None and self.state.read_meta(LIVE) is None:
            early_undo = _SideWork(self._tables_now)
            early_undo.start()
        loads_before = self._loads
        try:
            cache = self._cache
            previous = cache.rendered.bundle if cache else None
            try:
                if patch:
                    bundle = RouterBundle.from_patch(text, previous)
                else:
                    bundle = RouterBundle.from_json(text, previous)
            except InvalidInput as exc:
                raise ApplyRefused(exc.field, exc.reason) from None
            # The parsed bundle (~30 objects a rule) is kept for the next apply: out of the cycle
            # collector's scans at once, as the agent does after each command, since scanning
            # it during the render and the side work cost 30-40 ms for 10,000 rules. What dies
            # of it is freed by reference counting; the agent's settling bounds the rest.
            gc.freeze()
            watch.lap("parse")
            rendered = self.render(bundle, cache)
            watch.lap("render")
            with self.state.lock():
                watch.lap("lock")
                live = self.state.read_meta(LIVE)
                if patch and (cache is None or live is None or live.serial != cache.serial):
                    raise ApplyRefused(
                        "base", "the live bundle changed while the patch was read; send it whole"
                    )
                if live is not None and live.version is not None and bundle.version <= live.version:
                    raise ApplyRefused(
                        "version",
                        f"{bundle.version} is not greater than the live version {live.version}",
                        live_version=live.version,
                        live_digest=live.live_digest,
                        digest=live.digest,
                    )
                return self._go_live(
                    None if patch else text,
                    rendered,
                    live,
                    confirm_timeout,
                    watch,
                    full=False,
                    launch=launch,
                    # Another load meanwhile (this process is the router's only applier in netns
                    # mode) may have changed the tables under the early read: read them again.
                    early_undo=early_undo if self._loads == loads_before else None,
                )
        finally:
            self._after_apply(launch, confirm_timeout)

    def _after_apply(self, launch: TimerLaunch | None, confirm_timeout: float) -> None:
        """A launch not armed (refused, failed before arming) is kept as the spare or exits;
        after an apply with a window, a spare is started for the next one."""
        if launch is not None and not launch.used:
            if self._keeps_spare and self._spare is None:
                self._spare = launch
            else:
                launch.cancel()
        if self._keeps_spare and self._spare is None and confirm_timeout > 0:
            with contextlib.suppress(OSError):
                self._spare = TimerLaunch(self.site, self.state)

    def confirm(self, version: int) -> dict[str, Any]:
        """`sysvm-router confirm VERSION`: keep `version`, disarm its rollback timer."""
        with self.state.lock():
            pending = self.state.read_pending()
            if pending is None or pending.version != version:
                confirmed = self.state.read_meta(CONFIRMED)
                if pending is None and confirmed is not None and confirmed.version == version:
                    return {"confirmed": version, "already": True}
                last = self.state.read_rollback()
                if last is not None and last.from_version == version:
                    raise ApplyFailed(
                        f"too late: version {version} was already rolled back to "
                        f"{_name(last.to_version)} ({last.reason})",
                        rolled_back=asdict(last),
                    )
                waiting = f" (version {pending.version} is)" if pending is not None else ""
                raise ApplyRefused("version", f"{version} is not waiting for a confirm{waiting}")
            late = time.time() - pending.deadline
            if late > 0:
                disarm(pending)
                record = roll_back(
                    self.site,
                    self.state,
                    by="confirm",
                    reason=f"the confirm of version {version} came {late:.2f}s after its "
                    f"{pending.timeout:g}s window closed",
                )
                raise ApplyFailed(
                    f"too late: the confirm window of version {version} had closed; rolled "
                    f"back to {_name(record.to_version)}",
                    rolled_back=asdict(record),
                )
            self.state.mark_confirmed(version)
            live = self.state.read_meta(LIVE)
            if live is not None and live.version == version:
                self.state.write_meta(CONFIRMED, live)
                self.state.collect_data()
            self.state.clear_pending()
            disarm(pending)
            return {"confirmed": version, "window_left_s": round(-late, 3)}

    def show(self) -> dict[str, Any]:
        """`sysvm-router show`: what is live, what is confirmed, the open window, the last rollback."""
        live = self.state.read_meta(LIVE)
        confirmed = self.state.read_meta(CONFIRMED)
        pending = self.state.read_pending()
        last = self.state.read_rollback()
        measured = live.live_digest if live is not None else None
        if live is not None and measured is None:
            measured = self._measure()  # not measured since a rollback
        return {
            "mode": self.site.mode,
            "version": live.version if live else None,
            "digest": live.digest if live else None,
            "live_digest": measured,
            "expected_live_digest": live.expected_live_digest if live else None,
            "confirmed_version": confirmed.version if confirmed else None,
            "confirmed_digest": confirmed.digest if confirmed else None,
            "pending_confirm": _window(pending),
            "last_rollback": asdict(last) if last is not None else None,
            "paths": {"config_dir": self.paths.config_dir, "state_dir": self.paths.state_dir},
        }

    def check(self) -> dict[str, Any]:
        """`sysvm-router check`: measure what is live now and compare it with the live snapshot."""
        watch = Stopwatch()
        live = self.state.read_meta(LIVE)
        saved = self.tables.save()
        files = self.state.read_config_files(_MANAGED)
        measured = live_digest(saved, files)
        watch.lap("measure")
        expected = live.expected_live_digest if live else None
        drift = expected is not None and measured != expected
        answer: dict[str, Any] = {
            "version": live.version if live else None,
            "digest": live.digest if live else None,
            "live_digest": measured,
            "expected_live_digest": expected,
            "drift": drift,
            "pending_confirm": self.state.read_pending() is not None,
        }
        if drift and live is not None:
            answer["differences"] = _differences(self.state.read_data(live), saved, files)
        answer["timings_ms"] = watch.ms
        return answer

    def boot(self, text: str | None = None) -> dict[str, Any]:
        """`sysvm-router boot`: re-apply the last confirmed bundle, as a router does when it starts.
        A confirm window the restart interrupted ends in a rollback to that bundle. With a bundle
        in `text` (the engine pushing its current one to a router that restarted or was
        recreated), that bundle is applied completely instead, without a window; it may carry
        the live version (the same content again) but not an older one."""
        if text is not None and text.strip():
            return self._boot_with(text)
        watch = Stopwatch()
        with self.state.lock():
            pending = self.state.read_pending()
            if pending is not None:
                disarm(pending)
            confirmed = self.state.read_meta(CONFIRMED)
            live = self.state.read_meta(LIVE)
            if confirmed is None:
                self.state.clear_pending()
                return {"version": None, "applied": False, "mode": self.site.mode}
            data = self.state.read_data(confirmed)
            if data.bundle_json is None:
                # The factory state (no bundle was ever confirmed): restore it as it was saved.
                if pending is not None:
                    record = roll_back(self.site, self.state, by="boot", reason=_booted(pending))
                    return {"version": None, "applied": True, "rolled_back": asdict(record)}
                restore_confirmed(self.site, self.state)
                return {"version": None, "applied": True, "live_digest": self._measure()}
            try:
                bundle = RouterBundle.from_json(data.bundle_json)
            except InvalidInput as exc:
                raise ApplyFailed(
                    f"the last confirmed bundle (version {confirmed.version}) no longer "
                    f"validates: {exc}; push a new one"
                ) from None
            watch.lap("parse")
            rendered = self.render(bundle)
            watch.lap("render")
            if pending is not None:
                self.state.clear_pending()
            answer = self._go_live(data.bundle_json, rendered, live, 0.0, watch, full=True)
            answer["applied"] = True
            if pending is not None:
                record = RollbackRecord(
                    pending.version,
                    confirmed.version,
                    confirmed.digest,
                    time.time(),
                    "boot",
                    _booted(pending),
                )
                self.state.write_rollback(record)
                answer["rolled_back"] = asdict(record)
            return answer

    def _boot_with(self, text: str) -> dict[str, Any]:
        watch = Stopwatch()
        try:
            cache = self._cache
            bundle = RouterBundle.from_json(text, cache.rendered.bundle if cache else None)
        except InvalidInput as exc:
            raise ApplyRefused(exc.field, exc.reason) from None
        watch.lap("parse")
        rendered = self.render(bundle)
        watch.lap("render")
        with self.state.lock():
            watch.lap("lock")
            live = self.state.read_meta(LIVE)
            if live is not None and live.version is not None:
                if bundle.version < live.version or (
                    bundle.version == live.version and bundle.digest != live.digest
                ):
                    raise ApplyRefused(
                        "version",
                        f"{bundle.version} is older than, or differs from, the live version "
                        f"{live.version}",
                        live_version=live.version,
                        live_digest=live.live_digest,
                        digest=live.digest,
                    )
            pending = self.state.read_pending()
            if pending is not None:  # the engine's bundle replaces whatever was on trial
                disarm(pending)
                self.state.clear_pending()
            answer = self._go_live(text, rendered, live, 0.0, watch, full=True)
            answer["applied"] = True
            return answer

    # ------------------------------------------------------------------ work

    def render(self, bundle: RouterBundle, cache: _LiveCache | None = None) -> RenderedBundle:
        """Everything the bundle renders to for this router (as `render_router`, plus the
        ruleset). With the live snapshot's rendering (`cache`), only what the changed rules
        feed is rendered again: their bucket chains, and the files if they feed any."""
        if cache is None:
            ruleset = render_ruleset(bundle, self.ifs)
            files = render_files(bundle, self.ifs, self.paths)
        else:
            old = cache.rendered
            changed = changed_rule_ids(old.bundle, bundle)
            ruleset = update_ruleset(old.bundle, old.ruleset, bundle, self.ifs, changed)
            if files_unchanged(old.bundle, bundle, changed):
                files = old.files
            else:
                files = render_files(bundle, self.ifs, self.paths)
        services = {
            "dnsmasq": True,
            "haproxy": bool(bundle.rules_of(LoadBalancerRule)),
            "vpn": vpn.vpn_of(bundle) is not None,
        }
        return RenderedBundle(bundle, ruleset, files, services)

    def _go_live(
        self,
        text: str | None,
        rendered: RenderedBundle,
        live: SnapshotMeta | None,
        confirm_timeout: float,
        watch: Stopwatch,
        *,
        full: bool,
        launch: TimerLaunch | None = None,
        early_undo: _SideWork[str] | None = None,
    ) -> dict[str, Any]:
        """Arm (with a window), install, measure, record. The caller holds the lock.

        The Python-heavy side work (the bundle digest, the expected live digest, writing the
        snapshot) runs in a thread while iptables-restore and iptables-save run: it starts once
        the files are staged, so that it does not hold up what has to happen before."""
        bundle = rendered.bundle
        serial = new_serial()

        def prepare() -> None:
            _ = bundle.digest, rendered.expected_live_digest  # cached for the answer
            bundle_json = text if text is not None else bundle.to_json()
            self.state.write_data(
                serial, SnapshotData(bundle_json, rendered.iptables, rendered.files)
            )

        side_work = _SideWork(prepare)
        old_pending = self.state.read_pending()
        new_pending: PendingConfirm | None = None
        try:
            if confirm_timeout > 0:
                confirmed = self.state.read_meta(CONFIRMED) or self._save_factory()
                try:
                    launch = launch or self._launch_timer()
                    new_pending = launch.activate(
                        version=bundle.version,
                        timeout=confirm_timeout,
                        rollback_to=confirmed.version,
                    )
                except TimerNotArmed as exc:
                    raise ApplyFailed(f"nothing applied: {exc}") from None
                self.state.write_pending(new_pending)  # the old window's timer now stands down
                watch.lap("arm")
            self._loads += 1
            change, method = self._tables_change(rendered, live, full, early_undo)
            try:
                services = self._install(rendered, live, change, watch, side_work.start)
                saved = self._measure(rendered)
                watch.lap("readback")
                side_work.result()
                watch.lap("side_work")
                if saved != rendered.expected_live_digest and method in ("delta", "unchanged"):
                    # The tables were not the previous bundle's: load the complete ruleset.
                    method = "full (delta found drift)"
                    full_change = TablesChange(
                        rendered.iptables, test=False, undo=self._undo_text(live)
                    )
                    self._install(rendered, live, full_change, watch)
                    saved = self._measure(rendered)
                    watch.lap("readback")
            except (TablesError, OSError) as exc:
                if new_pending is not None:
                    disarm(new_pending)
                    if old_pending is not None:
                        self.state.write_pending(old_pending)  # its timer still runs
                    else:
                        self.state.clear_pending()
                raise ApplyFailed(f"version {bundle.version} not applied: {exc}") from None
        except BaseException:
            side_work.wait_quietly()
            self.state.drop_data(serial)
            raise
        meta = SnapshotMeta(
            version=bundle.version,
            digest=bundle.digest,
            serial=serial,
            expected_live_digest=rendered.expected_live_digest,
            services=rendered.services,
            service_files=_SERVICE_FILES,
            live_digest=saved,
        )
        self.state.write_meta(LIVE, meta)
        if new_pending is None:
            self.state.write_meta(CONFIRMED, meta)
            self.state.clear_pending()
        if old_pending is not None:
            disarm(old_pending)
        self.state.collect_data()
        self._cache = _LiveCache(meta.serial, rendered)
        watch.lap("record")
        watch.ms["total"] = round(sum(watch.ms.values()), 2)
        return {
            "version": bundle.version,
            "digest": bundle.digest,
            "live_digest": saved,
            "expected_live_digest": rendered.expected_live_digest,
            "drift": saved != rendered.expected_live_digest,
            "services": services,
            "iptables": method,
            "input": "bundle" if text is not None else "patch",
            "pending_confirm": new_pending is not None,
            "confirm_deadline": new_pending.deadline if new_pending else None,
            "mode": self.site.mode,
            "timings_ms": watch.ms,
        }

    def _launch_timer(self) -> TimerLaunch:
        spare, self._spare = self._spare, None
        if spare is not None:
            if spare.healthy():
                return spare
            spare.cancel()
        try:
            return TimerLaunch(self.site, self.state)
        except OSError as exc:
            raise ApplyFailed(f"nothing applied: cannot start the rollback timer: {exc}") from None

    def _tables_change(
        self,
        rendered: RenderedBundle,
        live: SnapshotMeta | None,
        full: bool,
        early_undo: _SideWork[str] | None = None,
    ) -> tuple[TablesChange | None, str]:
        """What to load: in netns mode a delta from the cached live ruleset when it is current."""
        if not self.tables.kernel:
            return TablesChange(rendered.iptables, test=False), "recorded"
        cache = self._cache
        if not full and cache is not None and live is not None and cache.serial == live.serial:
            delta = diff_rulesets(cache.rendered.ruleset, rendered.ruleset)
            if delta.empty:
                return None, "unchanged"
            # A delta within one table loads as one commit (legacy: one table replaced; nft: one
            # transaction), so it goes live entirely or not at all: no separate --test run.
            # Across tables an early COMMIT could land before a later one fails: test first.
            tables = {table for table, _ in delta.touched()}
            return TablesChange(delta.restore_text(), noflush=True, test=len(tables) > 1), "delta"
        undo = self._undo_text(live, early_undo)
        return TablesChange(rendered.iptables, test=False, undo=undo), "full"

    def _undo_text(self, live: SnapshotMeta | None, early: _SideWork[str] | None = None) -> str:
        """The complete ruleset to load again if loading a new one fails part way: the live
        snapshot's, or before any bundle, what the tables hold now (read by `early` while the
        bundle was parsed, if given: no apply could run meanwhile, `live` is still None)."""
        cache = self._cache
        if live is not None and cache is not None and cache.serial == live.serial:
            return cache.rendered.iptables
        if live is not None:
            return self.state.read_data(live).iptables
        return early.result() if early is not None else self._tables_now()

    def _tables_now(self) -> str:
        return _with_every_table(self.tables.save())

    def _install(
        self,
        rendered: RenderedBundle,
        live: SnapshotMeta | None,
        change: TablesChange | None,
        watch: Stopwatch,
        before_tables: Callable[[], None] | None = None,
    ) -> dict[str, str]:
        return install(
            self.state,
            self.tables,
            self.reloads,
            files=rendered.files,
            service_files=_SERVICE_FILES,
            services_before=live.services if live is not None else {},
            services_now=rendered.services,
            change=change,
            watch=watch,
            before_tables=before_tables,
        )

    def _measure(self, expected: RenderedBundle | None = None) -> str:
        """The live digest of what is live now: the tables as saved, the config files on disk.
        When they are exactly what `expected` rendered to, that is its digest, found without
        parsing the saved text line by line (`save_shows`); anything else is parsed."""
        saved = self.tables.save()
        files = self.state.read_config_files(_MANAGED)
        if expected is not None and files == expected.files and save_shows(saved, expected.ruleset):
            return expected.expected_live_digest
        return live_digest(saved, files)

    def _save_factory(self) -> SnapshotMeta:
        """Keep what runs before the first bundle as the confirmed snapshot, so that a first
        apply with a confirm window has something to roll back to."""
        saved = self.tables.save()
        if self.tables.kernel:
            saved = _with_every_table(saved)
        files = self.state.read_config_files(_MANAGED)
        meta = SnapshotMeta(
            version=None,
            digest=None,
            serial=new_serial(),
            expected_live_digest=live_digest(saved, files),
            services={name: False for name in SERVICE_FILES},
            service_files=_SERVICE_FILES,
        )
        self.state.write_data(meta.serial, SnapshotData(None, saved, files))
        self.state.write_meta(CONFIRMED, meta)
        return meta


T = TypeVar("T")


class _SideWork(Generic[T]):
    """Work for a thread of its own, started when asked (or at the latest when its result is)."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._work = work
        self._future: Future[T] | None = None

    def start(self) -> None:
        if self._future is not None:
            return
        future: Future[T] = Future()
        self._future = future

        def run() -> None:
            try:
                value = self._work()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(value)

        threading.Thread(target=run, name="router-apply-side-work", daemon=True).start()

    def result(self) -> T:
        self.start()
        assert self._future is not None
        return self._future.result()

    def wait_quietly(self) -> None:
        if self._future is not None:
            try:
                self._future.result()
            except BaseException:
                pass


def _with_every_table(saved: str) -> str:
    """iptables-save text completed with an empty, all-ACCEPT form of each table it lacks, so that
    restoring it also clears the tables a bundle added."""
    present = set(netfilter_state(saved))
    out = [saved.rstrip("\n")] if saved.strip() else []
    for table in TABLES:
        if table not in present:
            out.append(f"*{table}")
            out.extend(f":{chain} ACCEPT [0:0]" for chain in BUILTIN[table])
            out.append("COMMIT")
    return "\n".join(out) + "\n"


def _differences(data: SnapshotData, saved: str, files: dict[str, str]) -> list[str]:
    """Which chains and files differ from the live snapshot (`table/chain`, `file NAME`)."""
    want, have = netfilter_state(data.iptables), netfilter_state(saved)
    out: list[str] = []
    for table in sorted(set(want) | set(have)):
        chains_w, chains_h = want.get(table, {}), have.get(table, {})
        out += [
            f"{table}/{c}"
            for c in sorted(set(chains_w) | set(chains_h))
            if chains_w.get(c) != chains_h.get(c)
        ]
    out += [f"file {n}" for n in _MANAGED if data.files.get(n) != files.get(n)]
    return out[:MAX_DIFFERENCES]


def _window(pending: PendingConfirm | None) -> dict[str, Any] | None:
    if pending is None:
        return None
    return {
        "version": pending.version,
        "rollback_to": pending.rollback_to,
        "deadline": pending.deadline,
        "left_s": round(max(0.0, pending.deadline - time.time()), 3),
    }


def _booted(pending: PendingConfirm) -> str:
    return f"the router restarted inside the confirm window of version {pending.version}"


def _name(version: int | None) -> str:
    return "the factory state" if version is None else f"version {version}"

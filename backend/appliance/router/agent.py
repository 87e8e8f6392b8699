"""The router appliance's fixed SSH commands: apply, confirm, show, check and boot.

Each answers ONE JSON line on stdout. Exit status: 0 done; 1 the work failed (the answer's
`error` says what happened to the router, e.g. a confirm that came after the rollback); 2 the
request was refused before anything changed (`error` and `field` name what is wrong).

    sysvm-router apply [--confirm-timeout S] [--patch]
        stdin: the bundle JSON, or with --patch a patch of the live bundle (`bundle_patch`),
        refused with field `base` when the live bundle is not the patch's base
        -> {"version", "digest", "live_digest", "expected_live_digest", "drift",
            "services": {name: "reloaded|unchanged|skipped|started|stopped"}, "iptables",
            "input": "bundle|patch", "pending_confirm",
            "confirm_deadline", "mode", "timings_ms": {...}}
    sysvm-router confirm VERSION               -> {"confirmed": VERSION, ...}
    sysvm-router show                          -> {"version", "digest", "live_digest",
            "confirmed_version", "pending_confirm": {...}|null, "last_rollback": {...}|null, ...}
    sysvm-router check                         -> {"version", "digest", "live_digest", "drift", ...}
    sysvm-router boot                          stdin: nothing, or a bundle JSON
        -> the apply answer for the last confirmed bundle (or for the bundle given), + "applied"
        (without input it waits BOOT_INPUT_GRACE seconds for a bundle to start arriving)
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backend.appliance.router.apply_errors import ApplyFailed, ApplyRefused
from backend.appliance.router.rule_tables import TablesError
from backend.appliance.router.site import RouterSite
from backend.appliance.router.state_dir import CONFIRMED
from backend.heap import HeapSettler

if TYPE_CHECKING:  # the applier (and the renderers) are imported on first use: they load slowly
    # (and the SSH server only where it serves: a forced command under sshd needs no asyncssh)
    from backend.appliance.endpoint import ApplianceEndpoints, CommandContext
    from backend.appliance.router.apply import RouterApplier

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
READ_CHUNK = 1024 * 1024
BOOT_INPUT_GRACE = 1.0
SETTLE_AFTER = 1.0
MAX_CONFIRM_TIMEOUT = 3600.0

Work = Callable[["RouterApplier"], dict[str, Any]]


class RouterAgent:
    """Serves the `sysvm-router` commands of every router on one endpoint host."""

    def __init__(self, site_of: Callable[[str], RouterSite]) -> None:
        self._site_of = site_of
        self._appliers: dict[str, RouterApplier] = {}
        self._lock = threading.Lock()
        self._settler = HeapSettler()
        self._settle_handle: asyncio.TimerHandle | None = None

    def _settle_heap(self) -> None:
        """The applier keeps the live bundle parsed (some 30 objects a rule) for the next apply.
        Left to the cycle collector, every full collection would walk all of them again, for
        nothing: 100-700 ms pauses inside later applies. So they are frozen out of its scans at
        once (what they free is still freed by reference counting), and once the appliance has
        been quiet for SETTLE_AFTER seconds the heap is settled (`HeapSettler`), which also
        frees cycles that died frozen once the frozen heap has doubled."""
        gc.freeze()
        if self._settle_handle is not None:
            self._settle_handle.cancel()
        loop = asyncio.get_running_loop()
        self._settle_handle = loop.call_later(SETTLE_AFTER, self._settler.settle)

    def applier(self, vm: str) -> RouterApplier:
        """The applier of router `vm` (a new one when its site changed, e.g. on reboot).
        Call it in a worker thread: the first call imports the renderers."""
        from backend.appliance.router.apply import RouterApplier

        site = self._site_of(vm)
        with self._lock:
            applier = self._appliers.get(vm)
            if applier is None or applier.site != site:
                applier = self._appliers[vm] = RouterApplier(site)
            return applier

    async def apply(self, ctx: CommandContext) -> int:
        def parse() -> tuple[float, bool]:
            args = list(ctx.args)
            timeout = 0.0
            patch = False
            while args:
                arg = args.pop(0)
                if arg == "--confirm-timeout" and args:
                    timeout = confirm_timeout_of(args.pop(0))
                elif arg.startswith("--confirm-timeout="):
                    timeout = confirm_timeout_of(arg.split("=", 1)[1])
                elif arg == "--patch":
                    patch = True
                else:
                    raise ApplyRefused(
                        "args",
                        f"unexpected {arg!r}; usage: apply [--confirm-timeout S] [--patch]",
                    )
            return timeout, patch

        try:
            # stdin first, always to its end: the client is still sending it when we refuse.
            text = await _read_bundle(ctx)
            timeout, patch = parse()
        except ApplyRefused as exc:
            return _refused(ctx, exc)
        return await self._run(ctx, lambda a: a.apply(text, timeout, patch=patch))

    async def confirm(self, ctx: CommandContext) -> int:
        if len(ctx.args) != 1 or not ctx.args[0].isdigit() or len(ctx.args[0]) > 19:
            return _refused(ctx, ApplyRefused("version", "usage: confirm VERSION (a number)"))
        version = int(ctx.args[0])
        return await self._run(ctx, lambda a: a.confirm(version))

    async def show(self, ctx: CommandContext) -> int:
        return await self._plain(ctx, "show", lambda a: a.show())

    async def check(self, ctx: CommandContext) -> int:
        return await self._plain(ctx, "check", lambda a: a.check())

    async def boot(self, ctx: CommandContext) -> int:
        # The bundle is optional, and a client that sends no input never closes stdin: give it
        # BOOT_INPUT_GRACE seconds to start sending one (a client that does sends it at once).
        try:
            first = await asyncio.wait_for(ctx.read(READ_CHUNK), BOOT_INPUT_GRACE)
        except TimeoutError:
            first = b""
        try:
            text = await _read_bundle(ctx, first) if first else None
        except ApplyRefused as exc:
            return _refused(ctx, exc)
        return await self._plain(ctx, "boot", lambda a: a.boot(text))

    async def boot_router(self, vm: str) -> dict[str, Any]:
        """Re-apply `vm`'s last confirmed bundle (the guest host calls this as the router boots)."""
        state = self._site_of(vm).state()
        if state.read_meta(CONFIRMED) is None and state.read_pending() is None:
            return {"version": None, "applied": False}  # a new router: nothing to re-apply
        return await asyncio.to_thread(lambda: self.applier(vm).boot())

    async def _plain(self, ctx: CommandContext, verb: str, work: Work) -> int:
        if ctx.args:
            return _refused(ctx, ApplyRefused("args", f"usage: {verb} (no arguments)"))
        return await self._run(ctx, work)

    async def _run(self, ctx: CommandContext, work: Work) -> int:
        """Run the work in a thread (it blocks on files, locks and iptables) and answer."""
        try:
            applier = await asyncio.to_thread(self.applier, ctx.vm_name)
        except ValueError as exc:  # not a router, or its site is misconfigured
            return _refused(ctx, ApplyRefused("vm", str(exc)))
        except ApplyRefused as exc:
            return _refused(ctx, exc)
        try:
            answer = await asyncio.to_thread(work, applier)
            self._settle_heap()
        except ApplyRefused as exc:
            return _refused(ctx, exc)
        except ApplyFailed as exc:
            _answer(ctx, {"error": str(exc), **exc.details})
            return EXIT_FAILED
        except (TablesError, OSError) as exc:  # the tables or the state directory let us down
            _answer(ctx, {"error": str(exc)})
            return EXIT_FAILED
        _answer(ctx, answer)
        return EXIT_OK


def register_router(
    endpoints: ApplianceEndpoints, site_of: Callable[[str], RouterSite]
) -> RouterAgent:
    """Serve the `sysvm-router` commands on every endpoint; `site_of(vm)` is where router `vm`
    lives (it raises ValueError for a VM that is not a router)."""
    agent = RouterAgent(site_of)
    endpoints.register("sysvm-router apply", agent.apply)
    endpoints.register("sysvm-router confirm", agent.confirm)
    endpoints.register("sysvm-router show", agent.show)
    endpoints.register("sysvm-router check", agent.check)
    endpoints.register("sysvm-router boot", agent.boot)
    return agent


def confirm_timeout_of(text: str) -> float:
    """A `--confirm-timeout` value: seconds, 0 (no window) up to an hour."""
    try:
        value = float(text)
    except ValueError:
        raise ApplyRefused("confirm_timeout", f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_CONFIRM_TIMEOUT:
        raise ApplyRefused("confirm_timeout", f"must be 0 to {MAX_CONFIRM_TIMEOUT:g} seconds")
    return value


async def _read_bundle(ctx: CommandContext, first: bytes = b"") -> str:
    """All of stdin (after `first`) as text; a bundle over MAX_BUNDLE_BYTES is read to its end
    and refused."""
    data = bytearray(first)
    size = len(first)
    while chunk := await ctx.read(READ_CHUNK):
        size += len(chunk)
        if size <= MAX_BUNDLE_BYTES:
            data += chunk
    if size > MAX_BUNDLE_BYTES:
        raise ApplyRefused("bundle", f"longer than {MAX_BUNDLE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApplyRefused("bundle", f"is not UTF-8: {exc}") from None


def _refused(ctx: CommandContext, exc: ApplyRefused) -> int:
    _answer(ctx, {"error": str(exc), "field": exc.field, "message": exc.reason, **exc.details})
    return EXIT_REFUSED


def _answer(ctx: CommandContext, answer: dict[str, Any]) -> None:
    ctx.write(json.dumps(answer, separators=(",", ":")) + "\n")

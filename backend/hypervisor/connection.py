"""One libvirt connection per host, every blocking call in that host's own thread.

libvirt calls block (an unanswering host froze a whole asyncio loop here), so no call runs on
the loop; each host has a one-thread executor, so one dead host never stalls the others.
Lifecycle events arrive on the loop through libvirtaio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt

from backend.errors import SysvmError
from backend.hypervisor import event_loop

log = logging.getLogger(__name__)
T = TypeVar("T")

LifecycleCallback = Callable[[int, str, int, int], None]
_registered_loop: asyncio.AbstractEventLoop | None = None

# libvirt domain states, by number (virDomainState)
DOMAIN_STATES = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}


THREADS_PER_HOST = 4
_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
}


class HypervisorError(SysvmError):
    """A libvirt call on a host failed; the message names the host and the call."""

    code = "hypervisor"


def _noop() -> None:
    """Nothing: used to start an executor's thread."""


def register_event_loop() -> None:
    """Route libvirt's events through the running asyncio loop (once per loop)."""
    global _registered_loop
    loop = asyncio.get_running_loop()
    if _registered_loop is loop:
        return
    if _registered_loop is not None:
        # libvirt takes one event implementation per process, for the life of the process.
        raise HypervisorError(
            "libvirt events are bound to another asyncio loop of this process; "
            "run the engine in one loop per process"
        )
    event_loop.register(loop)
    _registered_loop = loop


def _silence_libvirt(_ctx: Any, _err: Any) -> None:
    """libvirt prints errors to stderr by default; we report them as exceptions instead."""


libvirt.registerErrorHandler(_silence_libvirt, None)


class HostConnection:
    def __init__(
        self, host_id: int, name: str, uri: str, on_lifecycle: LifecycleCallback | None = None
    ) -> None:
        self.host_id = host_id
        self.name = name
        self.uri = uri
        self._on_lifecycle = on_lifecycle
        # A few threads per host (libvirt connections are thread-safe): a health check never
        # queues behind a slow domain start; a host that hangs ties up only its own threads.
        self._executor = ThreadPoolExecutor(THREADS_PER_HOST, thread_name_prefix=f"libvirt-{name}")
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._open_lock = asyncio.Lock()
        self.call_timeout = 30.0
        # Set by the lab's `host-down`: every call fails as if the host stopped answering.
        self.simulated_outage = ""
        self._failures = 0
        self._next_open_at = 0.0

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        """Connect (once); after a failure, retry no sooner than an exponential backoff allows."""
        async with self._open_lock:
            if self._conn is not None:
                return
            loop = asyncio.get_running_loop()
            wait = self._next_open_at - loop.time()
            if wait > 0:
                raise HypervisorError(
                    f"host {self.name}: cannot connect to {self.uri} (next attempt in {wait:.1f} s)"
                )
            register_event_loop()
            # Start this host's thread from a helper thread: starting a thread waits for it to
            # run, and that wait must not happen on the event loop.
            await asyncio.to_thread(lambda: [f.result() for f in [self._executor.submit(_noop)]])
            try:
                conn = await asyncio.wait_for(
                    self._in_thread(libvirt.open, self.uri), self.call_timeout
                )
            except (libvirt.libvirtError, TimeoutError) as exc:
                self._failures += 1
                self._next_open_at = loop.time() + min(0.5 * 2**self._failures, 30.0)
                why = (
                    exc.get_error_message()
                    if isinstance(exc, libvirt.libvirtError)
                    else f"no answer within {self.call_timeout} s"
                )
                raise HypervisorError(
                    f"host {self.name}: cannot connect to {self.uri}: {why}"
                ) from exc
            self._failures = 0
            if not self.uri.startswith("test:"):
                # Remote and daemon connections: notice a dead peer within ~15 s.
                await self._in_thread(conn.setKeepAlive, 5, 3)
            if self._on_lifecycle is not None:
                self._callback_id = await self._in_thread(
                    conn.domainEventRegisterAny,
                    None,
                    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    self._lifecycle,
                    None,
                )
            self._conn = conn

    def _lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if self._on_lifecycle is not None:
            self._on_lifecycle(self.host_id, dom.name(), event, detail)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:

            def _close() -> None:
                try:
                    if self._callback_id is not None:
                        conn.domainEventDeregisterAny(self._callback_id)
                    conn.close()
                except libvirt.libvirtError:
                    pass

            await self._in_thread(_close)
        self._executor.shutdown(wait=False)

    async def call(
        self, what: str, fn: Callable[[libvirt.virConnect], T], *, timeout: float | None = None
    ) -> T:
        """Run `fn(conn)` in this host's thread, bounded by a timeout; libvirt errors become
        HypervisorError. A broken connection is dropped and reopened by a later call."""
        if self.simulated_outage:
            raise HypervisorError(f"host {self.name}: {what}: {self.simulated_outage}")
        await self.open()
        conn = self._conn
        assert conn is not None
        limit = timeout if timeout is not None else self.call_timeout
        try:
            return await asyncio.wait_for(self._in_thread(fn, conn), limit)
        except TimeoutError as exc:
            raise HypervisorError(f"host {self.name}: {what}: no answer within {limit} s") from exc
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _CONNECTION_ERRORS:
                self._conn = None  # reopened (with backoff) by the next call
            raise HypervisorError(f"host {self.name}: {what}: {exc.get_error_message()}") from exc

    async def define_and_start(self, name: str, xml: str) -> None:
        def work(conn: libvirt.virConnect) -> None:
            dom = conn.defineXML(xml)
            if not dom.isActive():
                dom.create()

        await self.call(f"define and start {name}", work)

    async def start(self, name: str) -> None:
        def work(conn: libvirt.virConnect) -> None:
            dom = conn.lookupByName(name)
            if not dom.isActive():
                dom.create()

        await self.call(f"start {name}", work)

    async def destroy(self, name: str, *, undefine: bool = False) -> None:
        """Power off at once (and forget the definition with `undefine`); absent is fine."""

        def work(conn: libvirt.virConnect) -> None:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return
                raise
            if dom.isActive():
                dom.destroy()
            if undefine:
                dom.undefine()

        await self.call(f"destroy {name}", work)

    async def shutdown(self, name: str, *, timeout: float) -> None:
        """Ask the guest to shut down, wait up to `timeout` s, then power it off; absent is fine."""

        def ask(conn: libvirt.virConnect) -> bool:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise
            if not dom.isActive():
                return False
            if timeout > 0:
                dom.shutdown()
            return True

        if not await self.call(f"shut down {name}", ask):
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            states = await self.domain_states()
            if states.get(name, "shutoff") == "shutoff":
                return
            await asyncio.sleep(0.2)
        await self.destroy(name)

    async def reboot(self, name: str) -> None:
        await self.call(f"reboot {name}", lambda conn: conn.lookupByName(name).reboot(0))

    async def ping(self, timeout: float) -> None:
        """A cheap round trip proving the host answers."""
        await self.call("ping", lambda conn: conn.getLibVersion(), timeout=timeout)

    async def domain_states(self) -> dict[str, str]:
        """Every domain of the host and its libvirt state name."""

        def work(conn: libvirt.virConnect) -> dict[str, str]:
            return {
                d.name(): DOMAIN_STATES.get(d.state()[0], "nostate") for d in conn.listAllDomains()
            }

        return await self.call("list domains", work)

    async def domain_xml(self, name: str) -> str:
        return await self.call(f"read {name}", lambda conn: conn.lookupByName(name).XMLDesc())

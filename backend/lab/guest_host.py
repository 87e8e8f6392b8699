"""The lab's guest host: ONE process serving the SSH endpoints of every local system VM.

The engine starts it (`python -m backend.lab.guest_host PUBKEY_FILE`) and drives it with JSON
lines on stdin; each request gets one JSON line back on stdout with the same id:

    {"id": 1, "op": "boot", "vm": "s-1-VM", "host_key": "<openssh private key>",
     "boot_args": {...}, "delay": 0.0}            -> {"id": 1, "port": 40123}
        optional: "store_root" (an SSVM's image store); for a router (boot_args type=router)
        "router_root" (the directory keeping its configs and applier state; default a temp dir
        per VM kept while this process lives), "netns" (run its iptables in that network
        namespace instead of recording them) and "iptables" (iptables|iptables-legacy|iptables-nft).
    {"id": 2, "op": "halt", "vm": "s-1-VM"}       -> {"id": 2, "ok": true}
    {"id": 3, "op": "ping"}                       -> {"id": 3, "ok": true, "vms": 12}
    any failure                                   -> {"id": N, "error": "message"}

Keeping the guests out of the engine's process keeps their SSH server work (key exchange,
host key signatures) off the engine's event loop, as real system VMs would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from backend.appliance.endpoint import ApplianceEndpoints
from backend.appliance.router.agent import register_router
from backend.appliance.router.site import RouterSite
from backend.appliance.secstorage.agent import register_secstorage

log = logging.getLogger(__name__)


class GuestHost:
    def __init__(self, authorized_key: str) -> None:
        self.endpoints = ApplianceEndpoints(authorized_key)
        self._booting: dict[str, asyncio.Task[int]] = {}
        self._store_roots: dict[str, Path] = {}
        self._router_sites: dict[str, RouterSite] = {}
        self._router_temp: Path | None = None
        # SSVM guests serve the secondary storage agent on their zone's image store.
        register_secstorage(self.endpoints, self._store_root)
        # Router guests serve the router applier on their own state directory.
        self.routers = register_router(self.endpoints, self._router_site)

    def _store_root(self, vm: str) -> Path:
        root = self._store_roots.get(vm)
        if root is None:
            raise ValueError(f"{vm} has no image store mounted (not a secondary storage VM)")
        return root

    def _router_site(self, vm: str) -> RouterSite:
        site = self._router_sites.get(vm)
        if site is None:
            raise ValueError(f"{vm} is not a router")
        return site

    def _router_site_of(self, name: str, req: dict[str, Any]) -> RouterSite:
        """Where a booting router keeps its state: `router_root`, else a temp dir of its own."""
        if req.get("router_root"):
            root = Path(str(req["router_root"]))
        else:
            if self._router_temp is None:
                self._router_temp = Path(tempfile.mkdtemp(prefix="sysvm-routers-"))
            root = self._router_temp / name
        netns = req.get("netns")
        return RouterSite(
            root,
            str(netns) if netns else None,
            str(req.get("iptables") or "iptables"),
        )

    def close(self) -> None:
        """Remove the routers' temporary state directories."""
        if self._router_temp is not None:
            shutil.rmtree(self._router_temp, ignore_errors=True)
            self._router_temp = None

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "boot":
            return {"port": await self._boot(req)}
        if op == "halt":
            await self._halt(str(req["vm"]))
            return {"ok": True}
        if op == "halt_all":
            for name in list(self._booting):
                await self._halt(name)
            await self.endpoints.stop_all()
            return {"ok": True}
        if op == "ping":
            return {"ok": True, "vms": len(self.endpoints._endpoints)}  # noqa: SLF001
        raise ValueError(f"unknown op {op!r}")

    async def _boot(self, req: dict[str, Any]) -> int:
        name = str(req["vm"])
        if req.get("store_root"):
            self._store_roots[name] = Path(str(req["store_root"]))
        port = self.endpoints.port_of(name)
        if port is not None:
            return port
        task = self._booting.get(name)
        if task is None:
            boot_args = dict(req.get("boot_args") or {})
            if boot_args.get("type") == "router":
                self._router_sites[name] = self._router_site_of(name, req)

            async def boot() -> int:
                await asyncio.sleep(float(req.get("delay", 0.0)))
                if name in self._router_sites:
                    await self._boot_router(name)
                return await self.endpoints.start(
                    name, str(req["host_key"]), boot_args=dict(req.get("boot_args") or {})
                )

            task = asyncio.create_task(boot(), name=f"boot-{name}")
            self._booting[name] = task
            task.add_done_callback(functools.partial(self._booted, name))
        return await asyncio.shield(task)

    async def _boot_router(self, name: str) -> None:
        """What a router does as it starts: re-apply its last confirmed bundle (if it has one)."""
        try:
            await self.routers.boot_router(name)
        except Exception as exc:  # the router still comes up; the engine re-pushes its bundle
            log.warning("router %s could not re-apply its last confirmed bundle: %s", name, exc)

    def _booted(self, name: str, _task: asyncio.Task[int]) -> None:
        self._booting.pop(name, None)

    async def _halt(self, name: str) -> None:
        task = self._booting.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.endpoints.stop(name)


async def serve(authorized_key: str) -> None:
    host = GuestHost(authorized_key)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    tasks: set[asyncio.Task[None]] = set()

    async def one(req: dict[str, Any]) -> None:
        try:
            reply = await host.handle(req)
        except asyncio.CancelledError:
            reply = {"error": "cancelled"}
        except Exception as exc:  # every failure is answered, never fatal to the other guests
            reply = {"error": str(exc) or type(exc).__name__}
        reply["id"] = req.get("id")
        out.write(json.dumps(reply) + "\n")
        out.flush()

    while line := await reader.readline():
        try:
            req = json.loads(line)
        except ValueError:
            continue
        task = asyncio.create_task(one(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    # the engine went away: so do its guests
    await host.endpoints.stop_all()
    host.close()


GUEST_NICENESS = 10
"""The lab's guests stand for VMs on other machines: on this one they yield the CPU to the
engine, whose event loop would otherwise wait for a core while 8 transfers hash and write."""


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with contextlib.suppress(OSError):
        os.nice(GUEST_NICENESS)
    key = Path(sys.argv[1]).read_text()
    asyncio.run(serve(key))


if __name__ == "__main__":
    main()

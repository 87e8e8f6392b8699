"""The `local` back end's guests: each system VM's "operating system" is an SSH endpoint on loopback,
served by one lab guest-host process (`backend.lab.guest_host`) for all of them.

Each endpoint has the host key generated for its VM at provisioning. A guest "boots"
`lab.boot_delay` seconds after its domain starts; halting it stops the endpoint, which is how a
guest crash looks from the engine. If the guest host process dies, every guest is gone with it
(their ports are forgotten) and the next boot starts a new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

from backend.db.models import SystemVM
from backend.errors import SysvmError
from backend.lab.guest_boots import GuestBoots

log = logging.getLogger(__name__)


class GuestHostGone(SysvmError):
    """The lab's guest host process is not running."""


class LocalGuests:
    def __init__(self, public_key_file: Path, *, boot_delay: float = 0.0, log_file: Path) -> None:
        self.public_key_file = public_key_file
        self.boot_delay = boot_delay
        self.log_file = log_file
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._ports: dict[str, int] = {}
        self._booting = GuestBoots()
        self._spawn_lock = asyncio.Lock()

    async def _process(self) -> asyncio.subprocess.Process:
        async with self._spawn_lock:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "ab") as err:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "backend.lab.guest_host",
                    str(self.public_key_file),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    limit=2**20,
                )
            self._reader = asyncio.create_task(self._read(self._proc), name="guest-host-reader")
            log.info("lab guest host started (pid %d)", self._proc.pid)
            return self._proc

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            fut = self._pending.pop(reply.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
        # EOF: the guest host is gone, and every guest with it
        self._ports.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(GuestHostGone("the lab guest host process exited"))
        self._pending.clear()

    async def _request(self, **req: Any) -> dict[str, Any]:
        proc = await self._process()
        assert proc.stdin is not None
        req["id"] = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req["id"]] = fut
        proc.stdin.write((json.dumps(req) + "\n").encode())
        await proc.stdin.drain()
        reply = await fut
        if "error" in reply:
            raise SysvmError(f"lab guest host: {req['op']} {req.get('vm', '')}: {reply['error']}")
        return reply

    async def boot(self, vm: SystemVM, *, store_root: str | None = None) -> None:
        """Start the guest: its SSH endpoint answers after the boot delay (in the background).
        `store_root` is the image store an SSVM's guest mounts."""
        if vm.name in self._ports or vm.name in self._booting:
            return
        name, key, args = vm.name, vm.host_key_private, dict(vm.boot_args)

        async def _boot() -> None:
            reply = await self._request(
                op="boot",
                vm=name,
                host_key=key,
                boot_args=args,
                delay=self.boot_delay,
                store_root=store_root,
            )
            self._ports[name] = int(reply["port"])

        self._booting.start(name, _boot)

    async def halt(self, vm: SystemVM) -> None:
        await self._booting.cancel(vm.name)
        self._ports.pop(vm.name, None)
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(SysvmError):
                await self._request(op="halt", vm=vm.name)

    def ssh_endpoint(self, vm: SystemVM) -> tuple[str, int] | None:
        """Where the engine reaches this VM's sshd: loopback and its port (None while booting)."""
        port = self._ports.get(vm.name)
        return None if port is None else ("127.0.0.1", port)

    async def stop_all(self) -> None:
        await self._booting.cancel_all()
        self._ports.clear()
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # EOF: the guest host stops every endpoint and exits
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

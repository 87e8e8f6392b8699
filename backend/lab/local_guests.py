"""The `local` back end's guests: each system VM's "operating system" is an SSH endpoint on loopback.

One process (the engine's) hosts every endpoint, each with the host key generated for its VM at
provisioning. A guest "boots" `lab.boot_delay` seconds after its domain starts; halting it stops
the endpoint, which is how a guest crash looks from the engine.
"""

from __future__ import annotations

import asyncio
import contextlib

from backend.appliance.endpoint import ApplianceEndpoints
from backend.db.models import SystemVM


class LocalGuests:
    def __init__(self, authorized_client_key: str, *, boot_delay: float = 0.0) -> None:
        self.endpoints = ApplianceEndpoints(authorized_client_key)
        self.boot_delay = boot_delay
        self._booting: dict[str, asyncio.Task[None]] = {}

    async def boot(self, vm: SystemVM) -> None:
        """Start the guest: its SSH endpoint answers after the boot delay (in the background)."""
        if self.endpoints.is_running(vm.name) or vm.name in self._booting:
            return

        async def _boot() -> None:
            try:
                await asyncio.sleep(self.boot_delay)
                await self.endpoints.start(vm.name, vm.host_key_private, boot_args=vm.boot_args)
            finally:
                self._booting.pop(vm.name, None)

        self._booting[vm.name] = asyncio.create_task(_boot(), name=f"boot-{vm.name}")

    async def halt(self, vm: SystemVM) -> None:
        task = self._booting.pop(vm.name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.endpoints.stop(vm.name)

    def ssh_endpoint(self, vm: SystemVM) -> tuple[str, int] | None:
        """Where the engine reaches this VM's sshd: loopback and its port (None while booting)."""
        port = self.endpoints.port_of(vm.name)
        return None if port is None else ("127.0.0.1", port)

    async def stop_all(self) -> None:
        for task in list(self._booting.values()):
            task.cancel()
        await asyncio.gather(*self._booting.values(), return_exceptions=True)
        self._booting.clear()
        await self.endpoints.stop_all()

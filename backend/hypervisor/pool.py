"""The engine's libvirt connections, one per host."""

from __future__ import annotations

import asyncio

import libvirt

from backend.errors import NotFound
from backend.hypervisor.connection import HostConnection, LifecycleCallback


class HypervisorPool:
    def __init__(self, on_lifecycle: LifecycleCallback | None = None) -> None:
        self._hosts: dict[int, HostConnection] = {}
        self._on_lifecycle = on_lifecycle

    def add(self, host_id: int, name: str, uri: str) -> HostConnection:
        """Register a host (connected lazily, on first call); re-adding the same URI is a no-op."""
        existing = self._hosts.get(host_id)
        if existing is not None and existing.uri == uri:
            return existing
        conn = HostConnection(host_id, name, uri, self._on_lifecycle)
        self._hosts[host_id] = conn
        return conn

    @property
    def known(self) -> set[int]:
        """Ids of the hosts registered so far."""
        return set(self._hosts)

    def get(self, host_id: int) -> HostConnection:
        conn = self._hosts.get(host_id)
        if conn is None:
            raise NotFound(f"host {host_id} has no hypervisor connection")
        return conn

    async def migrate(self, name: str, source_id: int, target_id: int, target_xml: str) -> None:
        """Move a running domain between hosts: libvirt live migration between daemons; on
        test-driver hosts (separate in-process instances) define and start on the target, then
        remove the source copy."""
        source, target = self.get(source_id), self.get(target_id)
        if source.uri.startswith("test:") or target.uri.startswith("test:"):
            await target.define_and_start(name, target_xml)
            await source.destroy(name, undefine=True)
            return
        await target.open()
        dconn = target._conn

        def live(conn: libvirt.virConnect) -> None:
            flags = (
                libvirt.VIR_MIGRATE_LIVE
                | libvirt.VIR_MIGRATE_PERSIST_DEST
                | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            )
            conn.lookupByName(name).migrate3(
                dconn, {libvirt.VIR_MIGRATE_PARAM_DEST_XML: target_xml}, flags
            )

        await source.call(f"migrate {name} to {target.name}", live, timeout=600)

    async def remove(self, host_id: int) -> None:
        conn = self._hosts.pop(host_id, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        conns, self._hosts = list(self._hosts.values()), {}
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

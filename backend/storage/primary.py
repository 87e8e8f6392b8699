"""Templates on primary storage: copied once per host pool on a guest VM's first start from it.

On a real libvirtd the template is uploaded into the host's `dir` pool through a libvirt storage
stream (`virStorageVol.upload`), with progress, and each guest VM gets a copy-on-write qcow2
volume backed by it. libvirt's test driver has no upload streams, so on lab test hosts the copy
is recorded and the job says plainly that nothing was copied.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db.models import Host, PrimaryStorage, Template, TemplateCopy, TemplateState
from backend.errors import Conflict, NotFound, SysvmError

if TYPE_CHECKING:
    from backend.engine.core import Engine

Progress = Callable[[float, str, int, int], Awaitable[None]]
CHUNK = 4 * 2**20
EXT = {"QCOW2": "qcow2", "RAW": "raw", "ISO": "iso"}
RECORDED = "recorded"
COPIED = "copied"


def qemu_owner(capabilities_xml: str) -> tuple[int, int] | None:
    """The uid:gid QEMU runs as on that host (its DAC base label), if the host says."""
    caps = ET.fromstring(capabilities_xml)
    for label in caps.iterfind("./host/secmodel/baselabel[@type='kvm']"):
        text = (label.text or "").replace("+", "")
        if ":" in text:
            uid, gid = text.split(":", 1)
            if uid.isdigit() and gid.isdigit():
                return int(uid), int(gid)
    return None


def _volume_xml(
    name: str,
    size: int,
    fmt: str,
    backing: tuple[str, str] | None = None,
    owner: tuple[int, int] | None = None,
) -> str:
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", {"unit": "bytes"}).text = str(size)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", {"type": fmt})
    if owner is not None:
        # QEMU's user owns the volume, so the domain can open it whatever the security driver
        perms = ET.SubElement(target, "permissions")
        ET.SubElement(perms, "mode").text = "0600"
        ET.SubElement(perms, "owner").text = str(owner[0])
        ET.SubElement(perms, "group").text = str(owner[1])
    if backing is not None:
        store = ET.SubElement(vol, "backingStore")
        ET.SubElement(store, "path").text = backing[0]
        ET.SubElement(store, "format", {"type": backing[1]})
    return ET.tostring(vol, encoding="unicode")


def _pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", {"type": "dir"})
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = path
    return ET.tostring(pool, encoding="unicode")


class PrimaryStorageCopies:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._locks: dict[tuple[int, int], asyncio.Lock] = {}

    async def ensure(
        self, template_id: int, host: Host, progress: Progress | None = None
    ) -> dict[str, Any]:
        """The template on `host`'s primary pool: {state: copied|recorded, path, volume, cached}."""
        async with self._locks.setdefault((template_id, host.id), asyncio.Lock()):
            async with self.engine.db.read() as s:
                copy = (
                    await s.scalars(
                        select(TemplateCopy).where(
                            TemplateCopy.template_id == template_id, TemplateCopy.host_id == host.id
                        )
                    )
                ).first()
                if copy is not None:
                    return {
                        "state": copy.state,
                        "path": copy.path,
                        "volume": copy.volume,
                        "cached": True,
                    }
                t = await s.get(Template, template_id)
                if t is None:
                    raise NotFound(f"template {template_id} does not exist")
                if t.state not in (TemplateState.DOWNLOADED.value, TemplateState.UPLOADED.value):
                    raise Conflict(f"template {t.name} is {t.state}; it must be DOWNLOADED first")
                pool = (
                    await s.scalars(
                        select(PrimaryStorage).where(PrimaryStorage.zone_id == host.zone_id)
                    )
                ).first()
                if pool is None:
                    raise Conflict("the zone has no primary storage; add one")
            volume = f"template-{t.id}.{EXT[t.format]}"
            if host.uri.startswith("test:"):
                path, state = "", RECORDED
                if progress:
                    await progress(
                        100.0,
                        f"copy of {t.name} to {pool.pool_name} recorded, not performed: "
                        f"{host.name} is a lab test host (libvirt's test driver has no upload streams)",
                        0,
                        0,
                    )
            else:
                path = await self._upload(host, pool, volume, t, progress)
                state = COPIED

            async def work(s: AsyncSession) -> None:
                s.add(
                    TemplateCopy(
                        template_id=t.id,
                        host_id=host.id,
                        pool_name=pool.pool_name,
                        volume=volume,
                        path=path,
                        size=t.size,
                        state=state,
                    )
                )

            await self.engine.db.write(work)
            self.engine.bus.publish(
                "template", t.id, "updated", t.name, copied_to=host.name, copy_state=state
            )
            return {"state": state, "path": path, "volume": volume, "cached": False}

    async def _upload(
        self, host: Host, pool: PrimaryStorage, volume: str, t: Template, progress: Progress | None
    ) -> str:
        source = Path(t.install_path)
        if not source.is_file():
            raise SysvmError(f"template {t.name}: {source} is missing from secondary storage")
        size = source.stat().st_size
        conn = self.engine.hypervisors.get(host.id)
        Path(pool.path).mkdir(parents=True, exist_ok=True)

        def prepare(c: libvirt.virConnect) -> tuple[Any, Any, str] | str:
            try:
                p = c.storagePoolLookupByName(pool.pool_name)
            except libvirt.libvirtError:
                p = c.storagePoolDefineXML(_pool_xml(pool.pool_name, pool.path), 0)
            if not p.isActive():
                p.create(0)
            p.refresh(0)
            try:
                return str(p.storageVolLookupByName(volume).path())  # already there: cached
            except libvirt.libvirtError:
                pass
            fmt = "qcow2" if t.format == "QCOW2" else "raw"
            owner = qemu_owner(c.getCapabilities())
            vol = p.createXML(_volume_xml(volume, size, fmt, owner=owner), 0)
            stream = c.newStream(0)
            vol.upload(stream, 0, size, 0)
            return vol, stream, str(vol.path())

        prepared = await conn.call(f"prepare {volume} in {pool.pool_name}", prepare)
        if isinstance(prepared, str):
            return prepared
        vol, stream, path = prepared
        sent = 0
        try:
            with source.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, CHUNK):

                    def send(_c: libvirt.virConnect, data: bytes = chunk) -> None:
                        view = memoryview(data)
                        while view:
                            n = stream.send(bytes(view))
                            view = view[n:]

                    await conn.call(f"upload {volume}", send, timeout=120)
                    sent += len(chunk)
                    if progress:
                        await progress(
                            100.0 * sent / size,
                            f"copying {t.name} to {pool.pool_name} on {host.name}",
                            sent,
                            size,
                        )
            await conn.call(f"finish upload of {volume}", lambda _c: stream.finish())
        except BaseException:

            def undo(_c: libvirt.virConnect) -> None:
                try:
                    stream.abort()
                finally:
                    vol.delete(0)

            await asyncio.shield(conn.call(f"remove partial {volume}", undo))
            raise
        return path

    async def root_disk(
        self, host: Host, template_path: str, template_format: str, vm_name: str
    ) -> str:
        """A copy-on-write qcow2 volume for one VM, backed by the template on the pool."""
        conn = self.engine.hypervisors.get(host.id)
        async with self.engine.db.read() as s:
            pool = (
                await s.scalars(
                    select(PrimaryStorage).where(PrimaryStorage.zone_id == host.zone_id)
                )
            ).first()
        assert pool is not None
        name = f"{vm_name}-root.qcow2"

        def make(c: libvirt.virConnect) -> str:
            p = c.storagePoolLookupByName(pool.pool_name)
            try:
                return str(p.storageVolLookupByName(name).path())
            except libvirt.libvirtError:
                pass
            backing_fmt = "qcow2" if template_format == "QCOW2" else "raw"
            size = Path(template_path).stat().st_size if backing_fmt == "raw" else 0
            if backing_fmt == "qcow2":
                # capacity of a qcow2 overlay: the template's virtual size (libvirt reads it)
                size = int(p.storageVolLookupByName(Path(template_path).name).info()[1])
            owner = qemu_owner(c.getCapabilities())
            xml = _volume_xml(name, size, "qcow2", (template_path, backing_fmt), owner=owner)
            return str(p.createXML(xml, 0).path())

        return await conn.call(f"create root disk of {vm_name}", make)

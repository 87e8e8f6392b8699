"""Template transfers: register from a URL or upload a local file, through a zone's SSVM.

The engine picks the least-loaded Running SSVM of the zone (waiting, with the reason visible,
while there is none), sends it one fixed command with a JSON request on stdin, and records the
progress lines it streams back (throttled). If the SSVM dies mid-transfer the transfer goes on
from the bytes already written on the replacement (the agent resumes with HTTP Range); a
failure says why; a cancel stops it at once, ABANDONED, leaving nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.appliance.secstorage.checksum import ChecksumSyntaxError, parse_checksum
from backend.db.models import (
    ImageStore,
    SystemVM,
    SystemVMType,
    Template,
    TemplateFormat,
    TemplateState,
    TemplateTransfer,
    VMState,
    Zone,
)
from backend.engine.jobs import JobContext
from backend.errors import Conflict, InvalidInput, NotFound, SysvmError
from backend.transport.ssh import CommandFailed, TransportError

if TYPE_CHECKING:
    from backend.engine.core import Engine

log = logging.getLogger(__name__)

ACTIVE = (TemplateState.DOWNLOAD_IN_PROGRESS.value, TemplateState.UPLOAD_IN_PROGRESS.value)
MAX_URL = 2048
MAX_BYTES = 50 * 2**30
CHUNK = 1 << 20


def redact(url: str) -> str:
    """The URL without credentials, for logs, events and screens."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def check_url(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidInput("url", "must be a non-empty string")
    if len(url) > MAX_URL:
        raise InvalidInput("url", f"is longer than {MAX_URL} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise InvalidInput("url", "must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(
            "url", f"only http and https are allowed, got {parts.scheme or 'none'!r}"
        )
    if not parts.hostname:
        raise InvalidInput("url", "has no host")
    return url


def check_format(fmt: object) -> str:
    if not isinstance(fmt, str) or fmt.upper() not in TemplateFormat.__members__:
        raise InvalidInput("format", f"must be one of QCOW2, RAW, ISO, got {fmt!r}")
    return fmt.upper()


def check_checksum(value: object) -> str | None:
    try:
        parsed = parse_checksum(value)
    except ChecksumSyntaxError as exc:
        raise InvalidInput("checksum", str(exc)) from exc
    return str(parsed) if parsed is not None else None


def template_name(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise InvalidInput("name", "must be 1 to 64 characters")
    if (
        not all(c.isascii() and (c.isalnum() or c in "._-") for c in value)
        or not value[0].isalnum()
    ):
        raise InvalidInput(
            "name", f"{value!r}: use letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return value


class TemplateTransfers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- requests --------------------------------------------------------------------------

    async def register(
        self,
        zone: str,
        name: str,
        *,
        url: str | None = None,
        path: str | None = None,
        fmt: str,
        checksum: str | None,
    ) -> tuple[int, str]:
        """Record the template and its transfer (nothing half-made on bad input); returns
        (template id, job kind)."""
        template_name(name)
        fmt = check_format(fmt)
        checksum = check_checksum(checksum)
        if url is not None:
            check_url(url)
            direction = "download"
        else:
            assert path is not None
            source = Path(path)
            if not source.is_file():
                raise InvalidInput("file", f"{path} is not a readable file")
            direction = "upload"

        async def work(s: AsyncSession) -> int:
            zone_row = (await s.scalars(select(Zone).where(Zone.name == zone))).first()
            if zone_row is None:
                raise NotFound(f"no zone named {zone!r}")
            if (
                await s.scalar(
                    select(Template.id).where(
                        Template.zone_id == zone_row.id, Template.name == name
                    )
                )
                is not None
            ):
                raise Conflict(f"zone {zone} already has a template named {name!r}")
            template = Template(
                zone_id=zone_row.id,
                name=name,
                account="admin",
                format=fmt,
                url=url or "",
                checksum=checksum or "",
                state=(
                    TemplateState.NOT_DOWNLOADED.value
                    if direction == "download"
                    else TemplateState.NOT_UPLOADED.value
                ),
            )
            s.add(template)
            await s.flush()
            s.add(
                TemplateTransfer(
                    template_id=template.id,
                    zone_id=zone_row.id,
                    direction=direction,
                    state=template.state,
                    reason="queued",
                )
            )
            return template.id

        template_id = await self.engine.db.write(work)
        state = (
            TemplateState.NOT_DOWNLOADED if direction == "download" else TemplateState.NOT_UPLOADED
        )
        self.engine.bus.publish(
            "template", template_id, "created", name, zone=zone, state=state.value, format=fmt
        )
        return template_id, f"template.{direction}"

    async def list(self, zone: str | None = None) -> list[dict[str, Any]]:
        async with self.engine.db.read() as s:
            q = (
                select(Template, Zone.name, TemplateTransfer)
                .join(Zone, Zone.id == Template.zone_id)
                .outerjoin(TemplateTransfer, TemplateTransfer.template_id == Template.id)
                .order_by(Template.id)
            )
            if zone:
                q = q.where(Zone.name == zone)
            rows = (await s.execute(q)).all()
            ssvms = {v.id: v.name for v in (await s.scalars(select(SystemVM))).all()}
        out = []
        for t, zone_name, tr in rows:
            out.append(
                {
                    "id": t.id,
                    "name": t.name,
                    "zone": zone_name,
                    "format": t.format,
                    "state": t.state,
                    "url": redact(t.url),
                    "checksum": t.checksum,
                    "size": t.size,
                    "virtual_size": t.virtual_size,
                    "system": t.is_system,
                    "error": t.error,
                    "transfer": None
                    if tr is None
                    else {
                        "state": tr.state,
                        "bytes_done": tr.bytes_done,
                        "bytes_total": tr.bytes_total,
                        "ssvm": ssvms.get(tr.ssvm_id) if tr.ssvm_id else None,
                        "reason": tr.reason,
                        "job_id": tr.job_id,
                    },
                }
            )
        return out

    async def id_of(self, zone: str, name: str) -> int:
        async with self.engine.db.read() as s:
            template_id = await s.scalar(
                select(Template.id)
                .join(Zone, Zone.id == Template.zone_id)
                .where(Zone.name == zone, Template.name == name)
            )
        if template_id is None:
            raise NotFound(f"no template named {name!r} in zone {zone}")
        return int(template_id)

    async def delete(self, ctx: JobContext) -> dict[str, Any]:
        """Remove the template's files through a Running SSVM, then its record."""
        template_id = int(ctx.params["template_id"])
        async with self.engine.db.read() as s:
            t = await s.get(Template, template_id)
            if t is None:
                return {"deleted": False}
            busy = await s.scalar(
                select(TemplateTransfer.id).where(
                    TemplateTransfer.template_id == template_id, TemplateTransfer.state.in_(ACTIVE)
                )
            )
        if t.is_system:
            raise Conflict(f"{t.name} is the system VM template; it cannot be deleted")
        if busy is not None:
            raise Conflict(f"{t.name} is being transferred; cancel the transfer first")
        ssvm, _root = await self._wait_for_ssvm(ctx, template_id)
        endpoint = self.engine.guests.ssh_endpoint(ssvm)
        if endpoint is None:
            raise SysvmError(f"{ssvm.name} does not answer; try again")
        result = await self.engine.transport.run(
            endpoint[0],
            endpoint[1],
            ssvm.host_key_public,
            "sysvm-secstorage delete",
            stdin=json.dumps({"dest": f"template/tmpl/{t.account}/{t.id}"}),
        )
        if result.exit_status != 0:
            why = result.stdout.strip() or result.stderr.strip()
            raise SysvmError(f"{ssvm.name} could not delete {t.name}: {why}")

        async def work(s: AsyncSession) -> None:
            row = await s.get(Template, template_id)
            if row is not None:
                await s.delete(row)

        await self.engine.db.write(work)
        self.engine.bus.publish("template", template_id, "deleted", t.name)
        return {"deleted": True}

    # -- the job ---------------------------------------------------------------------------

    async def run(self, ctx: JobContext) -> dict[str, Any]:
        template_id = int(ctx.params["template_id"])
        direction = ctx.params["direction"]
        await self._update(template_id, transfer={"job_id": ctx.job_id})
        losses = 0
        try:
            while True:
                ssvm, root = await self._wait_for_ssvm(ctx, template_id)
                try:
                    return await self._attempt(ctx, template_id, direction, ssvm, root)
                except _SsvmLost as lost:
                    losses += 1
                    if losses > 5:
                        raise SysvmError(f"lost the SSVM {losses} times; last: {lost}") from lost
                    await self._update(
                        template_id,
                        transfer={
                            "reason": f"{ssvm.name} was lost ({lost}); resuming on a Running SSVM"
                        },
                    )
                    await ctx.progress(message="SSVM lost; resuming", force=True)
        except asyncio.CancelledError:
            await self._abandon(template_id, direction)
            raise

    async def _wait_for_ssvm(self, ctx: JobContext, template_id: int) -> tuple[SystemVM, str]:
        """The least-loaded Running SSVM of the template's zone; waits (saying so) while none."""
        said = False
        while True:
            async with self.engine.db.read() as s:
                t = await s.get(Template, template_id)
                if t is None:
                    raise NotFound(f"template {template_id} was deleted")
                load = (
                    select(TemplateTransfer.ssvm_id, func.count().label("n"))
                    .where(TemplateTransfer.state.in_(ACTIVE))
                    .group_by(TemplateTransfer.ssvm_id)
                    .subquery()
                )
                ssvm = (
                    await s.scalars(
                        select(SystemVM)
                        .outerjoin(load, load.c.ssvm_id == SystemVM.id)
                        .where(
                            SystemVM.zone_id == t.zone_id,
                            SystemVM.type == SystemVMType.SSVM.value,
                            SystemVM.state == VMState.RUNNING.value,
                        )
                        .order_by(func.coalesce(load.c.n, 0), SystemVM.id)
                        .limit(1)
                    )
                ).first()
                store = (
                    await s.scalars(select(ImageStore).where(ImageStore.zone_id == t.zone_id))
                ).first()
            if store is None:
                raise Conflict("the zone has no image store (secondary storage); add one")
            if ssvm is not None and self.engine.guests.ssh_endpoint(ssvm) is not None:
                return ssvm, store.path
            if not said:
                why = "waiting for a Running secondary storage VM in the zone"
                await self._update(template_id, transfer={"reason": why})
                await ctx.progress(message=why, force=True)
                said = True
            self.engine.reconciler.poke()
            await asyncio.sleep(0.5)

    async def _attempt(
        self, ctx: JobContext, template_id: int, direction: str, ssvm: SystemVM, root: str
    ) -> dict[str, Any]:
        async with self.engine.db.read() as s:
            t = await s.get(Template, template_id)
            assert t is not None
        in_progress = (
            TemplateState.DOWNLOAD_IN_PROGRESS
            if direction == "download"
            else TemplateState.UPLOAD_IN_PROGRESS
        )
        slot = {"dest": f"template/tmpl/{t.account}/{t.id}", "name": str(t.id)}
        await self._update(
            template_id,
            state=in_progress.value,
            transfer={"state": in_progress.value, "ssvm_id": ssvm.id, "reason": f"on {ssvm.name}"},
        )
        endpoint = self.engine.guests.ssh_endpoint(ssvm)
        if endpoint is None:
            raise _SsvmLost(f"{ssvm.name} does not answer")
        stdin: bytes | AsyncIterator[bytes]
        if direction == "download":
            zone_allows = await self._zone_allows_local(t.zone_id or 0)
            request = {
                **slot,
                "url": t.url,
                "format": t.format,
                "checksum": t.checksum or None,
                "max_bytes": MAX_BYTES,
                "connect_timeout": 10,
                "idle_timeout": 60,
                "allow_local": zone_allows,
                "max_redirects": 5,
            }
            stdin = json.dumps(request).encode()
            command = "sysvm-secstorage download"
        else:
            source = Path(ctx.params["path"])
            size = source.stat().st_size
            header = {**slot, "format": t.format, "checksum": t.checksum or None, "size": size}
            stdin = _file_chunks(json.dumps(header).encode() + b"\n", source)
            command = "sysvm-secstorage upload"
        meter = _Throttle(float(self.engine.config["job.progress_interval"]))
        final: dict[str, Any] | None = None
        try:
            lines = self.engine.transport.stream(
                endpoint[0],
                endpoint[1],
                ssvm.host_key_public,
                command,
                stdin=stdin,
                idle_timeout=90,
            )
            async with contextlib.aclosing(lines):  # type: ignore[type-var]
                async for line in lines:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if ev.get("event") == "progress":
                        await self._progress(ctx, template_id, ev, meter)
                    elif ev.get("event") in ("done", "error"):
                        final = ev
        except CommandFailed:
            pass  # the error line (in `final`) says why
        except TransportError as exc:
            raise _SsvmLost(str(exc)) from exc
        if final is None:
            raise _SsvmLost(f"{ssvm.name} stopped answering mid-transfer")
        if final["event"] == "error":
            if final.get("resumable"):  # connection, timeout, busy, superseded: go on
                raise _SsvmLost(str(final.get("message")))
            failed = (
                TemplateState.DOWNLOAD_ERROR
                if direction == "download"
                else TemplateState.UPLOAD_ERROR
            )
            message = str(final.get("message", "transfer failed"))
            await self._update(
                template_id,
                state=failed.value,
                error=message,
                transfer={"state": failed.value, "reason": f"{final.get('reason')}: {message}"},
            )
            raise SysvmError(f"template {t.name}: {message}")
        done = TemplateState.DOWNLOADED if direction == "download" else TemplateState.UPLOADED
        size = int(final.get("size") or 0)
        await self._update(
            template_id,
            state=done.value,
            error="",
            size=size,
            virtual_size=int(final.get("virtual_size") or 0),
            checksum=str(final.get("checksum") or t.checksum),
            install_path=str(Path(root) / str(final.get("path", ""))),
            transfer={
                "state": done.value,
                "bytes_done": size,
                "bytes_total": size,
                "reason": "complete",
            },
        )
        await ctx.progress(
            100,
            message=f"{done.value} on {ssvm.name}",
            bytes_done=size,
            bytes_total=size,
            force=True,
        )
        return {k: final.get(k) for k in ("path", "size", "virtual_size", "format", "checksum")}

    async def _progress(
        self, ctx: JobContext, template_id: int, ev: dict[str, Any], meter: _Throttle
    ) -> None:
        done = int(ev.get("bytes") or 0)
        total = int(ev.get("total") or 0)
        pct = 100.0 * done / total if total else 0.0
        if not meter.due(pct):
            return
        rate = float(ev.get("rate") or 0)
        await self._update(
            template_id, transfer={"bytes_done": done, "bytes_total": total}, rate=rate
        )
        eta = f", ETA {int((total - done) / rate)} s" if rate > 0 and total else ""
        await ctx.progress(
            pct,
            message=f"{_human(done)} of {_human(total) if total else '?'} at {_human(rate)}/s{eta}",
            bytes_done=done,
            bytes_total=total,
            force=True,
        )

    async def _abandon(self, template_id: int, direction: str) -> None:
        """Cancelled: ABANDONED, and the part file removed from the store."""
        with contextlib.suppress(Exception):
            async with self.engine.db.read() as s:
                t = await s.get(Template, template_id)
                tr = (
                    await s.scalars(
                        select(TemplateTransfer).where(TemplateTransfer.template_id == template_id)
                    )
                ).first()
                ssvm = await s.get(SystemVM, tr.ssvm_id) if tr is not None and tr.ssvm_id else None
            await self._update(
                template_id,
                state=TemplateState.ABANDONED.value,
                transfer={
                    "state": TemplateState.ABANDONED.value,
                    "reason": "cancelled by operator",
                },
            )
            endpoint = self.engine.guests.ssh_endpoint(ssvm) if ssvm is not None else None
            if t is not None and ssvm is not None and endpoint is not None:
                request = {"dest": f"template/tmpl/{t.account}/{t.id}"}
                await asyncio.wait_for(
                    self.engine.transport.run(
                        endpoint[0],
                        endpoint[1],
                        ssvm.host_key_public,
                        "sysvm-secstorage delete",
                        stdin=json.dumps(request),
                    ),
                    5,
                )

    async def _zone_allows_local(self, zone_id: int) -> bool:
        async with self.engine.db.read() as s:
            zone = await s.get(Zone, zone_id)
            return bool(zone and zone.allow_local_urls)

    async def _update(
        self,
        template_id: int,
        *,
        transfer: dict[str, Any] | None = None,
        rate: float | None = None,
        **fields: Any,
    ) -> None:
        async def work(s: AsyncSession) -> tuple[str, dict[str, Any]]:
            t = await s.get(Template, template_id)
            if t is None:
                raise NotFound(f"template {template_id} was deleted")
            for k, v in fields.items():
                setattr(t, k, v)
            tr = (
                await s.scalars(
                    select(TemplateTransfer).where(TemplateTransfer.template_id == template_id)
                )
            ).first()
            if tr is not None and transfer:
                for k, v in transfer.items():
                    setattr(tr, k, v)
            snapshot = {
                "state": t.state,
                "error": t.error,
                "bytes_done": tr.bytes_done if tr else 0,
                "bytes_total": tr.bytes_total if tr else 0,
                "reason": tr.reason if tr else "",
            }
            return t.name, snapshot

        name, snapshot = await self.engine.db.write(work)
        if rate is not None:
            snapshot["rate"] = rate
        self.engine.bus.publish("template", template_id, "updated", name, **snapshot)


class _SsvmLost(SysvmError):
    """The SSVM went away mid-transfer (or the network did): resume on a Running one."""


class _Throttle:
    """At most one persisted progress update per interval, or per 1% of progress."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = 0.0
        self._pct = -100.0

    def due(self, pct: float) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval or pct - self._pct >= 1.0:
            self._last, self._pct = now, pct
            return True
        return False


async def _file_chunks(header: bytes, path: Path) -> AsyncIterator[bytes]:
    yield header
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

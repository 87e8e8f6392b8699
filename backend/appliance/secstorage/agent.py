"""The secstorage agent's fixed SSH commands: download, upload, delete and status.

Every stdout line is one JSON object. Exit status: 0 done, 1 the transfer failed (the last line
is an `error` line saying why), 2 the request was refused before anything was touched.
  download  stdin: one JSON request, then EOF.   upload  stdin: one JSON header line, then
            exactly `size` raw bytes.  Both answer `progress` lines (the first at once, then
            at most every 0.25 s while bytes flow and at least every 1 s), then `done` or `error`.
  delete    stdin: {"dest", "name"?}: stops a transfer into the slot, removes the slot directory.
  status    one `status` line: the store's free bytes and this SSVM's running transfers.
A download stops when its client closes the session; its part file stays for a Range resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from backend.appliance.endpoint import ApplianceEndpoints, CommandContext
from backend.appliance.secstorage.checksum import Checksum
from backend.appliance.secstorage.download import download
from backend.appliance.secstorage.failure import Reason, TransferFailed
from backend.appliance.secstorage.image_format import ImageFormat
from backend.appliance.secstorage.progress import PROGRESS_INTERVAL, ProgressMeter
from backend.appliance.secstorage.request import (
    MAX_REQUEST_BYTES,
    RequestError,
    TemplateSlot,
    parse_download,
    parse_slot,
    parse_upload,
)
from backend.appliance.secstorage.template_writer import TemplateWriter, slot_directory
from backend.appliance.secstorage.transfer_registry import (
    RunningTransfer,
    SlotKey,
    TransferRegistry,
)
from backend.appliance.secstorage.upload import upload
from backend.errors import InvalidInput

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_REQUEST = 2

Work = Callable[[TemplateWriter, ProgressMeter], Awaitable[dict[str, object]]]


class _Lines:
    """JSON lines to the command's stdout; notices when the client has gone away."""

    def __init__(self, ctx: CommandContext) -> None:
        self._ctx = ctx
        self.gone = asyncio.Event()

    def send(self, event: dict[str, object]) -> None:
        if self.gone.is_set():
            return
        try:
            self._ctx.write(json.dumps(event, separators=(",", ":")) + "\n")
        except (BrokenPipeError, ConnectionError, OSError):
            self.gone.set()


class SecondaryStorageAgent:
    """Runs template transfers into the image store of each SSVM served by one endpoint host."""

    def __init__(
        self, store_root_of: Callable[[str], Path], tls_context: ssl.SSLContext | None = None
    ) -> None:
        self._store_root_of = store_root_of
        self._tls = tls_context
        self.transfers = TransferRegistry()

    async def download(self, ctx: CommandContext) -> int:
        """`sysvm-secstorage download`: fetch the request's URL into its slot."""
        out = _Lines(ctx)
        try:
            request = parse_download(await _read_request(ctx))
        except RequestError as exc:
            out.send(exc.event())
            return EXIT_BAD_REQUEST

        async def work(writer: TemplateWriter, meter: ProgressMeter) -> dict[str, object]:
            return await download(request, writer, meter, self._tls)

        log.info("%s: download %s into %s", ctx.vm_name, request.url.redacted, request.slot.dest)
        return await self._transfer(
            ctx,
            out,
            "download",
            request.slot,
            request.format,
            request.checksum,
            work,
            total=None,
            keep_part_on_cancel=True,
        )

    async def upload(self, ctx: CommandContext) -> int:
        """`sysvm-secstorage upload`: receive `size` bytes after the header line into the slot."""
        out = _Lines(ctx)
        try:
            request = parse_upload(await ctx.readline(MAX_REQUEST_BYTES))
        except RequestError as exc:
            out.send(exc.event())
            return EXIT_BAD_REQUEST
        except InvalidInput as exc:
            out.send(RequestError("request", exc.reason).event())
            return EXIT_BAD_REQUEST

        async def work(writer: TemplateWriter, meter: ProgressMeter) -> dict[str, object]:
            return await upload(request, ctx.read, writer, meter)

        log.info("%s: upload of %d bytes into %s", ctx.vm_name, request.size, request.slot.dest)
        return await self._transfer(
            ctx,
            out,
            "upload",
            request.slot,
            request.format,
            request.checksum,
            work,
            total=request.size,
            keep_part_on_cancel=False,
        )

    async def delete(self, ctx: CommandContext) -> int:
        """`sysvm-secstorage delete`: stop a transfer into the slot, then remove its directory."""
        out = _Lines(ctx)
        try:
            slot = parse_slot(await _read_request(ctx))
            root, directory = await self._locate(ctx.vm_name, slot)
        except RequestError as exc:
            out.send(exc.event())
            return EXIT_BAD_REQUEST
        except TransferFailed as exc:
            out.send(exc.event())
            return EXIT_FAILED
        why = TransferFailed(
            Reason.CANCELLED, f"{slot.dest} was deleted while it was being transferred"
        )
        if not await self.transfers.stop(_key(root, slot), why):
            out.send(
                TransferFailed(Reason.BUSY, f"the transfer into {slot.dest} would not stop").event()
            )
            return EXIT_FAILED
        try:
            existed = await asyncio.to_thread(_remove_slot, directory, slot)
        except TransferFailed as exc:
            out.send(exc.event())
            return EXIT_FAILED
        except OSError as exc:
            out.send(
                TransferFailed(
                    Reason.INTERNAL, f"cannot remove {slot.dest}: {exc.strerror or exc}"
                ).event()
            )
            return EXIT_FAILED
        log.info("%s: deleted %s (existed: %s)", ctx.vm_name, slot.dest, existed)
        out.send({"event": "deleted", "dest": slot.dest, "existed": existed})
        return EXIT_OK

    async def status(self, ctx: CommandContext) -> int:
        """`sysvm-secstorage status`: the store's free space and this SSVM's running transfers."""
        free: int | None = None
        total: int | None = None
        problem: str | None = None
        try:
            root = await self._root(ctx.vm_name)
            st = await asyncio.to_thread(os.statvfs, root)
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        except TransferFailed as exc:
            problem = exc.message
        except OSError as exc:
            problem = f"cannot read the image store: {exc.strerror or exc}"
        _Lines(ctx).send(
            {
                "event": "status",
                "vm": ctx.vm_name,
                "free_bytes": free,
                "total_bytes": total,
                "store_error": problem,
                "transfers": [t.describe() for t in self.transfers.of_vm(ctx.vm_name)],
            }
        )
        return EXIT_OK

    async def _locate(self, vm_name: str, slot: TemplateSlot) -> tuple[Path, Path]:
        """The VM's store root and the slot's directory in it (checked off the loop: NFS may hang)."""
        root = await self._root(vm_name)
        return root, await asyncio.to_thread(slot_directory, root, slot)

    async def _root(self, vm_name: str) -> Path:
        try:
            root = Path(self._store_root_of(vm_name))
        except Exception as exc:
            raise TransferFailed(
                Reason.STORE_UNAVAILABLE, f"{vm_name} has no image store: {exc}"
            ) from exc
        if not await asyncio.to_thread(root.is_dir):
            raise TransferFailed(
                Reason.STORE_UNAVAILABLE,
                f"the image store of {vm_name} is not mounted (no directory {root})",
            )
        return root

    async def _transfer(
        self,
        ctx: CommandContext,
        out: _Lines,
        kind: str,
        slot: TemplateSlot,
        declared: ImageFormat,
        checksum: Checksum | None,
        work: Work,
        *,
        total: int | None,
        keep_part_on_cancel: bool,
    ) -> int:
        """Run `work` as this slot's transfer; it stops when the client goes away (a download's
        part file is kept for a resume). Progress lines flow from the start, at least every second."""
        try:
            root, directory = await self._locate(ctx.vm_name, slot)
        except RequestError as exc:
            out.send(exc.event())
            return EXIT_BAD_REQUEST
        except TransferFailed as exc:
            out.send(exc.event())
            return EXIT_FAILED
        meter = ProgressMeter(out.send)
        key = _key(root, slot)
        entry = RunningTransfer(ctx.vm_name, kind, slot, meter)
        superseded = TransferFailed(
            Reason.SUPERSEDED,
            f"a newer transfer into {slot.dest} took over"
            + ("; the part file was kept" if keep_part_on_cancel else ""),
            resumable=keep_part_on_cancel,
        )
        if not await self.transfers.claim(key, entry, superseded):
            out.send(
                TransferFailed(
                    Reason.BUSY,
                    f"an earlier transfer into {slot.dest} would not stop",
                    resumable=True,
                ).event()
            )
            return EXIT_FAILED
        meter.begin(0, total)
        task = asyncio.create_task(
            _run(
                TemplateWriter(directory, slot, declared, checksum),
                meter,
                work,
                keep_part_on_cancel=keep_part_on_cancel,
            ),
            name=f"secstorage-{kind}-{slot.dest}",
        )
        entry.task = task
        waiters = [
            asyncio.create_task(ctx.wait_closed()),
            asyncio.create_task(out.gone.wait()),
            asyncio.create_task(_heartbeat(meter)),
        ]
        try:
            await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            self.transfers.release(key, entry)
        if task.cancelled():
            if entry.stopped_because is not None:
                log.info("%s: %s into %s stopped", ctx.vm_name, kind, slot.dest)
                out.send(entry.stopped_because.event())
            else:
                log.info("%s: client of %s into %s went away", ctx.vm_name, kind, slot.dest)
            return EXIT_FAILED
        error = task.exception()
        if error is None:
            out.send(task.result())
            return EXIT_OK
        failure = error if isinstance(error, TransferFailed) else None
        if failure is None:
            log.error("%s: %s into %s failed", ctx.vm_name, kind, slot.dest, exc_info=error)
            failure = TransferFailed(Reason.INTERNAL, f"the agent failed: {error}")
        log.info("%s: %s into %s failed: %s", ctx.vm_name, kind, slot.dest, failure.message)
        out.send(failure.event())
        return EXIT_FAILED


async def _run(
    writer: TemplateWriter, meter: ProgressMeter, work: Work, *, keep_part_on_cancel: bool
) -> dict[str, object]:
    """Open the writer, run `work`, and leave the part file only when a retry can resume from it."""
    await writer.open()
    try:
        result = await work(writer, meter)
    except TransferFailed as exc:
        await writer.abandon(keep_part=exc.resumable)
        raise
    except asyncio.CancelledError:
        await writer.abandon(keep_part=keep_part_on_cancel)
        raise
    except BaseException:
        await writer.abandon(keep_part=False)
        raise
    await writer.abandon(keep_part=True)  # closes the file; the part is already renamed
    return result


async def _heartbeat(meter: ProgressMeter) -> None:
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        meter.tick()


async def _read_request(ctx: CommandContext) -> bytes:
    """All of stdin (one JSON request), refusing more than MAX_REQUEST_BYTES."""
    data = bytearray()
    while chunk := await ctx.read(MAX_REQUEST_BYTES + 1):
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise RequestError("request", f"longer than {MAX_REQUEST_BYTES} bytes")
    return bytes(data)


def _key(root: Path, slot: TemplateSlot) -> SlotKey:
    return (os.path.realpath(root), slot.dest)


def _remove_slot(directory: Path, slot: TemplateSlot) -> bool:
    """Remove the slot directory unless another process (another SSVM) holds its part file's lock."""
    if not directory.exists():
        return False
    part = directory / f".{slot.name}.part"
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(part, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise TransferFailed(
                    Reason.BUSY,
                    f"another secondary storage VM is writing {slot.dest}; cancel it there first",
                ) from exc
            raise
        finally:
            os.close(fd)
    shutil.rmtree(directory)
    return True


def register_secstorage(
    endpoints: ApplianceEndpoints,
    store_root_of: Callable[[str], Path],
    *,
    tls_context: ssl.SSLContext | None = None,
) -> SecondaryStorageAgent:
    """Serve the `sysvm-secstorage` commands on every endpoint; `store_root_of(vm)` is its mounted store."""
    agent = SecondaryStorageAgent(store_root_of, tls_context)
    endpoints.register("sysvm-secstorage download", agent.download)
    endpoints.register("sysvm-secstorage upload", agent.upload)
    endpoints.register("sysvm-secstorage delete", agent.delete)
    endpoints.register("sysvm-secstorage status", agent.status)
    return agent

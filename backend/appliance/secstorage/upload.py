"""Receive a template streamed on the command's stdin (from the jump host, through the engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from backend.appliance.secstorage.failure import Reason, TransferFailed
from backend.appliance.secstorage.progress import ProgressMeter
from backend.appliance.secstorage.request import UploadRequest
from backend.appliance.secstorage.template_writer import TemplateWriter, free_bytes

READ_BYTES = 1024 * 1024
IDLE_TIMEOUT = 60.0


async def upload(
    request: UploadRequest,
    read: Callable[[int], Awaitable[bytes]],
    writer: TemplateWriter,
    meter: ProgressMeter,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
) -> dict[str, object]:
    """Read exactly `request.size` bytes with `read`, verify and publish; returns the `done` line."""
    await writer.restart()  # an upload always starts over
    free = await asyncio.to_thread(free_bytes, writer.directory)
    if request.size > free:
        raise TransferFailed(
            Reason.DISK_FULL,
            f"the upload needs {request.size} bytes but the image store has {free} free",
        )
    meter.begin(0, request.size)
    while writer.size < request.size:
        try:
            async with asyncio.timeout(idle_timeout):
                chunk = await read(min(READ_BYTES, request.size - writer.size))
        except TimeoutError as exc:
            raise TransferFailed(
                Reason.TIMEOUT,
                f"the upload sent nothing for {idle_timeout:g}s at {writer.size} of "
                f"{request.size} bytes",
            ) from exc
        if not chunk:
            raise TransferFailed(
                Reason.CONNECTION,
                f"the upload ended after {writer.size} of {request.size} bytes",
            )
        await writer.write(chunk)
        meter.update(writer.size)
    return await writer.finish()

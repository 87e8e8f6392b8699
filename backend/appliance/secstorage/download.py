"""Download a template URL into its slot: resume from the part file when the server allows it."""

from __future__ import annotations

import asyncio
import hashlib
import ssl

from backend.appliance.secstorage.failure import Reason, TransferFailed
from backend.appliance.secstorage.http_fetch import Response, fetch
from backend.appliance.secstorage.progress import ProgressMeter
from backend.appliance.secstorage.request import DownloadRequest
from backend.appliance.secstorage.template_writer import TemplateWriter, free_bytes

MAX_RESTARTS = 2


def url_identity(request: DownloadRequest) -> str:
    """What a part file was downloaded from, without credentials or query (signed URLs change)."""
    return hashlib.sha256(request.url.redacted.encode()).hexdigest()


def _validator(response: Response) -> str | None:
    """A strong ETag, else Last-Modified: sent as If-Range so a changed file is not stitched."""
    etag = response.headers.get("etag")
    value = etag if etag and not etag.startswith("W/") else response.headers.get("last-modified")
    if value and len(value) <= 256 and value.isprintable():
        return value
    return None


async def download(
    request: DownloadRequest,
    writer: TemplateWriter,
    meter: ProgressMeter,
    tls: ssl.SSLContext | None,
) -> dict[str, object]:
    """Fetch, stream into `writer`, verify and publish; returns the `done` line or raises TransferFailed."""
    identity = url_identity(request)
    offset = writer.part_size
    if offset and (writer.meta.get("url") != identity or offset > request.max_bytes):
        await writer.restart()
        offset = 0
    for _attempt in range(MAX_RESTARTS + 1):
        validator = writer.meta.get("validator") if offset else None
        response = await fetch(
            request.url,
            offset=offset,
            if_range=validator if isinstance(validator, str) else None,
            connect_timeout=request.connect_timeout,
            idle_timeout=request.idle_timeout,
            allow_local=request.allow_local,
            max_redirects=request.max_redirects,
            tls=tls,
        )
        try:
            status = response.status
            if status == 200:
                if offset:
                    await writer.restart()  # the server ignored Range (or the file changed)
                    offset = 0
                total = response.content_length
                await writer.save_meta(
                    {"url": identity, "validator": _validator(response), "total": total}
                )
            elif status == 206 and offset:
                start, total = response.content_range()
                recorded = writer.meta.get("total")
                if start != offset or (recorded is not None and total != recorded):
                    await writer.restart()
                    offset = 0
                    continue
                await writer.adopt_part()
            elif status == 416 and offset:
                if response.unsatisfied_range_length() == offset:
                    await writer.adopt_part()  # the part file already holds everything
                    meter.begin(offset, offset)
                    return await writer.finish()
                await writer.restart()
                offset = 0
                continue
            else:
                raise TransferFailed(Reason.HTTP_STATUS, response.status_text())
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise TransferFailed(
                    Reason.HTTP_STATUS,
                    f"{response.url.where} compressed the body (Content-Encoding: "
                    f"{encoding[:40]}) although it was asked not to",
                )
            await _check_room(request, response, writer, offset, total)
            meter.begin(offset, total)
            async for chunk in response.body():
                if writer.size + len(chunk) > request.max_bytes:
                    raise TransferFailed(
                        Reason.TOO_LARGE,
                        f"{response.url.where} sent more than the {request.max_bytes} bytes "
                        f"a template may have",
                    )
                await writer.write(chunk)
                meter.update(writer.size)
            if total is not None and writer.size != total:
                raise TransferFailed(
                    Reason.CONNECTION,
                    f"{response.url.where} ended the body at {writer.size} of {total} bytes",
                    resumable=True,
                )
            meter.update(writer.size)
            return await writer.finish()
        finally:
            response.close()
    raise TransferFailed(
        Reason.HTTP_STATUS,
        f"{request.url.where} kept answering ranges that do not match the part file",
    )


async def _check_room(
    request: DownloadRequest,
    response: Response,
    writer: TemplateWriter,
    offset: int,
    total: int | None,
) -> None:
    if total is None:
        return
    if total > request.max_bytes:
        raise TransferFailed(
            Reason.TOO_LARGE,
            f"{response.url.where} announces {total} bytes; templates may have at most "
            f"{request.max_bytes}",
        )
    free = await asyncio.to_thread(free_bytes, writer.directory)
    if total - offset > free:
        raise TransferFailed(
            Reason.DISK_FULL,
            f"the template needs {total - offset} more bytes but the image store has {free} free",
        )

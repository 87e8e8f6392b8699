"""Writes one template into its image-store slot: a locked part file, hashed while written,
then verified (checksum, format), fsynced, renamed and described by `template.properties`.

All file work runs on one thread per transfer, in submission order, so the event loop (which in
the `local` back end is the engine's) never waits on the disk or on hashing, and a cancelled
transfer never leaves a gap in the part file: queued writes still run before the file is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import json
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from backend.appliance.secstorage.checksum import DEFAULT_ALGORITHM, Checksum, new_hash
from backend.appliance.secstorage.failure import Reason, TransferFailed
from backend.appliance.secstorage.image_format import (
    HEAD_BYTES,
    ImageFormat,
    check_declared,
    inspect_head,
)
from backend.appliance.secstorage.request import RequestError, TemplateSlot

BLOCK_BYTES = 512 * 1024  # hand data to the writer thread in blocks of about this size
MAX_BLOCKS_IN_FLIGHT = 3
HASH_READ_BYTES = 8 * 1024 * 1024
PROPERTIES = "template.properties"
_IOV_MAX = 512
_T = TypeVar("_T")


def slot_directory(root: Path, slot: TemplateSlot) -> Path:
    """The slot's directory under `root`; raises RequestError if a symlink would lead outside it."""
    real_root = Path(os.path.realpath(root))
    directory = Path(os.path.realpath(root / slot.dest))
    if not directory.is_relative_to(real_root) or directory == real_root:
        raise RequestError("dest", "leads outside the image store (through a symbolic link)")
    return directory


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class TemplateWriter:
    """The part file of one slot and everything that turns it into a verified template."""

    def __init__(
        self,
        directory: Path,
        slot: TemplateSlot,
        declared: ImageFormat,
        checksum: Checksum | None,
    ) -> None:
        self.directory = directory
        self.slot = slot
        self.declared = declared
        self.checksum = checksum
        self.algorithm = checksum.algorithm if checksum else DEFAULT_ALGORITHM
        self.part = directory / f".{slot.name}.part"
        self.meta_path = directory / f".{slot.name}.part.json"
        self.size = 0  # bytes accepted so far (the part file's length once queued writes land)
        self.part_size = 0  # length of a part file left by an earlier attempt
        self.meta: dict[str, Any] = {}
        self._fd = -1
        self._owns_part = False  # set once the part file is open and locked by us
        self._hash: Any = new_hash(self.algorithm)
        self._head = bytearray()
        self._checked_head = False
        self._batch: list[bytes | memoryview] = []
        self._batch_bytes = 0
        self._in_flight: deque[Future[None]] = deque()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"secstorage-{slot.name}")

    async def open(self) -> None:
        """Create the slot directory, open and lock the part file, and read what an earlier attempt left."""
        try:
            await self._call(self._open)
        except BaseException:
            self._thread.shutdown(wait=False)
            raise

    async def restart(self) -> None:
        """Throw away what the part file holds and start from byte 0."""
        await self._drain()
        await self._call(self._truncate)
        self.size = self.part_size = 0
        self._hash = new_hash(self.algorithm)
        self._head.clear()
        self._checked_head = False

    async def save_meta(self, meta: dict[str, Any]) -> None:
        """Remember how to resume (URL identity, validator, length) next to the part file."""
        self.meta = meta
        await self._call(self._write_meta, meta)

    async def adopt_part(self) -> None:
        """Continue after the bytes the part file already holds: hash them (and read the head)."""
        offset = 0
        while offset < self.part_size:
            n = min(HASH_READ_BYTES, self.part_size - offset)
            chunk = await self._call(self._hash_range, offset, n)
            if len(chunk) != n:
                raise TransferFailed(
                    Reason.INTERNAL, "the part file shrank while it was being read", resumable=True
                )
            self._take_head(chunk)
            offset += n
        self.size = self.part_size

    async def write(self, chunk: bytes | memoryview) -> None:
        """Accept body bytes; they are hashed and written on the writer thread, in order."""
        if not chunk:
            return
        self._take_head(chunk)
        self.size += len(chunk)
        self._batch.append(chunk)
        self._batch_bytes += len(chunk)
        if self._batch_bytes >= BLOCK_BYTES:
            await self._flush_batch()

    async def finish(self) -> dict[str, object]:
        """Verify checksum and format, then publish the template; returns the `done` line."""
        await self._drain()
        if not self._checked_head:
            self._check_head(final=True)
        return await self._call(self._publish)

    async def abandon(self, *, keep_part: bool) -> None:
        """Close the part file (after queued writes land); remove it unless it is kept for a resume."""
        try:
            if keep_part and self._batch and self._owns_part:
                # keep every byte received: the part file stays a contiguous prefix either way
                batch, self._batch, self._batch_bytes = self._batch, [], 0
                self._in_flight.append(self._thread.submit(self._write_blocks, batch))
            await asyncio.shield(asyncio.wrap_future(self._thread.submit(self._close, keep_part)))
        finally:
            self._thread.shutdown(wait=False)

    # loop side ------------------------------------------------------------

    def _take_head(self, chunk: bytes | memoryview) -> None:
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
            if len(self._head) >= HEAD_BYTES:
                self._check_head(final=False)

    def _check_head(self, *, final: bool) -> None:
        """Refuse a wrong or unsafe image as soon as its head is in, not after the whole download."""
        self._checked_head = True
        info = inspect_head(bytes(self._head), self.size if final else None)
        check_declared(self.declared, info)

    async def _flush_batch(self) -> None:
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        while len(self._in_flight) >= MAX_BLOCKS_IN_FLIGHT:
            await self._settle(self._in_flight.popleft())
        self._in_flight.append(self._thread.submit(self._write_blocks, batch))

    async def _drain(self) -> None:
        await self._flush_batch()
        while self._in_flight:
            await self._settle(self._in_flight.popleft())

    async def _settle(self, future: Future[None]) -> None:
        # shield: cancelling the transfer must not cancel a queued write (that would leave a gap)
        await self._translate(asyncio.shield(asyncio.wrap_future(future)))

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        future = self._thread.submit(fn, *args)
        return await self._translate(asyncio.shield(asyncio.wrap_future(future)))

    async def _translate(self, awaitable: asyncio.Future[_T]) -> _T:
        try:
            return await awaitable
        except OSError as exc:
            raise self._os_failure(exc) from exc

    def _os_failure(self, exc: OSError) -> TransferFailed:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return TransferFailed(
                Reason.DISK_FULL,
                f"the image store is full ({os.strerror(exc.errno).lower()}) after "
                f"{self.size} bytes of {self.slot.dest}",
            )
        return TransferFailed(
            Reason.INTERNAL,
            f"cannot write {self.slot.dest}/{self.part.name}: {exc.strerror or exc}",
        )

    # writer thread ----------------------------------------------------------

    def _open(self) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise TransferFailed(
                    Reason.BUSY,
                    f"another secondary storage VM is writing {self.slot.dest}; try again later",
                    resumable=True,
                ) from exc
            raise
        self._fd = fd
        self._owns_part = True
        self.part_size = os.fstat(fd).st_size
        if self.part_size:
            try:
                self.meta = json.loads(self.meta_path.read_text())
            except (OSError, ValueError):
                self.meta = {}
            if not isinstance(self.meta, dict):
                self.meta = {}

    def _truncate(self) -> None:
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.meta_path)

    def _write_meta(self, meta: dict[str, Any]) -> None:
        _write_atomically(self.meta_path, json.dumps(meta).encode(), sync=False)

    def _hash_range(self, offset: int, n: int) -> bytes:
        chunk = os.pread(self._fd, n, offset)
        self._hash.update(chunk)
        if offset + len(chunk) == self.part_size:
            os.lseek(self._fd, self.part_size, os.SEEK_SET)
        return chunk

    def _write_blocks(self, blocks: list[bytes | memoryview]) -> None:
        for block in blocks:
            self._hash.update(block)
        views = deque(memoryview(b) for b in blocks)
        while views:
            written = os.writev(self._fd, list(itertools.islice(views, _IOV_MAX)))
            while views and written >= len(views[0]):
                written -= len(views.popleft())
            if views and written:
                views[0] = views[0][written:]

    def _publish(self) -> dict[str, object]:
        os.fsync(self._fd)
        size = os.fstat(self._fd).st_size
        if size != self.size:
            raise TransferFailed(
                Reason.INTERNAL, f"the part file holds {size} bytes, expected {self.size}"
            )
        got = f"{{{self.algorithm}}}{self._hash.hexdigest()}"
        if self.checksum is not None and got != str(self.checksum):
            raise TransferFailed(
                Reason.CHECKSUM,
                f"checksum mismatch: expected {self.checksum} but the file has {got}",
            )
        info = inspect_head(os.pread(self._fd, HEAD_BYTES, 0), size)
        check_declared(self.declared, info)
        virtual_size = info.virtual_size if info.format == ImageFormat.QCOW2 else size
        ext = self.declared.extension
        filename = f"{self.slot.name}.{ext}"
        for other in ImageFormat:
            if other.extension != ext:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / f"{self.slot.name}.{other.extension}")
        final = self.directory / filename
        os.rename(self.part, final)
        properties = {
            "filename": filename,
            "id": self.slot.name,
            "size": size,
            "virtualsize": virtual_size,
            "format": self.declared.value,
            "checksum": got,
            ext: "true",
            f"{ext}.filename": filename,
            f"{ext}.size": size,
            f"{ext}.virtualsize": virtual_size,
        }
        text = "".join(f"{k}={v}\n" for k, v in properties.items())
        try:
            _write_atomically(self.directory / PROPERTIES, text.encode(), sync=True)
            _fsync_directory(self.directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final)  # never a template without its properties
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.meta_path)
        return {
            "event": "done",
            "path": f"{self.slot.dest}/{filename}",
            "size": size,
            "virtual_size": virtual_size,
            "format": self.declared.value,
            "checksum": got,
        }

    def _close(self, keep_part: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the lock
            self._fd = -1
        if self._owns_part and not keep_part:
            for path in (self.part, self.meta_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def _write_atomically(path: Path, data: bytes, *, sync: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

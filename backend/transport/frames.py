"""Frames between the engine's transport and its SSH worker process: a JSON header and bytes.

On the wire: two big-endian 32-bit lengths (header, payload), the header as UTF-8 JSON (an
object with an "op"), then the payload (stdin, output) as raw bytes, never inside the JSON.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

_LENGTHS = struct.Struct("!II")
MAX_HEADER = 1 << 20


class FrameError(Exception):
    """The other side sent something that is not a frame."""


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTHS.pack(len(head), len(payload)) + head + payload


async def read(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """The next frame, or None at end of file between frames; FrameError if cut or malformed."""
    try:
        lengths = await reader.readexactly(_LENGTHS.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("cut inside a frame's lengths") from exc
    head_len, payload_len = _LENGTHS.unpack(lengths)
    if head_len > MAX_HEADER:
        raise FrameError(f"a frame header of {head_len} bytes")
    try:
        head = await reader.readexactly(head_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError as exc:
        raise FrameError("cut inside a frame") from exc
    try:
        header = json.loads(head)
    except ValueError as exc:
        raise FrameError(f"a frame header that is not JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise FrameError("a frame header without an op")
    return header, payload

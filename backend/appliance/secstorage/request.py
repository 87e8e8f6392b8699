"""The JSON requests of the secstorage commands, validated field by field before anything is touched."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from backend.appliance.secstorage.checksum import Checksum, ChecksumSyntaxError, parse_checksum
from backend.appliance.secstorage.failure import Reason
from backend.appliance.secstorage.image_format import ImageFormat
from backend.appliance.secstorage.url import TemplateUrl, UrlError, parse_url

MAX_REQUEST_BYTES = 64 * 1024
DEST_PREFIX = ("template", "tmpl")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DEST_CHARS = re.compile(r"[A-Za-z0-9._/-]+")


class RequestError(ValueError):
    """One field of a request is invalid: the command answers one error line and exits 2."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

    def event(self) -> dict[str, object]:
        reason = Reason.BAD_URL if self.field == "url" else Reason.BAD_REQUEST
        return {
            "event": "error",
            "reason": reason.value,
            "field": self.field,
            "message": str(self),
            "resumable": False,
        }


@dataclass(frozen=True)
class TemplateSlot:
    """Where a template lives in the image store: `dest` (relative directory) and file `name`."""

    dest: str
    name: str


@dataclass(frozen=True)
class DownloadRequest:
    """`sysvm-secstorage download`: fetch `url` into the slot, verified against format and checksum."""

    url: TemplateUrl
    slot: TemplateSlot
    format: ImageFormat
    checksum: Checksum | None
    max_bytes: int
    connect_timeout: float
    idle_timeout: float
    allow_local: bool
    max_redirects: int


@dataclass(frozen=True)
class UploadRequest:
    """`sysvm-secstorage upload`: exactly `size` bytes follow the header line on stdin."""

    slot: TemplateSlot
    format: ImageFormat
    checksum: Checksum | None
    size: int


def parse_download(raw: bytes) -> DownloadRequest:
    """Validate a download request; raises RequestError naming the first bad field."""
    fields = _object(raw)
    _only(
        fields,
        required={"url", "dest", "name", "format", "max_bytes"},
        optional={"checksum", "connect_timeout", "idle_timeout", "allow_local", "max_redirects"},
    )
    try:
        url = parse_url(fields["url"])
    except UrlError as exc:
        raise RequestError("url", str(exc)) from exc
    return DownloadRequest(
        url=url,
        slot=_slot(fields),
        format=_format(fields["format"]),
        checksum=_checksum(fields.get("checksum")),
        max_bytes=_int(fields, "max_bytes", 1, 2**62),
        connect_timeout=_seconds(fields, "connect_timeout", 10.0),
        idle_timeout=_seconds(fields, "idle_timeout", 60.0),
        allow_local=_bool(fields, "allow_local", False),
        max_redirects=_int(fields, "max_redirects", 0, 20, default=5),
    )


def parse_upload(raw: bytes) -> UploadRequest:
    """Validate an upload header line; raises RequestError naming the first bad field."""
    fields = _object(raw)
    _only(fields, required={"dest", "name", "format", "size"}, optional={"checksum"})
    return UploadRequest(
        slot=_slot(fields),
        format=_format(fields["format"]),
        checksum=_checksum(fields.get("checksum")),
        size=_int(fields, "size", 0, 2**62),
    )


def parse_slot(raw: bytes) -> TemplateSlot:
    """Validate a `{"dest", "name"}` request (delete)."""
    fields = _object(raw)
    _only(fields, required={"dest"}, optional={"name"})
    dest = _dest(fields["dest"])
    name = fields.get("name")
    return TemplateSlot(dest, _name(name) if name is not None else dest.rsplit("/", 1)[1])


def validate_dest(value: object) -> str:
    """`template/tmpl/<account>/<template>`: relative, four plain segments, nothing that climbs out."""
    return _dest(value)


def _object(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_REQUEST_BYTES:
        raise RequestError("request", f"longer than {MAX_REQUEST_BYTES} bytes")
    if not raw.strip():
        raise RequestError("request", "empty; send one JSON object on stdin")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError("request", f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RequestError("request", "must be a JSON object")
    return value


def _only(fields: dict[str, Any], *, required: set[str], optional: set[str]) -> None:
    for key in sorted(fields):
        if key not in required | optional:
            raise RequestError(str(key)[:40], "unknown field")
    for key in sorted(required):
        if key not in fields:
            raise RequestError(key, "missing")


def _slot(fields: dict[str, Any]) -> TemplateSlot:
    return TemplateSlot(_dest(fields["dest"]), _name(fields["name"]))


def _dest(value: object) -> str:
    if not isinstance(value, str):
        raise RequestError("dest", "must be a string")
    shape = "must be template/tmpl/<account>/<template id>"
    if not value or len(value) > 512 or not _DEST_CHARS.fullmatch(value):
        raise RequestError("dest", f"{shape}, using only A-Z a-z 0-9 . _ - and /")
    parts = value.split("/")
    if len(parts) != 4 or tuple(parts[:2]) != DEST_PREFIX:
        raise RequestError("dest", f"{shape} (a relative path inside the image store)")
    for part in parts[2:]:
        if not _SEGMENT.fullmatch(part):
            raise RequestError(
                "dest", f"{shape}; each part must start with a letter or digit (no '.', '..')"
            )
    return value


def _name(value: object) -> str:
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value):
        raise RequestError(
            "name",
            "must be 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit (a file name, no '/')",
        )
    return value


def _format(value: object) -> ImageFormat:
    if isinstance(value, str):
        try:
            return ImageFormat(value.upper())
        except ValueError:
            pass
    raise RequestError("format", "must be one of QCOW2, RAW, ISO")


def _checksum(value: object) -> Checksum | None:
    try:
        return parse_checksum(value)
    except ChecksumSyntaxError as exc:
        raise RequestError("checksum", str(exc)) from exc


def _int(
    fields: dict[str, Any], key: str, low: int, high: int, *, default: int | None = None
) -> int:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(key, "must be an integer")
    if not low <= value <= high:
        raise RequestError(key, f"must be between {low} and {high}")
    return value


def _seconds(fields: dict[str, Any], key: str, default: float) -> float:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(key, "must be a number of seconds")
    if not 0 < value <= 3600:
        raise RequestError(key, "must be more than 0 and at most 3600 seconds")
    return float(value)


def _bool(fields: dict[str, Any], key: str, default: bool) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(key, "must be true or false")
    return value

"""Why a template transfer failed, in words the engine records and the operator reads."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """The `reason` of an error line: one word the engine maps to a state and a hint."""

    BAD_REQUEST = "bad_request"
    BAD_URL = "bad_url"
    HTTP_STATUS = "http_status"
    CHECKSUM = "checksum"
    FORMAT = "format"
    BACKING_FILE = "backing_file"
    CORRUPT = "corrupt"
    TOO_LARGE = "too_large"
    DISK_FULL = "disk_full"
    TIMEOUT = "timeout"
    REFUSED_ADDRESS = "refused_address"
    REDIRECTS = "redirects"
    CONNECTION = "connection"
    STORE_UNAVAILABLE = "store_unavailable"
    BUSY = "busy"
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class TransferFailed(Exception):
    """A transfer stopped for `reason`; `resumable` says the part file was kept for a Range retry."""

    def __init__(self, reason: Reason, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.resumable = resumable

    def event(self) -> dict[str, object]:
        """The error line sent to the engine."""
        return {
            "event": "error",
            "reason": self.reason.value,
            "message": self.message,
            "resumable": self.resumable,
        }

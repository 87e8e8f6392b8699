"""How a router applier command fails: refused before anything changed, or failed doing its work."""

from __future__ import annotations

from typing import Any


class ApplyRefused(Exception):
    """The request was refused before anything changed (exit 2); `field` names what is wrong."""

    def __init__(self, field: str, message: str, **details: Any) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message
        self.details = details


class ApplyFailed(Exception):
    """The command could not do its work (exit 1); the message says what happened to the router."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details

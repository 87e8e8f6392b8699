"""Names operators give objects: hostname-like, so they are safe in DNS, libvirt and logs."""

from __future__ import annotations

import re

from backend.errors import InvalidInput

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,62}")


def check_name(field: str, value: object) -> str:
    """A VM or network name: a letter, then letters, digits or '-', at most 63 characters."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, got {type(value).__name__}")
    if not _NAME.fullmatch(value) or value.endswith("-"):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidInput(
            field,
            f"{shown!r} is not a valid name: use a letter, then letters, digits or '-' "
            "(at most 63, not ending in '-')",
        )
    return value

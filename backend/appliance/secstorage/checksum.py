"""Template checksums in CloudStack's form: `{SHA-256}hex` and friends, or a bare 32-hex MD5."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

# CloudStack name -> (hashlib name, hex digits)
ALGORITHMS: dict[str, tuple[str, int]] = {
    "MD5": ("md5", 32),
    "SHA-1": ("sha1", 40),
    "SHA-224": ("sha224", 56),
    "SHA-256": ("sha256", 64),
    "SHA-384": ("sha384", 96),
    "SHA-512": ("sha512", 128),
}
DEFAULT_ALGORITHM = "SHA-256"  # computed and reported when the request names no checksum
_PREFIXED = re.compile(r"\{([^{}]*)\}(.*)", re.DOTALL)
_HEX = re.compile(r"[0-9a-fA-F]*")


class ChecksumSyntaxError(ValueError):
    """The checksum text is not one of the accepted forms; the message says which form to use."""


@dataclass(frozen=True)
class Checksum:
    """An expected digest: the CloudStack algorithm name and lower-case hex."""

    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{{{self.algorithm}}}{self.hexdigest}"

    def new_hash(self) -> Any:
        """A fresh hashlib object for this algorithm."""
        return new_hash(self.algorithm)


def new_hash(algorithm: str) -> Any:
    """A fresh hashlib object for a CloudStack algorithm name."""
    return hashlib.new(ALGORITHMS[algorithm][0])


def parse_checksum(value: object) -> Checksum | None:
    """Parse `{ALG}hex`, a bare 32-hex MD5, or None/"" (no checksum); raises ChecksumSyntaxError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ChecksumSyntaxError(f"must be a string or null, not {type(value).__name__}")
    text = value.strip()
    if not text:
        return None
    accepted = "{" + "}hex, {".join(ALGORITHMS) + "}hex"
    if len(text) > 200:
        raise ChecksumSyntaxError(f"too long ({len(text)} characters); use one of {accepted}")
    match = _PREFIXED.fullmatch(text)
    if match is None:
        if "{" in text or "}" in text:
            raise ChecksumSyntaxError(f"malformed algorithm prefix; use one of {accepted}")
        algorithm, digest = "MD5", text
        if not _HEX.fullmatch(digest) or len(digest) != 32:
            raise ChecksumSyntaxError(
                f"a checksum without an {{ALGORITHM}} prefix must be 32 hex digits (MD5), "
                f"got {len(digest)} characters; prefix others, e.g. {{SHA-256}}hex"
            )
    else:
        algorithm, digest = match.group(1).strip().upper(), match.group(2).strip()
        if algorithm not in ALGORITHMS:
            raise ChecksumSyntaxError(
                f"unknown algorithm {match.group(1)[:20]!r}; use one of {', '.join(ALGORITHMS)}"
            )
    want = ALGORITHMS[algorithm][1]
    if not _HEX.fullmatch(digest):
        raise ChecksumSyntaxError(f"{{{algorithm}}} digest must be hexadecimal")
    if len(digest) != want:
        raise ChecksumSyntaxError(f"{{{algorithm}}} needs {want} hex digits, got {len(digest)}")
    return Checksum(algorithm, digest.lower())

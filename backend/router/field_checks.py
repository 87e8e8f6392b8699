"""Checks of single rule fields: each returns the normalized value or raises InvalidInput naming the field.

Rule fields arrive as JSON from the CLI, the API and (re-checked) over the SSH seam, and end up in
iptables, dnsmasq, haproxy and strongSwan files. So every string that is an identifier (address,
name, MAC, ...) must be short plain ASCII without control characters before it is even parsed, and
numbers must be real ints (not bools, floats or numeric strings).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, TypeVar

from backend.errors import InvalidInput

E = TypeVar("E", bound=enum.StrEnum)

# Longest identifier string looked at; longer ones are refused before any parsing.
MAX_IDENTIFIER = 253
_PRINTABLE = re.compile(r"[ -~]*")
_VISIBLE = re.compile(r"[!-~]+")
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_USERNAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IPV4_TEXT = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")
_CIDR_TEXT = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}")
# URL path characters that mean nothing special to haproxy's config parser (no quotes,
# backslash, '#', '$', spaces or parentheses).
_URL_PATH = re.compile(r"/[A-Za-z0-9._~%!&*+,;=:@/?-]{0,254}")


def join(parent: str, key: str | int) -> str:
    """The dotted path of a child field: `members` + 2 -> `members[2]`, `health_check` + `path`."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _char_name(ch: str) -> str:
    return f"U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')})"


def check_text(field: str, value: object, *, max_len: int = MAX_IDENTIFIER) -> str:
    """A string of plain printable ASCII (no control characters, no look-alike Unicode), bounded."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, got {_kind(value)}")
    if len(value) > max_len:
        raise InvalidInput(field, f"is {len(value)} characters long; at most {max_len} allowed")
    if value == "":
        raise InvalidInput(field, "must not be empty")
    if not _PRINTABLE.fullmatch(value):
        ch = next(c for c in value if not " " <= c <= "~")
        if ord(ch) > 0x7E:
            raise InvalidInput(
                field, f"contains the non-ASCII character {_char_name(ch)}; use plain ASCII"
            )
        raise InvalidInput(field, f"contains the control character U+{ord(ch):04X}")
    return value


def check_identifier(field: str, value: object, *, max_len: int = MAX_IDENTIFIER) -> str:
    """Like check_text, and also no whitespace: identifiers never contain spaces."""
    if type(value) is str and len(value) <= max_len and _VISIBLE.fullmatch(value):
        return value  # the common case, checked in one step
    text = check_text(field, value, max_len=max_len)
    if " " in text:
        raise InvalidInput(field, "must not contain spaces")
    return text


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_int(field: str, value: object, lo: int, hi: int) -> int:
    """An integer in [lo, hi]; booleans, floats and numeric strings are refused."""
    if type(value) is not int:
        raise InvalidInput(field, f"must be an integer between {lo} and {hi}, got {_kind(value)}")
    if not lo <= value <= hi:
        shown = str(value) if abs(value) < 10**12 else f"a {len(str(abs(value)))}-digit number"
        raise InvalidInput(field, f"must be between {lo} and {hi}, got {shown}")
    return value


def check_port(field: str, value: object) -> int:
    """A TCP/UDP port number, 1-65535."""
    return check_int(field, value, 1, 65535)


def check_bool(field: str, value: object) -> bool:
    """A JSON boolean (not 0/1, not "true")."""
    if not isinstance(value, bool):
        raise InvalidInput(field, f"must be true or false, got {_kind(value)}")
    return value


def check_choice(field: str, value: object, choices: type[E]) -> E:
    """One of an enum's values, exactly as spelled (lower case)."""
    text = check_identifier(field, value, max_len=32)
    member = choices._value2member_map_.get(text)
    if member is None:
        allowed = ", ".join(m.value for m in choices)
        raise InvalidInput(field, f"must be one of {allowed}, got {text!r}")
    return member  # type: ignore[return-value]


@lru_cache(maxsize=16384)
def _ipv4_from_text(text: str) -> ipaddress.IPv4Address:
    """Parse a dotted quad already known to be short plain ASCII; ValueError says what is wrong."""
    if not _IPV4_TEXT.fullmatch(text):
        raise ValueError(f"{text!r} is not an IPv4 address (a.b.c.d)")
    n = 0
    for part in text.split("."):
        if len(part) > 1 and part[0] == "0":
            raise ValueError(f"{text!r} is not an IPv4 address: leading zeros are ambiguous")
        octet = int(part)
        if octet > 255:
            raise ValueError(f"{text!r} is not an IPv4 address: {octet} is above 255")
        n = n << 8 | octet
    return ipaddress.IPv4Address(n)


def check_ipv4(field: str, value: object) -> ipaddress.IPv4Address:
    """A dotted-quad IPv4 address in its plain form (no leading zeros, no shorthand)."""
    text = check_identifier(field, value, max_len=15)
    try:
        return _ipv4_from_text(text)
    except ValueError as exc:
        raise InvalidInput(field, str(exc)) from None


def check_unicast(field: str, value: object) -> ipaddress.IPv4Address:
    """An IPv4 address a host can have: not 0.0.0.0, loopback, multicast, link-local or reserved."""
    ip = check_ipv4(field, value)
    for bad, words in (
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_link_local, "a link-local address (169.254.0.0/16 is the control network)"),
        (ip.is_reserved or ip == ipaddress.IPv4Address("255.255.255.255"), "a reserved address"),
    ):
        if bad:
            raise InvalidInput(field, f"{ip} is {words}")
    return ip


@lru_cache(maxsize=16384)
def _cidr_from_text(text: str) -> ipaddress.IPv4Network:
    if _IPV4_TEXT.fullmatch(text):
        text += "/32"
    if not _CIDR_TEXT.fullmatch(text):
        raise ValueError(f"{text!r} is not an IPv4 CIDR (a.b.c.d/n)")
    address, prefix = text.split("/")
    ip = _ipv4_from_text(address)
    if len(prefix) > 1 and prefix[0] == "0" or int(prefix) > 32:
        raise ValueError(f"{text!r} is not an IPv4 CIDR: the prefix length must be 0-32")
    net = ipaddress.IPv4Network((int(ip), int(prefix)), strict=False)
    if net.network_address != ip:
        raise ValueError(f"{text} has host bits set; did you mean {net}?")
    return net


def check_cidr(field: str, value: object) -> ipaddress.IPv4Network:
    """An IPv4 network a.b.c.d/n with no host bits set (a bare address means /32)."""
    text = check_identifier(field, value, max_len=18)
    try:
        return _cidr_from_text(text)
    except ValueError as exc:
        raise InvalidInput(field, str(exc)) from None


def check_label(field: str, value: object) -> str:
    """One RFC 1123 host label (letters, digits, inner '-', at most 63), returned in lower case."""
    text = check_identifier(field, value, max_len=63).lower()
    if not _HOST_LABEL.fullmatch(text):
        raise InvalidInput(
            field,
            f"{text!r} is not a host name: use letters, digits and inner '-' (RFC 1123, at most 63)",
        )
    return text


def check_hostname(field: str, value: object) -> str:
    """An RFC 1123 host name, possibly dotted (at most 253), returned in lower case."""
    text = check_identifier(field, value, max_len=253).lower()
    labels = text.split(".")
    for label in labels:
        if not _HOST_LABEL.fullmatch(label):
            raise InvalidInput(
                field,
                f"{text!r} is not a host name: each dot-separated label is letters, digits "
                "and inner '-' (RFC 1123, at most 63)",
            )
    if labels[-1].isdigit():
        raise InvalidInput(field, f"{text!r} looks like an address, not a host name")
    return text


def check_mac(field: str, value: object) -> str:
    """A unicast MAC address aa:bb:cc:dd:ee:ff, returned in lower case."""
    text = check_identifier(field, value, max_len=17).lower()
    if not _MAC.fullmatch(text):
        raise InvalidInput(field, f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(text[:2], 16) & 1:
        raise InvalidInput(field, f"{text} is a multicast/broadcast MAC, not a host's")
    if text == "00:00:00:00:00:00":
        raise InvalidInput(field, "00:00:00:00:00:00 is not a host's MAC")
    return text


def check_username(field: str, value: object) -> str:
    """A VPN user name: 1-64 of letters, digits, '.', '_' and '-'."""
    text = check_identifier(field, value, max_len=64)
    if not _USERNAME.fullmatch(text) or text in (".", ".."):
        raise InvalidInput(field, "use 1-64 letters, digits, '.', '_' or '-'")
    return text


def check_secret(field: str, value: object) -> str:
    """A password or pre-shared key: 8-128 printable ASCII characters. Never echoed in errors."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, got {_kind(value)}")
    if not 8 <= len(value) <= 128:
        raise InvalidInput(field, f"must be 8 to 128 characters long, got {len(value)}")
    for i, ch in enumerate(value):
        if ord(ch) > 0x7E:
            raise InvalidInput(
                field, f"character {i + 1} is not printable ASCII ({_char_name(ch).split(' ')[0]})"
            )
        if ord(ch) < 0x20:
            raise InvalidInput(field, f"character {i + 1} is a control character")
    return value


def check_url_path(field: str, value: object) -> str:
    """An HTTP request path for health checks: starts with '/', no spaces, quotes or '#'."""
    text = check_identifier(field, value, max_len=255)
    if not _URL_PATH.fullmatch(text):
        raise InvalidInput(
            field,
            "must start with '/' and use only letters, digits and ._~%!&*+,;=:@/?- "
            "(no spaces, quotes, '#' or '$')",
        )
    return text


def check_list(field: str, value: object, *, max_items: int, min_items: int = 0) -> list[Any]:
    """A JSON list of min..max items."""
    if not isinstance(value, list | tuple):
        raise InvalidInput(field, f"must be a list, got {_kind(value)}")
    if len(value) > max_items:
        raise InvalidInput(field, f"has {len(value)} items; at most {max_items} allowed")
    if len(value) < min_items:
        raise InvalidInput(field, f"needs at least {min_items} item{'s' * (min_items > 1)}")
    return list(value)


class FieldReader:
    """One JSON object of fields, read key by key; unknown keys and missing required keys are errors.

    `path` is where the object sits (`health_check`, `members[2]`), so errors name `path.key`.
    """

    def __init__(self, data: object, allowed: Iterable[str], *, path: str = "") -> None:
        if not isinstance(data, Mapping):
            raise InvalidInput(path or "fields", f"must be an object, got {_kind(data)}")
        allowed = allowed if isinstance(allowed, frozenset | tuple) else tuple(allowed)
        for key in data:
            if key not in allowed:
                if not isinstance(key, str):
                    raise InvalidInput(path or "fields", "field names must be strings")
                shown = check_field_name(key)
                expected = ", ".join(sorted(allowed) if isinstance(allowed, frozenset) else allowed)
                raise InvalidInput(join(path, shown), f"unknown field; expected one of {expected}")
        self._data = data
        self.path = path

    def name(self, key: str) -> str:
        """The dotted path of one of this object's fields."""
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        """Whether the field is present and not null."""
        return self._data.get(key) is not None

    def get(self, key: str, default: object = None) -> object:
        value = self._data.get(key)
        return default if value is None else value

    def require(self, key: str) -> object:
        """The field's value; a missing or null field is an error naming it."""
        if not self.has(key):
            raise InvalidInput(self.name(key), "is required")
        return self._data[key]


def check_field_name(key: str) -> str:
    """A field name safe to show in an error: hostile names are shown escaped and cut short."""
    if re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", key):
        return key
    return repr(key[:40])[1:-1] + ("..." if len(key) > 40 else "")

"""Template URLs: only http(s), parsed once, and printable without their credentials."""

from __future__ import annotations

import base64
import ipaddress
import urllib.parse
from dataclasses import dataclass

MAX_URL_LENGTH = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlError(ValueError):
    """The URL cannot be downloaded; the message never contains its credentials."""


@dataclass(frozen=True)
class TemplateUrl:
    """A parsed http(s) URL. `str()` and `redacted` leave out user:password and the query."""

    scheme: str
    host: str  # as written, lower-case, IPv6 without brackets
    port: int
    target: str  # path and query, as sent on the request line
    path: str
    username: str | None = None
    password: str | None = None

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def host_header(self) -> str:
        """The Host header: IDNA host, IPv6 in brackets, port only when not the default."""
        host = f"[{self.host}]" if ":" in self.host else _idna(self.host)
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    @property
    def server_name(self) -> str:
        """The name to resolve and to present in TLS (SNI)."""
        return self.host if ":" in self.host else _idna(self.host)

    @property
    def where(self) -> str:
        """host[:port] for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if DEFAULT_PORTS[self.scheme] == self.port else f"{host}:{self.port}"

    @property
    def redacted(self) -> str:
        """The URL for messages and logs: no credentials, no query (it may hold a signature)."""
        return f"{self.scheme}://{self.where}{self.path}"

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"TemplateUrl({self.redacted!r})"

    def authorization(self) -> str | None:
        """A Basic Authorization header value when the URL carries user:password."""
        if self.username is None:
            return None
        raw = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def follow(self, location: str) -> TemplateUrl:
        """The URL a redirect's Location points at; credentials only go along to the same origin."""
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in location):
            raise UrlError("the redirect's Location header holds spaces or control characters")
        base = urllib.parse.urlunsplit((self.scheme, self.host_header, self.path, "", ""))
        nxt = parse_url(urllib.parse.urljoin(base, location))
        if nxt.username is None and nxt.origin == self.origin:
            return TemplateUrl(
                nxt.scheme,
                nxt.host,
                nxt.port,
                nxt.target,
                nxt.path,
                self.username,
                self.password,
            )
        return nxt


def _idna(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise UrlError(f"host name is not valid: {exc}") from exc


def parse_url(text: object) -> TemplateUrl:
    """Parse an http(s) URL or raise UrlError saying what is wrong (without echoing credentials)."""
    if not isinstance(text, str):
        raise UrlError(f"must be a string, not {type(text).__name__}")
    if not text:
        raise UrlError("is empty")
    if len(text) > MAX_URL_LENGTH:
        raise UrlError(f"is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise UrlError("holds spaces or control characters; percent-encode them")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise UrlError(f"cannot be parsed: {_no_userinfo(str(exc), text)}") from exc
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        shown = scheme or "none"
        raise UrlError(f"only http and https URLs can be downloaded (scheme: {shown[:16]})")
    host = (parts.hostname or "").lower()
    if not host:
        raise UrlError("names no host")
    if ":" in host:
        try:
            host = str(ipaddress.IPv6Address(host.split("%", 1)[0]))
        except ValueError as exc:
            raise UrlError("host is not a valid IPv6 address") from exc
    elif not all(c.isalnum() or c in "-._" for c in host):
        raise UrlError("host name holds characters a host name cannot have")
    else:
        _idna(host)
    if port == 0:
        raise UrlError("port 0 cannot be used")
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    target = path + (
        "?" + urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=-._~?") if parts.query else ""
    )
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return TemplateUrl(
        scheme=scheme,
        host=host,
        port=port or DEFAULT_PORTS[scheme],
        target=target,
        path=path,
        username=username,
        password=password,
    )


def _no_userinfo(message: str, text: str) -> str:
    """Remove the URL's user:password part from a library message that may quote it."""
    at = text.find("@")
    if at != -1:
        start = text.find("//")
        userinfo = text[start + 2 if start != -1 else 0 : at]
        if userinfo:
            message = message.replace(userinfo, "***")
    return message

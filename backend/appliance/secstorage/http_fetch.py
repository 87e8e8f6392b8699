"""A minimal HTTP/1.1 GET client on asyncio streams, made for one job: fetching template images.

Why not urllib in a thread or an HTTP library: we must connect to the exact address we checked
(never re-resolve: DNS rebinding), re-check every redirect hop, stop at once when cancelled
(a task cancel closes the socket; a blocked urllib read cannot be interrupted), and stream
hundreds of MB/s without a dependency. One request per connection (`Connection: close`).
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from backend.appliance.secstorage.address_policy import Destination, resolve
from backend.appliance.secstorage.failure import Reason, TransferFailed
from backend.appliance.secstorage.http_connection import ReceivingConnection
from backend.appliance.secstorage.url import TemplateUrl, UrlError

USER_AGENT = "sysvm-secstorage/1"
READ_SIZE = 4 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 200
MAX_INTERIM_RESPONSES = 5
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: ([^\r\n]*))?\r?\n")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")


@dataclass
class Response:
    """The final (non-redirect) response of a GET; the body is read with `body()`."""

    url: TemplateUrl
    status: int
    reason: str
    headers: dict[str, str]
    connection: ReceivingConnection
    idle_timeout: float
    received: int = field(default=0)

    @property
    def content_length(self) -> int | None:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return None
        value = self.headers.get("content-length")
        if value is None:
            return None
        values = {v.strip() for v in value.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise self._malformed("conflicting or invalid Content-Length")
        return int(values.pop())

    def content_range(self) -> tuple[int, int | None]:
        """(first byte, complete length or None) of a 206 answer."""
        match = _CONTENT_RANGE.fullmatch(self.headers.get("content-range", "").strip())
        if match is None:
            raise self._malformed("a 206 answer without a valid Content-Range")
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total

    def unsatisfied_range_length(self) -> int | None:
        """The complete length a 416 answer names (`bytes */N`), if any."""
        match = _UNSATISFIED_RANGE.fullmatch(self.headers.get("content-range", "").strip())
        return int(match.group(1)) if match else None

    def status_text(self) -> str:
        reason = "".join(c for c in self.reason if c.isprintable())[:80]
        return f"HTTP {self.status}{' ' + reason if reason else ''} from {self.url.where}"

    async def body(self) -> AsyncIterator[memoryview]:
        """The body in chunks as they arrive; a body cut short raises TransferFailed (connection)."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            async for chunk in self._chunked():
                yield chunk
            return
        remaining = self.content_length
        while remaining is None or remaining > 0:
            want = READ_SIZE if remaining is None else min(READ_SIZE, remaining)
            chunk = await self._read(want)
            if not chunk:
                if remaining is None:
                    return
                raise TransferFailed(
                    Reason.CONNECTION,
                    f"{self.url.where} closed the connection {remaining} bytes before the end",
                    resumable=True,
                )
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk

    async def _chunked(self) -> AsyncIterator[memoryview]:
        while True:
            line = await self._line()
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise self._malformed("a bad chunk size in a chunked body") from None
            if size == 0:
                while (await self._line()).strip():  # trailers
                    pass
                return
            while size > 0:
                chunk = await self._read(min(READ_SIZE, size))
                if not chunk:
                    raise TransferFailed(
                        Reason.CONNECTION,
                        f"{self.url.where} closed the connection in the middle of a chunk",
                        resumable=True,
                    )
                size -= len(chunk)
                yield chunk
            if (await self._line()).strip():
                raise self._malformed("a chunk not followed by CRLF")

    async def _read(self, n: int) -> memoryview:
        try:
            async with asyncio.timeout(self.idle_timeout):
                chunk = await self.connection.read(n)
        except TimeoutError as exc:
            raise _idle(self.url, self.idle_timeout) from exc
        except (OSError, ssl.SSLError) as exc:
            raise _broken(self.url, exc) from exc
        self.received += len(chunk)
        return chunk

    async def _line(self) -> bytes:
        try:
            async with asyncio.timeout(self.idle_timeout):
                line = await self.connection.readline(MAX_HEADER_BYTES)
        except TimeoutError as exc:
            raise _idle(self.url, self.idle_timeout) from exc
        except ValueError as exc:
            raise self._malformed("an over-long line") from exc
        except (OSError, ssl.SSLError) as exc:
            raise _broken(self.url, exc) from exc
        if not line.endswith(b"\n"):
            raise TransferFailed(
                Reason.CONNECTION,
                f"{self.url.where} closed the connection in the middle of a chunked body",
                resumable=True,
            )
        if len(line) > MAX_HEADER_BYTES:
            raise self._malformed("an over-long line")
        return line

    def _malformed(self, what: str) -> TransferFailed:
        return TransferFailed(Reason.HTTP_STATUS, f"{self.url.where} sent {what}")

    def close(self) -> None:
        """Drop the connection (never reused)."""
        self.connection.abort()


async def fetch(
    url: TemplateUrl,
    *,
    offset: int,
    if_range: str | None,
    connect_timeout: float,
    idle_timeout: float,
    allow_local: bool,
    max_redirects: int,
    tls: ssl.SSLContext | None,
) -> Response:
    """GET `url` (from byte `offset` when > 0), following at most `max_redirects` redirects.

    Every hop's URL is checked (http/https only) and its host resolved and checked against the
    address policy. Returns the first non-redirect response, whatever its status.
    """
    hops = 0
    while True:
        response = await _get_once(
            url,
            offset=offset,
            if_range=if_range,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            allow_local=allow_local,
            tls=tls,
        )
        if response.status not in REDIRECT_STATUSES:
            return response
        response.close()
        location = response.headers.get("location")
        if not location:
            raise TransferFailed(
                Reason.HTTP_STATUS, f"{response.status_text()} is a redirect without a Location"
            )
        hops += 1
        if hops > max_redirects:
            raise TransferFailed(
                Reason.REDIRECTS,
                f"more than {max_redirects} redirects (the last from {url.redacted}); "
                f"use the final URL of the template",
            )
        try:
            url = url.follow(location)
        except UrlError as exc:
            raise TransferFailed(
                Reason.BAD_URL, f"{url.where} redirected to a URL that cannot be used: {exc}"
            ) from exc


async def _get_once(
    url: TemplateUrl,
    *,
    offset: int,
    if_range: str | None,
    connect_timeout: float,
    idle_timeout: float,
    allow_local: bool,
    tls: ssl.SSLContext | None,
) -> Response:
    destinations = await resolve(
        url.server_name, url.port, allow_local=allow_local, timeout=connect_timeout
    )
    context = (tls or _default_tls()) if url.scheme == "https" else None
    connection = await _connect(url, destinations, connect_timeout, context)
    try:
        lines = [
            f"GET {url.target} HTTP/1.1",
            f"Host: {url.host_header}",
            f"User-Agent: {USER_AGENT}",
            "Accept: */*",
            "Accept-Encoding: identity",
            "Connection: close",
        ]
        auth = url.authorization()
        if auth is not None:
            lines.append(f"Authorization: {auth}")
        if offset > 0:
            lines.append(f"Range: bytes={offset}-")
            if if_range:
                lines.append(f"If-Range: {if_range}")
        connection.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        response = Response(url, 0, "", {}, connection, idle_timeout)
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            await _read_head(response)
            if not 100 <= response.status < 200:  # skip 100 Continue, 103 Early Hints
                return response
            response.headers = {}
        raise response._malformed(f"more than {MAX_INTERIM_RESPONSES} interim (1xx) responses")
    except BaseException:
        connection.abort()
        raise


async def _read_head(response: Response) -> None:
    """Read a status line and headers into `response`."""
    head = await response._line()
    match = _STATUS_LINE.fullmatch(head)
    if match is None:
        raise response._malformed("something that is not an HTTP/1.x response")
    response.status = int(match.group(1))
    response.reason = (match.group(2) or b"").decode("latin-1")
    size = len(head)
    for _ in range(MAX_HEADERS + 1):
        line = await response._line()
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise response._malformed(f"more than {MAX_HEADER_BYTES} bytes of headers")
        if line in (b"\r\n", b"\n"):
            return
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip() or name[0] in " \t":
            raise response._malformed("a malformed header line")
        key = name.lower()
        value = value.strip()
        response.headers[key] = (
            f"{response.headers[key]}, {value}" if key in response.headers else value
        )
    raise response._malformed(f"more than {MAX_HEADERS} headers")


async def _connect(
    url: TemplateUrl,
    destinations: list[Destination],
    timeout: float,
    tls: ssl.SSLContext | None,
) -> ReceivingConnection:
    """Connect to the checked addresses in turn (TLS with the URL's host name); the first wins."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    for dest in destinations:
        sock = socket.socket(dest.family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, dest.sockaddr)
                _, connection = await loop.create_connection(
                    ReceivingConnection,
                    sock=sock,
                    ssl=tls,
                    server_hostname=url.server_name if tls is not None else None,
                    ssl_handshake_timeout=timeout if tls is not None else None,
                )
                return connection
        except TimeoutError:
            sock.close()
            errors.append(f"{dest.address}: no answer within {timeout:g}s")
            if dest is destinations[-1]:
                raise TransferFailed(
                    Reason.TIMEOUT,
                    f"cannot connect to {url.where}: {'; '.join(errors)}",
                    resumable=True,
                ) from None
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise TransferFailed(
                Reason.CONNECTION,
                f"the TLS certificate of {url.where} is not trusted: {exc.verify_message}",
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            errors.append(f"{dest.address}: {_os_reason(exc)}")
        except BaseException:
            sock.close()
            raise
    raise TransferFailed(
        Reason.CONNECTION, f"cannot connect to {url.where}: {'; '.join(errors)}", resumable=True
    )


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """The system's trust store, loaded once (loading it takes tens of milliseconds)."""
    return ssl.create_default_context()


def _idle(url: TemplateUrl, idle_timeout: float) -> TransferFailed:
    return TransferFailed(
        Reason.TIMEOUT, f"{url.where} sent nothing for {idle_timeout:g}s", resumable=True
    )


def _broken(url: TemplateUrl, exc: BaseException) -> TransferFailed:
    return TransferFailed(
        Reason.CONNECTION,
        f"the connection to {url.where} broke: {_os_reason(exc)}",
        resumable=True,
    )


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__

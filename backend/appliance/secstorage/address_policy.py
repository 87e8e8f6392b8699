"""Which addresses a template URL may reach: public ones only, unless the zone allows local URLs.

The host is resolved once, every address is checked, and the caller connects to exactly the
addresses returned here, so a DNS answer that changes between check and connect cannot matter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from backend.appliance.secstorage.failure import Reason, TransferFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class Destination:
    """One resolved address to connect to."""

    family: int
    sockaddr: tuple[str, int] | tuple[str, int, int, int]

    @property
    def address(self) -> str:
        return self.sockaddr[0]


def refusal(address: IPAddress) -> str | None:
    """What kind of non-public address `address` is ('a loopback address'), or None when public."""
    embedded: list[IPAddress] = []  # IPv4 inside IPv6 first: it names the real destination
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.append(address.teredo[1])
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for ip in [*embedded, address]:
        for words, test in (
            ("a loopback address", ip.is_loopback),
            ("a link-local address", ip.is_link_local),
            ("a multicast address", ip.is_multicast),
            ("the unspecified address", ip.is_unspecified),
            ("a private address", ip.is_private),
            ("a reserved address", ip.is_reserved),
        ):
            if test:
                return words
        if not ip.is_global:
            return "an address that is not globally routable"
    return None


async def resolve(host: str, port: int, *, allow_local: bool, timeout: float) -> list[Destination]:
    """Resolve `host`; refuse it (TransferFailed refused_address) if any address is not public."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
    except TimeoutError as exc:
        raise TransferFailed(
            Reason.TIMEOUT, f"resolving {host} took longer than {timeout:g}s", resumable=True
        ) from exc
    except (socket.gaierror, UnicodeError) as exc:
        raise TransferFailed(
            Reason.CONNECTION, f"cannot resolve {host}: {_gai_reason(exc)}", resumable=True
        ) from exc
    destinations: list[Destination] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        dest = Destination(family, sockaddr)  # type: ignore[arg-type]
        if dest not in destinations:
            destinations.append(dest)
    if not destinations:
        raise TransferFailed(
            Reason.CONNECTION, f"{host} has no IPv4 or IPv6 address", resumable=True
        )
    if not allow_local:
        for dest in destinations:
            why = refusal(ipaddress.ip_address(dest.address.split("%", 1)[0]))
            if why is not None:
                shown = "" if dest.address == host else f" resolves to {dest.address}, which"
                raise TransferFailed(
                    Reason.REFUSED_ADDRESS,
                    f"{host}{shown} is {why}; templates are only downloaded from "
                    f"public addresses unless the zone allows local URLs",
                )
    return destinations


def _gai_reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__

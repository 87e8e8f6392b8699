"""The `netns` lab's wiring: network namespaces, veth links and bridges, all named `sv-...`.

    root namespace ── sv-ctl (bridge, 169.254.0.1, the ONLY way into the lab; routes to the
                        │  zones' control ranges 169.254.k.0/24 only, so the rest of the
                        │  link-local range, e.g. a cloud's 169.254.169.254, is left alone)
                        │ sv-cN (veth)
    sv-rtr-N (router) ─ eth0 control 169.254.k.x/16 · eth1 guest gateway · eth2 public IP
                                 │ veth                      │ veth
    sv-net-M (a guest network's L2 segment: bridge br0)     sv-pub (the internet: bridge br0,
                                 │ veth                              .1 of each zone's public range)
    sv-vm-NAME (guest VM: eth0 with its MAC and address, default route via the router)

The root namespace gets no route to a public or guest address (the public ranges are even made
`unreachable` there, so they never leave by its default route). Every command is an argv list run
without a shell; nothing here takes user text but names checked by `check_name`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
from dataclasses import dataclass

from backend.errors import InvalidInput, SysvmError

PREFIX = "sv-"
CONTROL_BRIDGE = "sv-ctl"
CONTROL_GATEWAY = "169.254.0.1"
CONTROL_PREFIX = 16  # a router's control NIC: every control address is on its link
ZONE_CONTROL_PREFIX = 24  # what the root namespace routes to the bridge: one zone's range
PUBLIC_NS = "sv-pub"
BRIDGE = "br0"
UNREACHABLE_METRIC = "4242"  # marks the root namespace's unreachable routes as the lab's
NETNS_DIR = "/run/netns"


class NetnsError(SysvmError):
    """A namespace, link or address of the netns lab could not be made or removed."""


def router_ns(vm_id: int) -> str:
    return f"sv-rtr-{vm_id}"


def network_ns(net_id: int) -> str:
    return f"sv-net-{net_id}"


def guest_ns(name: str) -> str:
    return f"sv-vm-{name}"


def control_link(vm_id: int) -> str:
    """The root end of a router's control veth (a link name: at most 15 characters)."""
    return f"sv-c{vm_id}"


def problem() -> str | None:
    """Why this machine cannot run the netns lab, or None."""
    if os.geteuid() != 0:
        return "the netns back end needs root (network namespaces, iptables): run it with sudo"
    for tool, package in (
        ("ip", "iproute2"),
        ("iptables-restore", "iptables"),
        ("dnsmasq", "dnsmasq-base"),
        ("haproxy", "haproxy"),
        ("sshd", "openssh-server"),
    ):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"the netns back end needs {tool}: apt-get install -y {package}"
    return None


async def run(*argv: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run argv (no shell) and return its stdout; NetnsError with its stderr when it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    return await run("ip", *(("-n", ns) if ns else ()), *args, check=check)


def namespaces() -> list[str]:
    """The lab's namespaces that exist now."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


async def pids_in(ns: str) -> list[int]:
    out = await run("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


async def remove_ns(ns: str) -> None:
    """End every process in the namespace, then delete it (its veths go with it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = await pids_in(ns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        for _ in range(40):
            if not await pids_in(ns):
                break
            await asyncio.sleep(0.05)
        if not pids:
            break
    await run("ip", "netns", "del", ns, check=False)


async def root_links() -> list[str]:
    out = json.loads(await ip("-j", "link", "show") or "[]")
    return sorted(link["ifname"] for link in out if link["ifname"].startswith(PREFIX))


async def teardown() -> dict[str, int]:
    """Remove every namespace, root link and root route of the lab (also a crashed run's)."""
    spaces = namespaces()
    await asyncio.gather(*(remove_ns(ns) for ns in spaces))
    links = await root_links()
    for link in links:
        await ip("link", "del", link, check=False)
    routes = json.loads(await ip("-j", "-4", "route", "show", "type", "unreachable") or "[]")
    dropped = 0
    for route in routes:
        if route.get("metric") == int(UNREACHABLE_METRIC):
            await ip("route", "del", "unreachable", route["dst"], "metric", UNREACHABLE_METRIC)
            dropped += 1
    return {"namespaces": len(spaces), "links": len(links), "routes": dropped}


async def routed_elsewhere(cidr: str) -> str | None:
    """The root namespace's interface already routing (part of) `cidr`, other than the default
    route and the lab's own; None when the range is free for the lab."""
    net = ipaddress.ip_network(cidr)
    for route in json.loads(await ip("-j", "-4", "route", "show") or "[]"):
        dst = route.get("dst", "default")
        if dst == "default" or route.get("dev") == CONTROL_BRIDGE:
            continue
        if route.get("type") == "unreachable" and route.get("metric") == int(UNREACHABLE_METRIC):
            continue
        if net.overlaps(ipaddress.ip_network(dst, strict=False)):
            return str(route.get("dev") or route.get("type") or dst)
    return None


async def new_ns(ns: str) -> None:
    await run("ip", "netns", "add", ns)
    await ip("link", "set", "lo", "up", ns=ns)


async def ensure_base() -> None:
    """The control bridge in the root namespace and the public namespace (idempotent)."""
    if not await _link_exists(CONTROL_BRIDGE):
        await ip("link", "add", CONTROL_BRIDGE, "type", "bridge")
        await ip("addr", "add", f"{CONTROL_GATEWAY}/32", "dev", CONTROL_BRIDGE)
        await ip("link", "set", CONTROL_BRIDGE, "up")
    if PUBLIC_NS not in namespaces():
        await new_ns(PUBLIC_NS)
        await ip("link", "add", BRIDGE, "type", "bridge", ns=PUBLIC_NS)
        await ip("link", "set", BRIDGE, "up", ns=PUBLIC_NS)


async def ensure_control_range(control_ip: str) -> None:
    """Route the zone's control range (of `control_ip`) from the root namespace to the bridge."""
    cidr = str(ipaddress.ip_network(f"{control_ip}/{ZONE_CONTROL_PREFIX}", strict=False))
    elsewhere = await routed_elsewhere(cidr)
    if elsewhere:
        raise NetnsError(
            f"{cidr} is already routed here (by {elsewhere}); the netns lab's control bridge "
            "needs it: remove that (e.g. `ip link del cloud0`) first"
        )
    await ip("route", "replace", cidr, "dev", CONTROL_BRIDGE, "src", CONTROL_GATEWAY)


async def ensure_public_range(cidr: str, gateway: str) -> None:
    """The internet's side of a zone's public range: its gateway address in the public
    namespace; the range unreachable from the root namespace."""
    elsewhere = await routed_elsewhere(cidr)
    if elsewhere:
        raise InvalidInput(
            "zones", f"the public range {cidr} is already routed on this machine ({elsewhere})"
        )
    prefix = ipaddress.ip_network(cidr).prefixlen
    await ip("addr", "replace", f"{gateway}/{prefix}", "dev", BRIDGE, ns=PUBLIC_NS)
    await ip(
        "route", "replace", "unreachable", cidr, "metric", UNREACHABLE_METRIC
    )  # never out of the root namespace's default route


async def ensure_network(net_id: int) -> str:
    """A guest network's L2 segment: a namespace holding one bridge (idempotent)."""
    ns = network_ns(net_id)
    if ns not in namespaces():
        await new_ns(ns)
        await ip("link", "add", BRIDGE, "type", "bridge", ns=ns)
        await ip("link", "set", BRIDGE, "up", ns=ns)
    return ns


async def _link_exists(name: str, ns: str | None = None) -> bool:
    return bool((await ip("-br", "link", "show", "dev", name, ns=ns, check=False)).strip())


async def veth_to_bridge(ns: str, ifname: str, bridge_ns: str, port: str, mac: str = "") -> None:
    """A veth from `ns` (named `ifname`, up) to a port of the bridge in `bridge_ns`."""
    if await _link_exists(port, bridge_ns):
        await ip("link", "del", port, ns=bridge_ns)
    address = ("address", mac) if mac else ()
    await ip(
        "link", "add", "name", ifname, "netns", ns, *address,
        "type", "veth", "peer", "name", port, "netns", bridge_ns,
    )  # fmt: skip
    await ip("link", "set", port, "master", BRIDGE, "up", ns=bridge_ns)
    await ip("link", "set", ifname, "up", ns=ns)


@dataclass(frozen=True)
class RouterWiring:
    """Where a router's three NICs go: control, guest gateway, public address and gateway."""

    vm_id: int
    network_id: int
    control_ip: str
    guest_ip: str
    guest_prefix: int
    public_ip: str
    public_cidr: str
    public_gateway: str


async def plug_router(w: RouterWiring) -> str:
    """Make the router's namespace with its three NICs; returns its name."""
    ns = router_ns(w.vm_id)
    if ns in namespaces():
        await remove_ns(ns)
    await ensure_control_range(w.control_ip)
    await ensure_public_range(w.public_cidr, w.public_gateway)
    net = await ensure_network(w.network_id)
    await new_ns(ns)
    link = control_link(w.vm_id)
    await ip("link", "del", link, check=False)
    await ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
    await ip("link", "set", link, "master", CONTROL_BRIDGE, "up")
    await ip("addr", "add", f"{w.control_ip}/{CONTROL_PREFIX}", "dev", "eth0", ns=ns)
    await ip("link", "set", "eth0", "up", ns=ns)
    await veth_to_bridge(ns, "eth1", net, f"r{w.vm_id}")
    await ip("addr", "add", f"{w.guest_ip}/{w.guest_prefix}", "dev", "eth1", ns=ns)
    await veth_to_bridge(ns, "eth2", PUBLIC_NS, f"r{w.vm_id}")
    prefix = ipaddress.ip_network(w.public_cidr).prefixlen
    await ip("addr", "add", f"{w.public_ip}/{prefix}", "dev", "eth2", ns=ns)
    await ip("route", "add", "default", "via", w.public_gateway, ns=ns)
    await run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    return ns


@dataclass(frozen=True)
class GuestWiring:
    """A guest VM's one NIC: its MAC and address in its network, and the router's guest IP."""

    vm_id: int
    name: str
    network_id: int
    mac: str
    ip: str
    prefix: int
    gateway: str


async def plug_guest(w: GuestWiring) -> str:
    """Make the guest VM's namespace on its network's segment (kept if it is there, with what
    runs in it); returns its name."""
    ns = guest_ns(w.name)
    if ns in namespaces():
        return ns
    net = await ensure_network(w.network_id)
    await new_ns(ns)
    await veth_to_bridge(ns, "eth0", net, f"v{w.vm_id}", mac=w.mac)
    await ip("addr", "add", f"{w.ip}/{w.prefix}", "dev", "eth0", ns=ns)
    await ip("route", "add", "default", "via", w.gateway, ns=ns)
    return ns

"""Where a VM's console is: the VNC display its host gives it, and how to reach it from here.

System VMs and guest VMs are defined with a VNC display on their host (`domain_xml`: autoport,
listening on the host's `vnc_listen`, 127.0.0.1 by default). The port is only known once the
domain runs, so it is read from the live domain XML. A display that listens on the host's
loopback is reached through an SSH tunnel to the host for a remote libvirt URI
(`qemu+ssh://user@kvm1/system`), directly for a local one (`qemu:///system`). The lab's
test-driver hosts run no display at all, and say so. (A browser console through the console
proxy VM is the console proxy's work; this is the operator's direct way in.)
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import select

from backend.db.models import GuestVM, Host, SystemVM, VMState
from backend.errors import NotFound, SysvmError

if TYPE_CHECKING:
    from backend.engine.core import Engine

LOOPBACK = ("127.0.0.1", "::1", "localhost")
ANY_ADDRESS = ("0.0.0.0", "::")


async def console_of(engine: Engine, name: str) -> dict[str, Any]:
    """{vm, kind, state, host, uri, vnc: {listen, port} | None, connect: [commands], reason}.

    `connect` lists the commands (as argument lists joined for reading) an operator runs from the
    jump host; `reason` says in words why there is no console when `vnc` is None."""
    async with engine.db.read() as s:
        vm: SystemVM | GuestVM | None = (
            await s.scalars(
                select(SystemVM).where(
                    SystemVM.name == name, SystemVM.state != VMState.DESTROYED.value
                )
            )
        ).first()
        kind = vm.type if isinstance(vm, SystemVM) else "guest"
        if vm is None:
            vm = (await s.scalars(select(GuestVM).where(GuestVM.name == name))).first()
            kind = "guest"
        if vm is None:
            raise NotFound(f"no system VM or guest VM named {name!r}; `sysvm status` lists them")
        host = await s.get(Host, vm.host_id) if vm.host_id is not None else None
    answer: dict[str, Any] = {
        "vm": vm.name,
        "kind": kind,
        "state": vm.state,
        "host": host.name if host else None,
        "uri": host.uri if host else None,
        "vnc": None,
        "connect": [],
        "reason": "",
    }
    if vm.state != VMState.RUNNING.value:
        answer["reason"] = f"{vm.name} is {vm.state}; its console exists while it is Running"
    elif host is None:
        answer["reason"] = f"{vm.name} is on no host"
    elif host.state != "Up":
        answer["reason"] = f"its host {host.name} is {host.state}: the console cannot be reached"
    elif urlsplit(host.uri).scheme == "test":
        answer["reason"] = (
            f"{host.name} is a lab test-driver host: its domains have no display "
            "(on a KVM host this is the VM's VNC screen)"
        )
    else:
        try:
            xml = await engine.hypervisors.get(host.id).domain_xml(vm.name)
        except SysvmError as exc:
            answer["reason"] = f"cannot read {vm.name}'s display from {host.name}: {exc}"
            return answer
        vnc = _vnc_of(xml)
        if vnc is None:
            answer["reason"] = f"{vm.name} has no VNC display (its domain defines none)"
        else:
            answer["vnc"] = vnc
            answer["connect"] = _how_to_connect(host.uri, vnc)
    return answer


def _vnc_of(xml: str) -> dict[str, Any] | None:
    """The running domain's VNC display: {listen, port}, or None if it has none (or no port)."""
    graphics = ET.fromstring(xml).find("./devices/graphics[@type='vnc']")
    if graphics is None:
        return None
    port = int(graphics.get("port", "-1"))
    if port <= 0:
        return None
    return {"listen": graphics.get("listen") or "127.0.0.1", "port": port}


def _how_to_connect(uri: str, vnc: dict[str, Any]) -> list[str]:
    """Commands for the jump host: a viewer straight to a local or open display, else a tunnel."""
    parts = urlsplit(uri)
    listen, port = str(vnc["listen"]), int(vnc["port"])
    remote = parts.hostname not in (None, "", *LOOPBACK)
    if not remote:
        return [f"vncviewer {listen}::{port}"]
    if listen in LOOPBACK:
        login = f"{parts.username}@{parts.hostname}" if parts.username else str(parts.hostname)
        return [f"ssh -N -L {port}:{listen}:{port} {login}", f"vncviewer localhost::{port}"]
    if listen in ANY_ADDRESS:
        listen = str(parts.hostname)
    return [f"vncviewer {listen}::{port}"]

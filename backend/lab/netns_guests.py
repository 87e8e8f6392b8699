"""The `netns` back end's guests: a router is a network namespace running real OpenSSH `sshd` on
its control address, port 3922, with the router appliance as its forced command; guest VMs are
namespaces on their network's segment. Everything else (SSVM, CPVM, and the system VMs of `local`
hosts) stays with the lab's guest host (`LocalGuests`), to which this class hands it on.

A router's sshd uses the host key the engine generated for that router and trusts only the
installation's key (files in `<home>/lab/netns/<router>/`). Its appliance state (configs, last
confirmed bundle, rollback timer) lives in `<home>/lab/netns/net-<id>/`: the same paths for every
router of a network, as on real VMs, so a recreated router renders the same files and ends with
the same live digest; a new router starts with that directory emptied. The engine pushes the
current bundle on every start (`RouterService.push_current`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from backend.appliance import relay
from backend.db.models import (
    GuestNetwork,
    GuestVM,
    IpRange,
    Nic,
    NicRole,
    SystemVM,
    SystemVMType,
)
from backend.errors import SysvmError
from backend.lab import netns
from backend.lab.guest_boots import GuestBoots
from backend.lab.local_guests import LocalGuests

if TYPE_CHECKING:
    from backend.db.database import Database

log = logging.getLogger(__name__)

SSH_PORT = 3922
SSHD = "/usr/sbin/sshd"
BOOT_TIMEOUT = 20.0
# The directory holding the `backend` package, for the forced command's interpreter.
_IMPORT_ROOT = str(Path(__file__).resolve().parents[2])


class NetnsGuests:
    """Routers on `netns` hosts as namespaces with sshd; every other guest to `local`."""

    def __init__(self, local: LocalGuests, db: Database, root: Path, public_key_file: Path) -> None:
        self.local = local
        self.db = db
        self.root = root
        self.public_key_file = public_key_file
        self.netns_hosts: set[int] = set()
        self._endpoints: dict[str, tuple[str, int]] = {}
        self._booting = GuestBoots()
        self._namespaces: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._base_ready = False

    @property
    def boot_delay(self) -> float:
        """Seconds a local guest takes to boot (`lab.boot_delay`; netns routers boot at once)."""
        return self.local.boot_delay

    @boot_delay.setter
    def boot_delay(self, seconds: float) -> None:
        self.local.boot_delay = seconds

    def is_netns(self, vm: SystemVM) -> bool:
        return vm.type == SystemVMType.ROUTER.value and vm.host_id in self.netns_hosts

    def dir_of(self, vm_name: str) -> Path:
        """Where a router's sshd files are (config, host key, pid file, log)."""
        return self.root / vm_name

    def site_of(self, network_id: int) -> Path:
        """The appliance's root directory for the router of a network."""
        return self.root / f"net-{network_id}"

    # ------------------------------------------------------------------ the guests interface

    async def boot(self, vm: SystemVM, *, store_root: str | None = None) -> None:
        if not self.is_netns(vm):
            await self.local.boot(vm, store_root=store_root)
            return
        if vm.name in self._endpoints or vm.name in self._booting:
            return

        async def _boot() -> None:
            self._endpoints[vm.name] = await self._boot_router(vm)

        self._booting.start(vm.name, _boot)

    async def halt(self, vm: SystemVM) -> None:
        await self._booting.cancel(vm.name)
        self._endpoints.pop(vm.name, None)
        ns = self._namespaces.pop(vm.name, None)
        if ns is None and self.is_netns(vm):
            ns = netns.router_ns(vm.id)  # a boot cut short may have made it already
        if ns is not None and ns in netns.namespaces():
            await netns.remove_ns(ns)
        if not self.is_netns(vm):
            await self.local.halt(vm)

    def ssh_endpoint(self, vm: SystemVM) -> tuple[str, int] | None:
        if vm.name in self._endpoints:
            return self._endpoints[vm.name]
        if self.is_netns(vm):
            return None
        return self.local.ssh_endpoint(vm)

    async def stop_all(self) -> None:
        """The engine stops: its netns lab goes with it (the next start rebuilds it)."""
        await self._booting.cancel_all()
        self._endpoints.clear()
        self._namespaces.clear()
        if self._base_ready:
            await self.teardown()
        await self.local.stop_all()

    # ------------------------------------------------------------------ the lab's wiring

    async def ensure_base(self) -> None:
        """Once per engine: remove what a crashed run left behind, then make the control bridge
        and the internet's namespace."""
        async with self._lock:
            if self._base_ready:
                return
            problem = netns.problem()
            if problem:
                raise SysvmError(problem)
            left = await netns.teardown()
            if any(left.values()):
                log.info("netns lab: removed leftovers of an earlier run: %s", left)
            await netns.ensure_base()
            self._base_ready = True

    async def teardown(self) -> dict[str, int]:
        """Remove every namespace, link, route and process of the lab."""
        async with self._lock:
            self._base_ready = False
            self._endpoints.clear()
            self._namespaces.clear()
            return await netns.teardown()

    async def plug_guests(self, vm_ids: list[int]) -> list[str]:
        """Give these guest VMs their namespaces (those that exist stay); returns their names."""
        await self.ensure_base()
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    select(GuestVM, Nic, GuestNetwork)
                    .join(Nic, Nic.guest_vm_id == GuestVM.id)
                    .join(GuestNetwork, GuestNetwork.id == GuestVM.network_id)
                    .where(GuestVM.id.in_(vm_ids))
                )
            ).all()
        made = []
        for vm, nic, net in rows:
            made.append(
                await netns.plug_guest(
                    netns.GuestWiring(
                        vm_id=vm.id,
                        name=vm.name,
                        network_id=net.id,
                        mac=nic.mac,
                        ip=nic.ip,
                        prefix=ipaddress.ip_network(net.cidr).prefixlen,
                        gateway=net.gateway,
                    )
                )
            )
        return made

    async def _wiring(self, vm: SystemVM) -> netns.RouterWiring:
        async with self.db.read() as s:
            net = await s.get(GuestNetwork, vm.network_id) if vm.network_id else None
            control = await s.scalar(
                select(Nic.ip).where(Nic.system_vm_id == vm.id, Nic.role == NicRole.CONTROL.value)
            )
            public = (
                await s.scalars(
                    select(IpRange).where(
                        IpRange.zone_id == vm.zone_id, IpRange.purpose == NicRole.PUBLIC.value
                    )
                )
            ).first()
        if net is None or not control or public is None or not net.source_nat_ip:
            raise SysvmError(f"{vm.name}: no network, control address or public range to wire")
        return netns.RouterWiring(
            vm_id=vm.id,
            network_id=net.id,
            control_ip=control,
            guest_ip=net.gateway,
            guest_prefix=ipaddress.ip_network(net.cidr).prefixlen,
            public_ip=net.source_nat_ip,
            public_cidr=public.cidr,
            public_gateway=public.gateway,
        )

    async def _boot_router(self, vm: SystemVM) -> tuple[str, int]:
        await self.ensure_base()
        wiring = await self._wiring(vm)
        ns = await netns.plug_router(wiring)
        self._namespaces[vm.name] = ns
        where = self.dir_of(vm.name)
        site = self.site_of(wiring.network_id)
        await asyncio.to_thread(self._prepare_site, site, vm.name)
        appliance = _appliance_argv(vm.name, site, ns, await _iptables_variant(ns))
        await asyncio.to_thread(self._write_sshd_files, vm, wiring.control_ip, where, appliance)
        await self._start_service(ns, where, appliance)
        # What a router does as it starts: re-apply its last confirmed bundle, if it has one.
        try:
            await netns.run(
                "ip", "netns", "exec", ns, *appliance,
                env={
                    **os.environ, "SSH_ORIGINAL_COMMAND": "sysvm-router boot",
                    "PYTHONPATH": _IMPORT_ROOT,
                },
            )  # fmt: skip
        except netns.NetnsError as exc:  # it still comes up: the engine pushes its bundle
            log.warning("router %s could not re-apply its last confirmed bundle: %s", vm.name, exc)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        await netns.run(
            "ip", "netns", "exec", ns, SSHD, "-f", str(where / "sshd_config"),
            "-E", str(where / "sshd.log"),
        )  # fmt: skip
        await _wait_listening(wiring.control_ip, SSH_PORT, BOOT_TIMEOUT)
        return wiring.control_ip, SSH_PORT

    @staticmethod
    async def _start_service(ns: str, where: Path, appliance: list[str]) -> None:
        """The router's appliance service (`backend.appliance.router_service`): one process that
        keeps its parsed state, reached through the relay sshd runs. It lives in the router's
        namespace and ends with it."""
        service = [
            *(sys.executable, "-m", "backend.appliance.router_service"),
            *appliance[appliance.index("--vm") :],  # the same --vm --root --netns --iptables
            *("--booted-at", f"{time.time():.3f}"),
        ]
        log_file = where / "appliance-service.log"
        with log_file.open("ab") as out:
            await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, *service,
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env={**os.environ, "PYTHONPATH": _IMPORT_ROOT}, start_new_session=True,
            )  # fmt: skip

    @staticmethod
    def _prepare_site(site: Path, vm_name: str) -> None:
        """Keep the state of the router that ran here before only if it is this same router."""
        owner = site / "owner"
        if site.exists() and (not owner.exists() or owner.read_text() != vm_name):
            shutil.rmtree(site)
        site.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner.write_text(vm_name)

    def _write_sshd_files(
        self, vm: SystemVM, control_ip: str, where: Path, appliance: list[str]
    ) -> None:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = where / "ssh_host_ed25519_key"
        key.unlink(missing_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(vm.host_key_private)
        engine_key = self.public_key_file.read_text().strip()
        (where / "authorized_keys").write_text(f"restrict {engine_key}\n")
        command = shlex.join(["exec", *appliance, "--booted-at", f"{time.time():.3f}"])
        (where / "sshd_config").write_text(
            "\n".join(
                [
                    "# Generated by sysvm for a router of the netns lab.",
                    f"ListenAddress {control_ip}:{SSH_PORT}",
                    f"HostKey {key}",
                    f"PidFile {where / 'sshd.pid'}",
                    f"AuthorizedKeysFile {where / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "AllowUsers root",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "DisableForwarding yes",
                    "PermitTTY no",
                    "PermitUserEnvironment no",
                    "MaxSessions 10",
                    "MaxStartups 100:30:200",
                    # bash, as the shell sshd runs the forced command with, reads root's
                    # ~/.bashrc when started by sshd unless it is nested (SHLVL): the jump
                    # host's shell setup (pyenv, prompts) cost each command 150 ms.
                    f"SetEnv PYTHONPATH={_IMPORT_ROOT} SHLVL=1",
                    f"ForceCommand {command}",
                    "",
                ]
            )
        )

    def sshd_pid(self, vm_name: str) -> int | None:
        try:
            return int((self.dir_of(vm_name) / "sshd.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def reload_sshd(self, vm_name: str) -> None:
        """Make the router's sshd re-read its config and host key (SIGHUP), as after a reinstall."""
        pid = self.sshd_pid(vm_name)
        if pid is None or pid <= 1:
            raise SysvmError(f"{vm_name}: no sshd runs")
        os.kill(pid, signal.SIGHUP)


def _appliance_argv(vm_name: str, site: Path, ns: str, iptables: str) -> list[str]:
    """The router appliance's command (sshd's ForceCommand; also run once at boot): the relay
    to the router's appliance service, which runs the command itself if the service is not up.
    `-S`: the appliance needs the standard library only (found through PYTHONPATH), and skipping
    site-packages saves a third of the relay's start; it runs as a file, as `-m` costs runpy."""
    return [
        *(sys.executable, "-S", relay.__file__),
        *("--vm", vm_name, "--root", str(site), "--netns", ns, "--iptables", iptables),
    ]


async def _iptables_variant(ns: str) -> str:
    """The iptables a router uses: legacy where this kernel has it, as it reads a table back
    3-4 times faster than the nft one (a 10,000-rule readback: ~30 ms against ~170 ms), which
    bounds how fast a one-rule change can be confirmed; else the system's default."""
    if shutil.which("iptables-legacy-restore"):
        probe = ("ip", "netns", "exec", ns, "iptables-legacy-save", "-t", "filter")
        with contextlib.suppress(netns.NetnsError):
            await netns.run(*probe)
            return "iptables-legacy"
    return "iptables"


async def _wait_listening(address: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 1.0)
        except (OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise SysvmError(f"sshd on {address}:{port} did not answer: {exc}") from exc
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return

"""The netns lab's data plane: real packets between namespaces through a router that is a namespace
with real sshd, iptables, dnsmasq and haproxy, driven through the engine API.

Every test builds a one-network lab (`lab up --backend netns`: zone1-net1 with vm1 and vm2) and
removes every `sv-` namespace, link and process when it ends, even on failure. Skipped (with the
reason) without root, network namespaces, sshd, dnsmasq or haproxy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from sqlalchemy import select

from backend.db.models import GuestNetwork, GuestVM, Nic, SystemVM, SystemVMType, VMState
from backend.engine.core import Engine
from backend.errors import HostKeyMismatch, SysvmError
from backend.lab import netns
from tests.conftest import converge_lab, run_cli
from tests.netns_host import netns_problem

PROBLEM = netns_problem() or netns.problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"netns lab: {PROBLEM}")

NET = "zone1-net1"
INTERNET = "203.0.113.1"  # the public namespace's address (zone1's public gateway)
SECOND_SOURCE = "203.0.113.2"  # another address of the public namespace, for source filtering


@dataclass
class GuestInfo:
    name: str
    ip: str
    mac: str

    @property
    def ns(self) -> str:
        return netns.guest_ns(self.name)


@dataclass
class NetnsLab:
    engine: Engine
    public_ip: str
    vms: list[GuestInfo]
    tmp: Path
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def serve_http(self, ns: str, address: str, port: int, body: str) -> Path:
        """A `python3 -m http.server` in `ns`; returns its log (the clients it served)."""
        root = self.tmp / f"www-{ns}-{port}"
        root.mkdir(exist_ok=True)
        (root / "who").write_text(body)
        log = self.tmp / f"http-{ns}-{port}.log"
        with open(log, "wb") as out:
            self.servers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-m", "http.server", str(port)]
                    + ["--bind", address, "--directory", str(root)],
                    stdout=out,
                    stderr=out,
                    stdin=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if ns_run(ns, "curl", "-s", "-m", "1", f"http://{address}:{port}/who").stdout == body:
                return log
            time.sleep(0.1)
        raise AssertionError(f"http server in {ns} did not start; log: {log.read_text()}")

    async def apply(self, confirm_timeout: float = 10) -> Any:
        job = await self.engine.router_apply(NET, confirm_timeout=confirm_timeout)
        job = await self.engine.wait_job(job.id, timeout=60)
        assert job.state == "succeeded", job.error
        return job

    async def rule(self, rule_type: str, **fields: Any) -> int:
        added = await self.engine.router_rule_add(NET, rule_type, fields)
        return int(added["id"])

    async def forward_8080(self, vm: GuestInfo, **extra: Any) -> int:
        """A port forward of public_ip:8080 to the guest's port 80 (tcp)."""
        return await self.rule(
            "port-forward",
            public_ip=self.public_ip,
            public_port=8080,
            private_ip=vm.ip,
            private_port=80,
            protocol="tcp",
            **extra,
        )

    async def serve_forwarded(self) -> int:
        """vm1 serves "vm1" over HTTP on port 80, forwarded from public_ip:8080 and applied;
        returns the rule's id."""
        vm1 = self.vms[0]
        self.serve_http(vm1.ns, vm1.ip, 80, "vm1")
        rule = await self.forward_8080(vm1)
        await self.apply()
        return rule

    async def router(self) -> SystemVM:
        async with self.engine.db.read() as s:
            router = (
                await s.scalars(
                    select(SystemVM).where(
                        SystemVM.type == SystemVMType.ROUTER.value,
                        SystemVM.state != VMState.DESTROYED.value,
                    )
                )
            ).one()
        return router


def ns_run(ns: str, *argv: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout
    )


async def fetch(ns: str, url: str, source: str | None = None) -> subprocess.CompletedProcess[str]:
    """curl from inside a namespace (from the `source` address if given); 3 s at most."""
    bind = ["--interface", source] if source else []
    return await asyncio.to_thread(ns_run, ns, "curl", "-s", "-m", "3", *bind, url)


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def lab(make_engine: Any, tmp_path: Path) -> AsyncIterator[NetnsLab]:
    made: NetnsLab | None = None
    try:
        engine: Engine = await make_engine()
        await converge_lab(engine, zones=1, hosts=1, networks=1, vms=2, backend="netns")
        async with engine.db.read() as s:
            net = (await s.scalars(select(GuestNetwork).where(GuestNetwork.name == NET))).one()
            rows = (
                await s.execute(
                    select(GuestVM.name, Nic.ip, Nic.mac)
                    .join(Nic, Nic.guest_vm_id == GuestVM.id)
                    .order_by(GuestVM.name)
                )
            ).all()
        made = NetnsLab(engine, net.source_nat_ip, [GuestInfo(*r) for r in rows], tmp_path)
        router = await made.router()
        await until(lambda: _answers(engine, router), 30, "the router answers the engine over SSH")
        yield made
    finally:
        for server in made.servers if made else []:
            server.kill()
            server.wait()
        await netns.teardown()


async def _answers(engine: Engine, router: SystemVM) -> bool:
    return engine.guests.ssh_endpoint(router) is not None


async def test_port_forward_reaches_a_guest_server_and_deleting_it_cuts_the_path(
    lab: NetnsLab,
) -> None:
    vm1 = lab.vms[0]
    lab.serve_http(vm1.ns, vm1.ip, 80, "vm1")
    url = f"http://{lab.public_ip}:8080/who"
    assert (await fetch(netns.PUBLIC_NS, url)).stdout != "vm1", "nothing forwards before a rule"
    rule = await lab.forward_8080(vm1)
    await lab.apply()
    got = await fetch(netns.PUBLIC_NS, url)
    assert got.returncode == 0 and got.stdout == "vm1", got
    await lab.engine.router_rule_delete(NET, rule)
    await lab.apply()
    gone = await fetch(netns.PUBLIC_NS, url)
    assert gone.returncode != 0 and gone.stdout != "vm1", gone


_UDP_ECHO = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "while True:\n"
    " d,a=s.recvfrom(100)\n"
    " s.sendto(b'echo '+d,a)\n"
)
_UDP_ASK = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.settimeout(1)\n"
    "s.sendto(b'hi',(sys.argv[1],int(sys.argv[2])))\n"
    "try: print(s.recvfrom(100)[0].decode())\n"
    "except OSError: print('no answer')\n"
)


async def test_a_udp_port_forward_reaches_exactly_its_port(lab: NetnsLab) -> None:
    """UDP ports are matched with `multiport` (see netfilter._port_match): a datagram to the
    forwarded port is answered by the guest, one to the next port is not."""
    vm1 = lab.vms[0]
    echo = subprocess.Popen(
        ["ip", "netns", "exec", vm1.ns, sys.executable, "-c", _UDP_ECHO, vm1.ip, "9999"],
        stdin=subprocess.DEVNULL,
    )
    lab.servers.append(echo)
    await lab.rule(
        "port-forward",
        public_ip=lab.public_ip,
        public_port=5300,
        private_ip=vm1.ip,
        private_port=9999,
        protocol="udp",
    )
    await lab.apply()

    async def ask(port: int) -> str:
        done = await asyncio.to_thread(
            ns_run, netns.PUBLIC_NS, sys.executable, "-c", _UDP_ASK, lab.public_ip, str(port)
        )
        return done.stdout.strip()

    await until(lambda: _echoes(ask), 10, "the guest echoes through the forward")
    assert await ask(5301) == "no answer"


async def _echoes(ask: Callable[[int], Awaitable[str]]) -> bool:
    return await ask(5300) == "echo hi"


async def test_the_routers_appliance_service_keeps_its_state_so_a_change_is_a_delta(
    lab: NetnsLab,
) -> None:
    """sshd's relay hands every session to the router's long-lived appliance service: the second
    apply is loaded as a delta, which needs the first one's ruleset in memory (a process per
    session would load the complete ruleset every time)."""
    router = await lab.router()
    await until(lambda: _service_runs(router.name), 30, "the appliance service runs")
    await lab.forward_8080(lab.vms[0])
    first = await lab.apply()
    assert first.result is not None and first.result["iptables"] == "full"
    await lab.rule("firewall-ingress", public_ip=lab.public_ip, protocol="tcp", start_port=2222)
    second = await lab.apply()
    assert second.result is not None and second.result["iptables"] == "delta", second.result
    assert second.result["drift"] is False and second.result["input"] == "patch"
    # Where this kernel has legacy iptables the router uses it (its readback is 3-4x faster).
    if shutil.which("iptables-legacy-save"):
        argv = await asyncio.to_thread(
            subprocess.run, ["pgrep", "-af", f"router_service --vm {router.name} "],
            capture_output=True, text=True,
        )  # fmt: skip
        assert "--iptables iptables-legacy" in argv.stdout, argv.stdout


async def _service_runs(vm: str) -> bool:
    listed = await asyncio.to_thread(
        subprocess.run, ["pgrep", "-f", f"router_service --vm {vm} "], capture_output=True
    )
    return listed.returncode == 0


async def test_ingress_firewall_admits_exactly_the_listed_source(lab: NetnsLab) -> None:
    vm1 = lab.vms[0]
    lab.serve_http(vm1.ns, vm1.ip, 80, "vm1")
    netns_ip = ["ip", "-n", netns.PUBLIC_NS, "addr", "add", f"{SECOND_SOURCE}/24", "dev", "br0"]
    subprocess.run(netns_ip, check=True)
    await lab.forward_8080(vm1, open_firewall=False)
    await lab.rule(
        "firewall-ingress",
        public_ip=lab.public_ip,
        protocol="tcp",
        start_port=8080,
        source_cidrs=[f"{SECOND_SOURCE}/32"],
    )
    await lab.apply()
    url = f"http://{lab.public_ip}:8080/who"
    allowed = await fetch(netns.PUBLIC_NS, url, source=SECOND_SOURCE)
    assert allowed.returncode == 0 and allowed.stdout == "vm1", allowed
    refused = await fetch(netns.PUBLIC_NS, url, source=INTERNET)
    assert refused.returncode != 0 and refused.stdout != "vm1", refused


async def test_source_nat_lets_a_guest_reach_the_internet_from_the_public_ip(
    lab: NetnsLab,
) -> None:
    log = lab.serve_http(netns.PUBLIC_NS, INTERNET, 8000, "internet")
    vm1 = lab.vms[0]
    url = f"http://{INTERNET}:8000/who"
    before = await fetch(vm1.ns, url)
    assert before.stdout != "internet", "without source NAT the internet cannot answer a guest"
    await lab.rule("source-nat", public_ip=lab.public_ip)
    await lab.apply()
    got = await fetch(vm1.ns, url)
    assert got.returncode == 0 and got.stdout == "internet", got
    served = [line for line in log.read_text().splitlines() if "GET /who" in line]
    assert served and served[-1].startswith(f"{lab.public_ip} "), served  # seen as the public IP


async def test_load_balancer_spreads_requests_over_two_guest_servers(lab: NetnsLab) -> None:
    for vm in lab.vms:
        lab.serve_http(vm.ns, vm.ip, 80, vm.name)
    await lab.rule(
        "load-balancer",
        name="web",
        public_ip=lab.public_ip,
        public_port=8081,
        private_port=80,
        algorithm="roundrobin",
        members=[{"ip": vm.ip, "port": 80} for vm in lab.vms],
    )
    await lab.apply()
    answers = [
        (await fetch(netns.PUBLIC_NS, f"http://{lab.public_ip}:8081/who")).stdout for _ in range(6)
    ]
    assert sorted(set(answers)) == sorted(vm.name for vm in lab.vms), answers
    assert answers.count(lab.vms[0].name) == 3, f"round robin alternates: {answers}"


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox (udhcpc) not installed")
async def test_dhcp_static_entry_hands_its_address_to_the_guests_dhcp_client(
    lab: NetnsLab,
) -> None:
    vm2 = lab.vms[1]
    await lab.rule("dhcp-entry", mac=vm2.mac, ip="10.1.101.77", hostname="web2")
    await lab.apply()
    got = await asyncio.to_thread(
        ns_run,
        vm2.ns,
        *("busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1"),
        *("-s", "/bin/true"),
        timeout=20,
    )
    assert "lease of 10.1.101.77 obtained" in got.stdout + got.stderr, got


async def test_a_bundle_cutting_the_control_path_is_rolled_back_by_the_router(
    lab: NetnsLab,
) -> None:
    rule = await lab.serve_forwarded()
    url = f"http://{lab.public_ip}:8080/who"
    assert (await fetch(netns.PUBLIC_NS, url)).stdout == "vm1"
    # The next bundle drops the forward AND admits SSH only from an address the engine lacks.
    await lab.engine.router_rule_delete(NET, rule)
    started = time.monotonic()
    with pytest.raises(SysvmError, match="could not be confirmed"):
        await lab.engine.routers.apply(
            NET, confirm_timeout=3, control_sources=("169.254.255.254/32",)
        )

    async def forward_is_back() -> bool:
        return (await fetch(netns.PUBLIC_NS, url)).stdout == "vm1"

    await until(forward_is_back, 15, "the router rolled back to version 1 by itself")
    check = await lab.engine.router_check(NET)
    assert check["live_version"] == 1 and check["drift"] is False, check
    print(f"\nrolled back and reachable again {time.monotonic() - started:.1f} s after apply")


async def test_a_recreated_router_ends_with_the_same_live_digest_without_an_operator(
    lab: NetnsLab,
) -> None:
    await lab.serve_forwarded()
    before = await lab.engine.router_check(NET)
    old = await lab.router()
    job = await lab.engine.system_vm_action(old.name, "destroy")
    job = await lab.engine.wait_job(job.id, timeout=60)
    assert job.state == "succeeded", job.error

    async def replaced() -> bool:
        lab.engine.reconciler.poke()
        try:
            new = await lab.router()
        except Exception:
            return False
        return new.name != old.name and new.state == VMState.RUNNING.value

    await until(replaced, 60, "the reconciler made and started a new router")
    new = await lab.router()
    after = await lab.engine.router_check(NET)
    assert after["router"] == new.name != old.name
    assert after["live_digest"] == before["live_digest"] and after["drift"] is False, after
    got = await fetch(netns.PUBLIC_NS, f"http://{lab.public_ip}:8080/who")
    assert got.stdout == "vm1", "the forward works through the new router"


async def test_a_rebooted_router_reapplies_its_last_confirmed_bundle_by_itself(
    lab: NetnsLab,
) -> None:
    await lab.serve_forwarded()
    router = await lab.router()
    await lab.engine.guests.halt(router)  # the guest powers off: its namespace is gone
    assert netns.router_ns(router.id) not in netns.namespaces()
    await lab.engine.guests.boot(router)  # and boots again; the engine pushes nothing here
    await until(lambda: _answers(lab.engine, router), 30, "the router's sshd is back")
    got = await fetch(netns.PUBLIC_NS, f"http://{lab.public_ip}:8080/who")
    assert got.stdout == "vm1", got


async def test_an_engine_restart_brings_the_lab_back_with_its_rules(
    lab: NetnsLab, make_engine: Any
) -> None:
    await lab.serve_forwarded()
    before = await lab.engine.router_check(NET)
    await lab.engine.stop()  # the lab goes with its engine: namespaces, sshd, services
    assert netns.namespaces() == []
    engine: Engine = await make_engine()  # the same home: it rebuilds the lab from the database
    lab.engine = engine
    router = await lab.router()
    await until(lambda: _answers(engine, router), 30, "the router is back")
    after = await engine.router_check(NET)
    assert after["live_digest"] == before["live_digest"] and after["drift"] is False, after
    vm1 = lab.vms[0]
    lab.serve_http(vm1.ns, vm1.ip, 80, "vm1 again")  # its guest namespace is back, empty
    got = await fetch(netns.PUBLIC_NS, f"http://{lab.public_ip}:8080/who")
    assert got.stdout == "vm1 again", got


async def test_a_router_answering_with_another_host_key_is_refused_and_reported(
    lab: NetnsLab,
) -> None:
    router = await lab.router()
    endpoint = lab.engine.guests.ssh_endpoint(router)
    assert endpoint is not None
    await lab.engine.router_check(NET)  # trusted: its own key
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh")
    key_file = lab.engine.guests.dir_of(router.name) / "ssh_host_ed25519_key"
    key_file.write_bytes(impostor)
    lab.engine.guests.reload_sshd(router.name)
    lab.engine.transport.drop(endpoint[0], endpoint[1], router.host_key_public)
    await asyncio.sleep(0.5)  # sshd re-executes itself on SIGHUP
    with pytest.raises(HostKeyMismatch) as err:
        await lab.engine.router_check(NET)
    assert endpoint[0] in str(err.value) and "host key" in str(err.value).lower()


async def test_lab_exec_runs_argv_in_a_namespace_and_passes_the_exit_status_back(
    lab: NetnsLab,
) -> None:
    home = {"SYSVM_HOME": str(lab.engine.home)}
    shown = run_cli("lab", "exec", "public", "--", "ip", "-br", "addr", "show", "br0", env=home)
    assert shown.returncode == 0 and INTERNET in shown.stdout, shown
    vm1 = lab.vms[0]
    mine = run_cli("lab", "exec", vm1.name, "--", "ip", "-br", "addr", env=home)
    assert vm1.ip in mine.stdout, mine
    status = run_cli("lab", "exec", vm1.name, "--", "sh", "-c", "exit 7", env=home)
    assert status.returncode == 7
    unknown = run_cli("lab", "exec", "nosuch-vm", "--", "true", env=home)
    assert unknown.returncode == 1 and "no guest VM named 'nosuch-vm'" in unknown.stderr
    hostile = run_cli("lab", "exec", "vm1;reboot", "--", "true", env=home)
    assert hostile.returncode == 1 and "NAME" in hostile.stderr


async def test_the_root_namespace_reaches_the_lab_only_through_the_control_bridge(
    lab: NetnsLab,
) -> None:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    lines = [ln for ln in routes.splitlines() if netns.CONTROL_BRIDGE in ln]
    assert lines and all(ln.startswith("169.254.1.0/24 ") for ln in lines), routes
    metadata = subprocess.run(["ip", "route", "get", "169.254.169.254"], capture_output=True)
    assert netns.CONTROL_BRIDGE.encode() not in metadata.stdout, (
        "the rest of 169.254/16 is not ours"
    )
    got = subprocess.run(
        ["ip", "route", "get", lab.public_ip], capture_output=True, text=True
    )  # unreachable: never out of the default route
    assert got.returncode != 0, got.stdout
    guest = subprocess.run(["ip", "route", "get", lab.vms[0].ip], capture_output=True, text=True)
    assert netns.CONTROL_BRIDGE not in guest.stdout and "sv-" not in guest.stdout


async def test_lab_down_leaves_no_namespace_link_route_or_process(lab: NetnsLab) -> None:
    vm1 = lab.vms[0]
    lab.serve_http(vm1.ns, vm1.ip, 80, "vm1")
    await lab.rule("load-balancer", name="web", public_ip=lab.public_ip, public_port=8081,
                   members=[{"ip": vm1.ip, "port": 80}])  # fmt: skip
    await lab.apply()  # dnsmasq and haproxy run now
    lab_dir = str(lab.engine.home / "lab")
    assert _lab_processes(lab_dir), "sshd, dnsmasq and haproxy run before down"
    job = await lab.engine.wait_job((await lab.engine.lab_down()).id, timeout=60)
    assert job.state == "succeeded", job.error
    assert netns.namespaces() == []
    assert await netns.root_links() == []
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert netns.UNREACHABLE_METRIC not in routes and netns.CONTROL_BRIDGE not in routes
    for server in lab.servers:  # the guest's own processes ended with its namespace
        assert server.wait(timeout=5) is not None
    deadline = time.monotonic() + 5
    while (left := _lab_processes(lab_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []


def _lab_processes(marker: str) -> list[str]:
    """Live (not zombie) processes whose command line names the lab's directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z" and marker in cmdline:
            found.append(f"{pid} {cmdline[:120]}")
    return found


@pytest.fixture
def crashed_run() -> Any:
    """What a crashed netns lab leaves: a router namespace with a process in it, a root link."""
    subprocess.run(["ip", "netns", "add", "sv-rtr-999"], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", "sv-rtr-999", "sleep", "600"])
    try:
        link = ["ip", "link", "add", "sv-c999", "type", "veth", "peer", "name", "sv-c999p"]
        subprocess.run(link, check=True)
        yield sleeper
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "netns", "del", "sv-rtr-999"], capture_output=True)
        subprocess.run(["ip", "link", "del", "sv-c999"], capture_output=True)


async def test_lab_up_first_removes_the_leftovers_of_a_crashed_run(
    crashed_run: subprocess.Popen[bytes], lab: NetnsLab
) -> None:
    assert "sv-rtr-999" not in netns.namespaces()
    assert "sv-c999" not in await netns.root_links()
    assert crashed_run.wait(timeout=5) is not None, "the leftover's process was ended"
    assert netns.router_ns((await lab.router()).id) in netns.namespaces()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
def test_netns_commands_refuse_a_user_who_is_not_root_in_one_line() -> None:
    with tempfile.TemporaryDirectory() as where:  # pytest's tmp_path is root's alone
        os.chmod(where, 0o777)
        _refused_as_nobody(Path(where))


def _refused_as_nobody(where: Path) -> None:
    env = {**os.environ, "HOME": str(where), "SYSVM_HOME": str(where / "home")}
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    for args, says in (
        (["lab", "up", "--backend", "netns"], "the netns back end needs root"),
        (["lab", "exec", "public", "--", "true"], "run it as root"),
    ):
        done = subprocess.run(
            [*nobody, sys.executable, "-m", "backend.cli", *args],
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1 and says in done.stderr, done
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr

"""The router applier end to end: real SSH on loopback, real files, a real detached rollback timer,
and (as root) real iptables in a network namespace.

Every command goes through ApplianceEndpoints and the engine's SystemVMTransport exactly as the
engine calls it (`sysvm-router VERB`, bundle JSON on stdin, one JSON line back); one test runs
the lab's real guest host process and kills it to prove the rollback timer outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backend.appliance.endpoint import ApplianceEndpoints
from backend.appliance.router import vpn
from backend.appliance.router.agent import register_router
from backend.appliance.router.apply import RouterApplier
from backend.appliance.router.apply_errors import ApplyFailed
from backend.appliance.router.installer import Stopwatch, TablesChange, install
from backend.appliance.router.layout import RouterPaths
from backend.appliance.router.live_digest import (
    canonical_netfilter,
    digest_of,
    live_digest,
    save_shows,
)
from backend.appliance.router.netfilter import render_ruleset
from backend.appliance.router.render import RenderedRouter, render_router
from backend.appliance.router.rule_tables import NamespaceTables, TablesError
from backend.appliance.router.site import RouterSite
from backend.appliance.router.state_dir import SECRET_FILES
from backend.router.bundle import BundleNetwork, RouterAddresses, RouterBundle, bundle_patch
from backend.transport.ssh import (
    SystemVMTransport,
    generate_keypair,
    load_client_key,
    new_host_key,
)
from tests.startup_modules import modules_added_by
from tests.test_router_render import big_bundle, one_rule_changed
from tests.test_router_rules import CIDR, GATEWAY, PUBLIC, VALID, make_bundle

ROUTER = "r-5-VM"
ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- bundles


def bundle(version: int, *rules: tuple[int, str, dict[str, Any]]) -> RouterBundle:
    return RouterBundle.create(
        version=version,
        network=BundleNetwork("net-1", CIDR, GATEWAY, 100, "net-1.cloud.internal", ("192.0.2.53",)),
        addresses=RouterAddresses("169.254.3.4", GATEWAY, tuple(sorted(PUBLIC))),
        rules=list(rules),
    )


PORT_FORWARD = (10, "port-forward", VALID["port-forward"])
INGRESS = (11, "firewall-ingress", VALID["firewall-ingress"])
EGRESS = (12, "firewall-egress", VALID["firewall-egress"])
SNAT = (13, "source-nat", {"public_ip": "203.0.113.5"})
DHCP = (14, "dhcp-entry", VALID["dhcp-entry"])


def web_bundle(version: int, ssh_port: int = 22) -> RouterBundle:
    """A port forward and firewall rules; `ssh_port` changes one ingress rule."""
    ingress = (
        11,
        "firewall-ingress",
        {**VALID["firewall-ingress"], "start_port": ssh_port, "end_port": ssh_port},
    )
    return bundle(version, PORT_FORWARD, ingress, EGRESS, SNAT, DHCP)


def rendered_for(b: RouterBundle, root: Path) -> RenderedRouter:
    """What the router at `root` renders (its config files name its own directories)."""
    return render_router(b, paths=RouterPaths(str(root / "config"), str(root / "state")))


# ---------------------------------------------------------------- SSH lab


@pytest.fixture(scope="module")
def engine_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "id_ed25519"
    generate_keypair(path)
    return path


@dataclass
class Answer:
    exit_status: int
    body: dict[str, Any]
    stderr: str


@dataclass
class RouterLab:
    endpoints: ApplianceEndpoints
    engine_key: Path
    sites: dict[str, RouterSite]
    host_private: str
    host_public: str
    port: int
    transport: SystemVMTransport

    @property
    def root(self) -> Path:
        return self.sites[ROUTER].root

    def new_transport(self) -> SystemVMTransport:
        return SystemVMTransport(load_client_key(self.engine_key), command_timeout=300)

    async def run(
        self,
        command: str,
        stdin: str | None = None,
        *,
        transport: SystemVMTransport | None = None,
        port: int | None = None,
    ) -> Answer:
        result = await (transport or self.transport).run(
            "127.0.0.1", port or self.port, self.host_public, f"sysvm-router {command}", stdin
        )
        lines = result.stdout.splitlines()
        assert len(lines) == 1, (result.stdout, result.stderr)
        return Answer(result.exit_status, json.loads(lines[0]), result.stderr)

    async def ok(self, command: str, stdin: str | None = None, **kw: Any) -> dict[str, Any]:
        answer = await self.run(command, stdin, **kw)
        assert answer.exit_status == 0, answer
        return answer.body

    async def apply(self, b: RouterBundle, confirm_timeout: float | None = None) -> dict[str, Any]:
        extra = f" --confirm-timeout {confirm_timeout:g}" if confirm_timeout else ""
        return await self.ok(f"apply{extra}", b.to_json())


async def _lab(engine_key: Path, site: RouterSite) -> AsyncIterator[RouterLab]:
    endpoints = ApplianceEndpoints(engine_key.with_suffix(".pub").read_text())
    sites = {ROUTER: site}

    def site_of(vm: str) -> RouterSite:
        if vm not in sites:
            raise ValueError(f"{vm} is not a router")
        return sites[vm]

    register_router(endpoints, site_of)
    host_private, host_public = new_host_key()
    port = await endpoints.start(ROUTER, host_private, boot_args={"type": "router"})
    transport = SystemVMTransport(load_client_key(engine_key), command_timeout=300)
    lab = RouterLab(endpoints, engine_key, sites, host_private, host_public, port, transport)
    try:
        yield lab
    finally:
        await lab.transport.close()
        await endpoints.stop_all()


@pytest.fixture
async def lab(engine_key: Path, tmp_path: Path) -> AsyncIterator[RouterLab]:
    async for value in _lab(engine_key, RouterSite(tmp_path / "router")):
        yield value


async def eventually(
    probe: Callable[[], Awaitable[dict[str, Any]]],
    until: Callable[[dict[str, Any]], bool],
    timeout: float,
) -> tuple[dict[str, Any], float]:
    """Poll `probe` until `until` holds; returns the answer and how long it took."""
    start = time.monotonic()
    while True:
        answer = await probe()
        if until(answer):
            return answer, time.monotonic() - start
        assert time.monotonic() - start < timeout, f"still {answer} after {timeout}s"
        await asyncio.sleep(0.05)


async def eventually_true(probe: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"not true after {timeout}s"
        await asyncio.sleep(0.05)


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rolled_back(show: dict[str, Any]) -> bool:
    return show["pending_confirm"] is None and show["last_rollback"] is not None


# ---------------------------------------------------------------- local mode


async def test_local_apply_answers_version_digest_and_the_expected_live_digest(
    lab: RouterLab,
) -> None:
    b = web_bundle(1)
    expected = rendered_for(b, lab.root)
    answer = await lab.apply(b)
    assert answer["version"] == 1
    assert answer["digest"] == b.digest
    assert answer["live_digest"] == expected.expected_live_digest
    assert answer["expected_live_digest"] == expected.expected_live_digest
    assert answer["drift"] is False and answer["pending_confirm"] is False
    assert answer["mode"] == "local" and answer["iptables"] == "recorded"
    assert answer["services"] == {"dnsmasq": "reloaded", "haproxy": "skipped", "vpn": "skipped"}
    assert {"parse", "render", "iptables_restore", "readback", "total"} <= set(answer["timings_ms"])
    # Nothing touched a kernel: the ruleset is recorded, the files are in the router's config dir.
    assert (lab.root / "applier" / "tables.rules").read_text() == expected.iptables
    for name, text in expected.files.items():
        assert (lab.root / "config" / name).read_text() == text
    show = await lab.ok("show")
    assert show["version"] == 1 and show["confirmed_version"] == 1
    assert show["live_digest"] == expected.expected_live_digest
    assert show["last_rollback"] is None and show["pending_confirm"] is None
    assert show["paths"] == {
        "config_dir": str(lab.root / "config"),
        "state_dir": str(lab.root / "state"),
    }


async def test_reapplying_the_live_or_an_older_version_is_refused_naming_version(
    lab: RouterLab,
) -> None:
    await lab.apply(web_bundle(5))
    for version in (5, 4):
        refused = await lab.run("apply", web_bundle(version, ssh_port=2222).to_json())
        assert refused.exit_status == 2
        assert refused.body["field"] == "version"
        assert "not greater than the live version 5" in refused.body["error"]
        assert refused.body["live_version"] == 5
    show = await lab.ok("show")
    assert show["version"] == 5 and show["digest"] == web_bundle(5).digest


async def test_check_finds_no_drift_until_the_recorded_state_is_tampered_with(
    lab: RouterLab,
) -> None:
    b = web_bundle(1)
    await lab.apply(b)
    check = await lab.ok("check")
    assert check["drift"] is False
    assert check["live_digest"] == rendered_for(b, lab.root).expected_live_digest
    tables = lab.root / "applier" / "tables.rules"
    tables.write_text(tables.read_text().replace("COMMIT", "-A SYSVM_INPUT -j ACCEPT\nCOMMIT", 1))
    check = await lab.ok("check")
    assert check["drift"] is True
    assert check["differences"] == ["filter/SYSVM_INPUT"]
    hosts = lab.root / "config" / "dnsmasq.hosts"
    hosts.write_text(hosts.read_text() + "10.1.1.99 intruder\n")
    check = await lab.ok("check")
    assert check["differences"] == ["filter/SYSVM_INPUT", "file dnsmasq.hosts"]
    # The next apply puts everything back (the file is rewritten, the ruleset recorded whole).
    answer = await lab.apply(web_bundle(2))
    assert answer["drift"] is False and answer["services"]["dnsmasq"] == "reloaded"
    assert (await lab.ok("check"))["drift"] is False


async def test_only_services_whose_files_changed_are_reloaded(lab: RouterLab) -> None:
    await lab.apply(bundle(1, SNAT, DHCP))
    same = await lab.apply(bundle(2, SNAT, DHCP))
    assert same["services"] == {"dnsmasq": "unchanged", "haproxy": "unchanged", "vpn": "unchanged"}
    lb = (20, "load-balancer", VALID["load-balancer"])
    added = await lab.apply(bundle(3, SNAT, DHCP, lb))
    assert added["services"] == {"dnsmasq": "unchanged", "haproxy": "reloaded", "vpn": "unchanged"}
    dhcp2 = (15, "dhcp-entry", {"mac": "02:00:0a:01:01:0b", "ip": "10.1.1.11", "hostname": "web2"})
    more = await lab.apply(bundle(4, SNAT, DHCP, lb, dhcp2))
    assert more["services"] == {"dnsmasq": "reloaded", "haproxy": "unchanged", "vpn": "unchanged"}
    reloads = [
        json.loads(x) for x in (lab.root / "applier" / "reloads.jsonl").read_text().splitlines()
    ]
    assert [r["reloaded"] for r in reloads] == [["dnsmasq"], ["haproxy"], ["dnsmasq"]]


async def test_bad_requests_are_refused_with_the_field_and_change_nothing(lab: RouterLab) -> None:
    await lab.apply(web_bundle(1))
    cases = [
        ("apply", "{not json", "bundle"),
        ("apply", json.dumps({**web_bundle(2).to_dict(), "version": -1}), "version"),
        ("apply --confirm-timeout soon", web_bundle(2).to_json(), "confirm_timeout"),
        ("apply --confirm-timeout 1e9", web_bundle(2).to_json(), "confirm_timeout"),
        ("apply --force", web_bundle(2).to_json(), "args"),
        ("confirm", None, "version"),
        ("confirm two", None, "version"),
        ("confirm 7", None, "version"),  # nothing waits for a confirm
        ("show extra", None, "args"),
    ]
    data = web_bundle(2).to_dict()
    data["rules"][0]["fields"]["private_ip"] = "10.9.9.9"  # outside the network
    cases.append(("apply", json.dumps(data), "rules[0].fields.private_ip"))
    for command, stdin, field in cases:
        refused = await lab.run(command, stdin)
        assert refused.exit_status == 2, (command, refused)
        assert refused.body["field"] == field, (command, refused.body)
    assert (await lab.ok("show"))["version"] == 1


async def test_a_vm_that_is_not_a_router_refuses_router_commands(lab: RouterLab) -> None:
    private, public = new_host_key()
    port = await lab.endpoints.start("s-1-VM", private, boot_args={"type": "secstorage"})
    result = await lab.transport.run("127.0.0.1", port, public, "sysvm-router show")
    assert result.exit_status == 2
    body = json.loads(result.stdout)
    assert body["field"] == "vm" and "s-1-VM is not a router" in body["error"]


async def test_secret_config_files_are_private_and_the_others_readable(lab: RouterLab) -> None:
    vpn_rules = (1, "remote-access-vpn", VALID["remote-access-vpn"])
    await lab.apply(bundle(1, SNAT, DHCP, vpn_rules))
    modes = {p.name: p.stat().st_mode & 0o777 for p in (lab.root / "config").iterdir()}
    assert {vpn.IPSEC_SECRETS, vpn.CHAP_SECRETS} == SECRET_FILES
    assert {n for n, m in modes.items() if m == 0o600} == SECRET_FILES
    assert all(m == 0o644 for n, m in modes.items() if n not in SECRET_FILES)
    assert "PSK 0s" in (lab.root / "config" / vpn.IPSEC_SECRETS).read_text()


def test_the_applier_renders_exactly_what_render_router_does(tmp_path: Path) -> None:
    b = make_bundle()
    applier = RouterApplier(RouterSite(tmp_path))
    mine = applier.render(b)
    theirs = rendered_for(b, tmp_path)
    assert mine.iptables == theirs.iptables
    assert mine.files == dict(theirs.files)
    assert mine.services == dict(theirs.services)
    assert mine.expected_live_digest == theirs.expected_live_digest


# ---------------------------------------------------------------- commit-confirmed, local mode


async def test_an_unconfirmed_apply_rolls_back_to_the_last_confirmed_bundle(
    lab: RouterLab,
) -> None:
    v1 = web_bundle(1)
    await lab.apply(v1)
    sent = time.monotonic()
    applied = await lab.apply(web_bundle(2, ssh_port=2222), confirm_timeout=1)
    assert applied["pending_confirm"] is True and applied["version"] == 2
    show = await lab.ok("show")
    assert show["version"] == 2 and show["confirmed_version"] == 1
    assert show["pending_confirm"]["version"] == 2 and show["pending_confirm"]["rollback_to"] == 1
    show, _ = await eventually(lambda: lab.ok("show"), rolled_back, timeout=10)
    waited = time.monotonic() - sent
    print(f"\nTIMING local rollback seen {waited:.2f}s after sending an apply with a 1s window")
    assert 0.95 < waited < 5
    assert show["version"] == 1 and show["digest"] == v1.digest
    assert show["last_rollback"]["from_version"] == 2
    assert show["last_rollback"]["to_version"] == 1
    assert show["last_rollback"]["by"] == "timer" and show["last_rollback"]["ok"] is True
    expected = rendered_for(v1, lab.root)
    assert show["live_digest"] == expected.expected_live_digest
    assert (lab.root / "applier" / "tables.rules").read_text() == expected.iptables
    check = await lab.ok("check")
    assert check["drift"] is False and check["version"] == 1
    # The window is closed: confirming now says the rollback already happened.
    late = await lab.run("confirm 2")
    assert late.exit_status == 1
    assert "already rolled back to version 1" in late.body["error"]
    assert late.body["rolled_back"]["from_version"] == 2
    # The engine can push again with a newer version.
    assert (await lab.apply(web_bundle(3, ssh_port=2222)))["version"] == 3


async def test_a_confirmed_apply_stays_after_its_window(lab: RouterLab) -> None:
    await lab.apply(web_bundle(1))
    v3 = web_bundle(3, ssh_port=2222)
    applied = await lab.apply(v3, confirm_timeout=2)
    assert applied["pending_confirm"] is True
    timer = json.loads((lab.root / "applier" / "pending.json").read_text())["pid"]
    assert process_alive(timer)
    fresh = lab.new_transport()  # the engine confirms over a NEW connection
    try:
        confirmed = await lab.ok("confirm 3", transport=fresh)
    finally:
        await fresh.close()
    assert confirmed["confirmed"] == 3 and confirmed["window_left_s"] > 0
    await eventually_true(lambda: not process_alive(timer), timeout=5)  # disarmed: killed
    await asyncio.sleep(2.5)
    show = await lab.ok("show")
    assert show["version"] == 3 and show["confirmed_version"] == 3
    assert show["pending_confirm"] is None and show["last_rollback"] is None
    assert (await lab.ok("check"))["drift"] is False
    again = await lab.ok("confirm 3")
    assert again == {"confirmed": 3, "already": True}


def test_the_timer_process_starts_without_the_rollback_code() -> None:
    """Every windowed apply starts a timer, on the router's own CPU: it loads no module of ours
    and none of pathlib, json, argparse or subprocess until its deadline passes (it starts in
    10-20 ms, against 80-90 ms with them). The rollback tests above prove it still rolls back."""
    added = modules_added_by(ROOT / "backend/appliance/router/rollback_timer_process.py")
    assert not {m for m in added if m.startswith("backend")}, added
    assert not added & {"pathlib", "json", "argparse", "subprocess", "dataclasses", "runpy"}, added


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--root", "/tmp/r"],
        ["--token", "ab"],
        ["--root", "/tmp/r", "--token"],
        ["--root", "/tmp/r", "--token", "ab", "--shell", "x"],
        ["--root", "--token", "ab"],
    ],
)
def test_the_timer_process_refuses_a_command_line_its_launcher_did_not_make(
    argv: list[str],
) -> None:
    script = ROOT / "backend/appliance/router/rollback_timer_process.py"
    done = subprocess.run(
        [sys.executable, "-S", str(script), *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=10,
    )
    assert done.returncode == 2 and done.stdout == ""  # refused before forking or reporting
    assert done.stderr.startswith("usage: rollback_timer_process.py")


async def test_the_rollback_happens_when_the_ssh_session_dies_right_after_apply(
    lab: RouterLab,
) -> None:
    await lab.apply(web_bundle(1))
    await lab.apply(web_bundle(2, ssh_port=2222), confirm_timeout=1)
    # Kill the session and the guest's endpoint (as a crash would); the timer is not tied to them.
    await lab.transport.close()
    await lab.endpoints.stop(ROUTER)
    await asyncio.sleep(1.5)
    port = await lab.endpoints.start(ROUTER, lab.host_private, boot_args={"type": "router"})
    lab.port = port
    lab.transport = lab.new_transport()
    show, _ = await eventually(lambda: lab.ok("show"), rolled_back, timeout=10)
    assert show["version"] == 1 and show["last_rollback"]["by"] == "timer"
    assert (await lab.ok("check"))["drift"] is False


async def test_a_newer_apply_inside_a_window_keeps_the_rollback_target(lab: RouterLab) -> None:
    await lab.apply(web_bundle(1))
    await lab.apply(web_bundle(2, ssh_port=2222), confirm_timeout=3)
    await lab.apply(web_bundle(3, ssh_port=2223), confirm_timeout=1.5)
    show = await lab.ok("show")
    assert show["pending_confirm"]["version"] == 3 and show["pending_confirm"]["rollback_to"] == 1
    show, _ = await eventually(lambda: lab.ok("show"), rolled_back, timeout=10)
    # v3's timer rolls back to the confirmed v1 ...
    assert show["version"] == 1
    assert show["last_rollback"]["from_version"] == 3 and show["last_rollback"]["to_version"] == 1
    assert "within 1.5s" in show["last_rollback"]["reason"]
    # ... and v2's, superseded, stands down when its own deadline passes.
    first = show["last_rollback"]
    await asyncio.sleep(2)
    show = await lab.ok("show")
    assert show["version"] == 1 and show["last_rollback"] == first


async def test_an_apply_without_a_window_inside_one_confirms_itself(lab: RouterLab) -> None:
    await lab.apply(web_bundle(1))
    await lab.apply(web_bundle(2, ssh_port=2222), confirm_timeout=2)
    await lab.apply(web_bundle(3, ssh_port=2223))
    await asyncio.sleep(2.5)
    show = await lab.ok("show")
    assert show["version"] == 3 and show["confirmed_version"] == 3
    assert show["last_rollback"] is None


async def test_a_first_bundle_applied_with_a_window_rolls_back_to_the_factory_state(
    lab: RouterLab,
) -> None:
    await lab.apply(web_bundle(1), confirm_timeout=1)
    show, _ = await eventually(lambda: lab.ok("show"), rolled_back, timeout=10)
    assert show["version"] is None and show["confirmed_version"] is None
    assert show["last_rollback"]["to_version"] is None and show["last_rollback"]["ok"] is True
    assert sorted(p.name for p in (lab.root / "config").iterdir()) == []
    assert (lab.root / "applier" / "tables.rules").read_text() == ""
    assert (await lab.ok("check"))["drift"] is False
    assert (await lab.apply(web_bundle(1)))["version"] == 1  # any version goes on a fresh router


async def test_boot_reapplies_the_last_confirmed_bundle(lab: RouterLab) -> None:
    v1 = web_bundle(1)
    await lab.apply(v1)
    # A reboot: the recorded tables are gone, a config file is stale.
    (lab.root / "applier" / "tables.rules").unlink()
    (lab.root / "config" / "dnsmasq.hosts").write_text("")
    assert (await lab.ok("check"))["drift"] is True
    booted = await lab.ok("boot")
    assert booted["version"] == 1 and booted["applied"] is True
    assert booted["pending_confirm"] is False and "rolled_back" not in booted
    assert booted["live_digest"] == rendered_for(v1, lab.root).expected_live_digest
    assert (await lab.ok("check"))["drift"] is False
    # Restarting inside a confirm window is a rollback to the confirmed bundle.
    await lab.apply(web_bundle(2, ssh_port=2222), confirm_timeout=30)
    booted = await lab.ok("boot")
    assert booted["version"] == 1 and booted["rolled_back"]["from_version"] == 2
    assert booted["rolled_back"]["by"] == "boot"
    show = await lab.ok("show")
    assert show["version"] == 1 and show["pending_confirm"] is None


async def test_boot_with_a_bundle_pushes_the_engines_bundle_to_a_new_or_restarted_router(
    lab: RouterLab,
) -> None:
    v5 = web_bundle(5)
    # A recreated router has nothing: the engine's bundle goes live, confirmed, without a window.
    booted = await lab.ok("boot", v5.to_json())
    assert booted["version"] == 5 and booted["applied"] is True and booted["iptables"] == "recorded"
    assert booted["live_digest"] == rendered_for(v5, lab.root).expected_live_digest
    show = await lab.ok("show")
    assert show["version"] == 5 and show["confirmed_version"] == 5
    # The same version again is a complete re-apply; an older or different one is refused.
    assert (await lab.ok("boot", v5.to_json()))["version"] == 5
    for other in (web_bundle(4), web_bundle(5, ssh_port=2222)):
        refused = await lab.run("boot", other.to_json())
        assert refused.exit_status == 2 and refused.body["field"] == "version"
        assert refused.body["message"].startswith(f"{other.version} is older than, or differs")
    # A bundle on trial that the engine pushes again at boot is kept, and its window closed.
    v6 = web_bundle(6, ssh_port=2222)
    await lab.apply(v6, confirm_timeout=30)
    booted = await lab.ok("boot", v6.to_json())
    assert booted["version"] == 6 and "rolled_back" not in booted
    show = await lab.ok("show")
    assert show["confirmed_version"] == 6 and show["pending_confirm"] is None
    assert show["last_rollback"] is None


# ---------------------------------------------------------------- the lab's guest host process


class GuestHostProcess:
    """`python -m backend.lab.guest_host` driven by JSON lines, as the engine's LocalGuests does."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._ids = iter(range(1, 1_000_000))

    @classmethod
    async def start(cls, pubkey: Path) -> GuestHostProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backend.lab.guest_host",
            str(pubkey),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        return cls(proc)

    async def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req["id"] = next(self._ids)
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        await self.proc.stdin.drain()
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 60))
        assert reply["id"] == req["id"]
        return reply

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


async def test_the_guest_host_serves_routers_and_the_rollback_outlives_it(
    engine_key: Path, tmp_path: Path
) -> None:
    root = tmp_path / "r-9-VM"
    private, public = new_host_key()
    boot = {
        "op": "boot",
        "vm": "r-9-VM",
        "host_key": private,
        "boot_args": {"type": "router", "name": "r-9-VM"},
        "router_root": str(root),
    }
    transport = SystemVMTransport(load_client_key(engine_key), command_timeout=60)
    host = await GuestHostProcess.start(engine_key.with_suffix(".pub"))
    try:
        port = (await host.request(**boot))["port"]

        async def run(command: str, stdin: str | None = None) -> dict[str, Any]:
            result = await transport.run(
                "127.0.0.1", port, public, f"sysvm-router {command}", stdin
            )
            assert result.exit_status == 0, result
            body: dict[str, Any] = json.loads(result.stdout)
            return body

        v1 = web_bundle(1)
        assert (await run("apply", v1.to_json()))["live_digest"] == rendered_for(
            v1, root
        ).expected_live_digest
        answer = await run("apply --confirm-timeout 1", web_bundle(2, ssh_port=2222).to_json())
        assert answer["pending_confirm"] is True
        await host.kill()  # the whole appliance host dies, every SSH session with it
        await transport.close()
        record = root / "applier" / "rollback.json"
        await eventually_true(record.exists, timeout=10)  # the timer did it, nothing else ran
        # A new guest host boots the router on the same root: it re-applies the confirmed v1,
        # and `show` tells the rollback the timer did while nothing else ran.
        host = await GuestHostProcess.start(engine_key.with_suffix(".pub"))
        port = (await host.request(**boot))["port"]
        show, _ = await eventually(lambda: run("show"), rolled_back, timeout=10)
        assert show["version"] == 1 and show["confirmed_version"] == 1
        assert show["last_rollback"]["by"] == "timer" and show["last_rollback"]["from_version"] == 2
        assert (await run("check"))["drift"] is False
    finally:
        await transport.close()
        await host.kill()


async def test_the_guest_host_keeps_a_temp_dir_per_router_without_router_root(
    engine_key: Path,
) -> None:
    private, public = new_host_key()
    transport = SystemVMTransport(load_client_key(engine_key), command_timeout=60)
    host = await GuestHostProcess.start(engine_key.with_suffix(".pub"))
    try:
        boot = {"op": "boot", "vm": "r-3-VM", "host_key": private, "boot_args": {"type": "router"}}
        port = (await host.request(**boot))["port"]
        result = await transport.run(
            "127.0.0.1", port, public, "sysvm-router apply", web_bundle(1).to_json()
        )
        assert result.exit_status == 0, result
        show = json.loads(
            (await transport.run("127.0.0.1", port, public, "sysvm-router show")).stdout
        )
        config_dir = Path(show["paths"]["config_dir"])
        assert config_dir.name == "config" and config_dir.parent.name == "r-3-VM"
        assert (config_dir / "dnsmasq.conf").exists()
    finally:
        await transport.close()
        assert host.proc.stdin is not None
        host.proc.stdin.close()  # EOF: the guest host stops and removes the temp dirs
        await asyncio.wait_for(host.proc.wait(), 10)
    assert not config_dir.exists()


# ---------------------------------------------------------------- netns mode (root)


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    for tool in ("ip", "iptables-restore", "iptables-save"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    name = f"sysvmprobe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        tried = subprocess.run(
            ["ip", "netns", "exec", name, "iptables-restore", "--test"],
            input="*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",
            capture_output=True,
            text=True,
        )
        if tried.returncode != 0:
            return f"iptables-restore does not work in a namespace: {tried.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


NETNS_PROBLEM = _netns_problem()
needs_netns = pytest.mark.skipif(NETNS_PROBLEM is not None, reason=str(NETNS_PROBLEM))
VARIANTS = ["iptables"] + (["iptables-legacy"] if shutil.which("iptables-legacy-restore") else [])


def ns(name: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], input=stdin, capture_output=True, text=True
    )


def _add_interface(name: str, ifname: str) -> None:
    """A NIC named as RouterInterfaces expects: a dummy, or a veth when dummies are unavailable."""
    made = ns(name, "ip", "link", "add", ifname, "type", "dummy")
    if made.returncode != 0:
        made = ns(
            name, "ip", "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}-peer"
        )
    assert made.returncode == 0, made.stderr


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"sysvmtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for ifname in ("eth0", "eth1", "eth2"):
            _add_interface(name, ifname)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def saved(name: str, variant: str = "iptables") -> str:
    done = ns(name, f"{variant}-save")
    assert done.returncode == 0, done.stderr
    return done.stdout


def _is_rule_11_ssh(line: str) -> bool:
    """web_bundle's rule 11 (admitting SSH on port 22) as a line of its bucket chain."""
    return line.startswith("-A SYSVM_FWI_11 ") and "--dport 22 " in line


def rule_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("-A ")}


@pytest.fixture
async def netns_lab(
    engine_key: Path, tmp_path: Path, netns: str, request: pytest.FixtureRequest
) -> AsyncIterator[RouterLab]:
    """A router in netns mode; parametrize it indirectly with an iptables variant."""
    variant = getattr(request, "param", "iptables")
    async for value in _lab(engine_key, RouterSite(tmp_path / "router", netns, variant)):
        yield value


@needs_netns
async def test_netns_apply_loads_the_rules_into_the_namespace(
    netns_lab: RouterLab, netns: str
) -> None:
    lab = netns_lab
    b = web_bundle(1)
    expected = rendered_for(b, lab.root)
    answer = await lab.apply(b)
    assert answer["mode"] == "netns" and answer["iptables"] == "full"
    assert answer["live_digest"] == expected.expected_live_digest
    assert answer["drift"] is False
    assert {"iptables_restore", "readback"} <= set(answer["timings_ms"])
    live = saved(netns)
    assert rule_lines(expected.iptables) <= rule_lines(live)
    assert any("--to-destination 10.1.1.10:80" in line for line in rule_lines(live))
    assert any(_is_rule_11_ssh(line) for line in rule_lines(live))
    assert canonical_netfilter(live) == canonical_netfilter(expected.iptables)
    assert not (lab.root / "applier" / "tables.rules").exists()  # nothing recorded: it is real
    assert (await lab.ok("check"))["drift"] is False
    # Drift in the kernel is seen by check.
    assert ns(netns, "iptables", "-A", "SYSVM_INPUT", "-j", "ACCEPT").returncode == 0
    check = await lab.ok("check")
    assert check["drift"] is True and check["differences"] == ["filter/SYSVM_INPUT"]


@needs_netns
async def test_netns_one_rule_change_is_applied_as_a_delta(
    netns_lab: RouterLab, netns: str
) -> None:
    lab = netns_lab
    await lab.apply(web_bundle(1))
    v2 = web_bundle(2, ssh_port=2222)
    answer = await lab.apply(v2)
    assert answer["iptables"] == "delta"
    expected = rendered_for(v2, lab.root)
    assert answer["live_digest"] == expected.expected_live_digest
    live = rule_lines(saved(netns))
    assert any("--dport 2222" in line for line in live)
    assert not any(_is_rule_11_ssh(line) for line in live)
    # Same rules under a new version: nothing to load, the digest still read back.
    same = await lab.apply(web_bundle(3, ssh_port=2222))
    assert same["iptables"] == "unchanged" and same["drift"] is False
    # A delta on tables someone changed meanwhile is caught and the complete ruleset loaded.
    assert ns(netns, "iptables", "-t", "nat", "-A", "SYSVM_DNAT", "-j", "RETURN").returncode == 0
    repaired = await lab.apply(web_bundle(4, ssh_port=2224))
    assert repaired["iptables"] == "full (delta found drift)"
    assert repaired["drift"] is False
    assert (await lab.ok("check"))["drift"] is False


@needs_netns
@pytest.mark.parametrize("netns_lab", VARIANTS, indirect=True)
async def test_netns_a_patch_is_applied_as_a_delta_with_an_exact_live_digest(
    netns_lab: RouterLab, netns: str
) -> None:
    lab = netns_lab
    variant = lab.sites[ROUTER].iptables
    v1 = RouterBundle.from_json(web_bundle(1).to_json())
    await lab.apply(v1)
    v2 = web_bundle(2, ssh_port=2222)
    answer = await lab.ok("apply --patch", bundle_patch(v1, v2))
    assert answer["iptables"] == "delta" and answer["drift"] is False
    assert answer["version"] == 2 and answer["digest"] == v2.digest
    expected = rendered_for(v2, lab.root)
    # The quick readback gave the digest that parsing what is live gives.
    assert answer["live_digest"] == expected.expected_live_digest
    assert live_digest(saved(netns, variant), expected.files) == expected.expected_live_digest
    assert any("--dport 2222" in line for line in rule_lines(saved(netns, variant)))
    # The router keeps the bundle the patch made: the next apply is refused as not newer, and
    # boot re-applies it.
    assert (await lab.ok("show"))["digest"] == v2.digest
    # A patch of a bundle that is not live is refused naming `base`, and nothing changes.
    stale = await lab.run("apply --patch", bundle_patch(v1, web_bundle(3, ssh_port=2223)))
    assert stale.exit_status == 2 and stale.body["field"] == "base"
    assert (await lab.ok("show"))["version"] == 2
    # Someone changed another table: a patch touching one table still finds it (the readback
    # reads every table) and loads the complete ruleset.
    tamper = ns(netns, variant, "-t", "nat", "-A", "SYSVM_DNAT", "-j", "RETURN")
    assert tamper.returncode == 0, tamper.stderr
    v4 = web_bundle(4, ssh_port=2224)
    repaired = await lab.ok("apply --patch", bundle_patch(v2, v4))
    assert repaired["iptables"] == "full (delta found drift)" and repaired["drift"] is False
    assert (await lab.ok("check"))["drift"] is False
    booted = await lab.ok("boot")
    assert booted["digest"] == v4.digest and booted["drift"] is False


@needs_netns
@pytest.mark.parametrize("variant", VARIANTS)
def test_netns_the_quick_readback_recognises_real_iptables_save_output(
    netns: str, variant: str
) -> None:
    ruleset = render_ruleset(big_bundle())
    loaded = ns(netns, f"{variant}-restore", stdin=ruleset.restore_text())
    assert loaded.returncode == 0, loaded.stderr
    tables = NamespaceTables(netns, variant)
    text = tables.save()
    assert save_shows(text, ruleset)
    assert live_digest(text, {}) == digest_of(ruleset.canonical_text(), {})
    assert ns(netns, variant, "-t", "mangle", "-D", "SYSVM_FWI_05", "1").returncode == 0
    changed = tables.save()
    assert not save_shows(changed, ruleset)
    assert live_digest(changed, {}) != digest_of(ruleset.canonical_text(), {})


@needs_netns
async def test_netns_unconfirmed_apply_restores_the_previous_iptables(
    netns_lab: RouterLab, netns: str
) -> None:
    lab = netns_lab
    v1 = web_bundle(1)
    await lab.apply(v1)
    before = canonical_netfilter(saved(netns))
    applied = await lab.apply(bundle(2, SNAT), confirm_timeout=1)
    assert applied["pending_confirm"] is True
    assert canonical_netfilter(saved(netns)) != before
    show, _ = await eventually(lambda: lab.ok("show"), rolled_back, timeout=15)
    assert show["version"] == 1 and show["last_rollback"]["ok"] is True
    assert canonical_netfilter(saved(netns)) == before
    assert show["live_digest"] == rendered_for(v1, lab.root).expected_live_digest
    assert (await lab.ok("check"))["drift"] is False


def waiting_timers(root: Path) -> set[int]:
    """Rollback timers of the router at `root` that are alive (armed or waiting to be)."""
    found = subprocess.run(
        ["pgrep", "-f", f"rollback_timer_process.py --root {root} "], capture_output=True, text=True
    )
    return {int(pid) for pid in found.stdout.split()}


def detached_timers(root: Path) -> set[int]:
    """Those of `waiting_timers` no longer children of this process (the launcher)."""
    out = set()
    for pid in waiting_timers(root):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != os.getpid():
                out.add(pid)
    return out


@needs_netns
async def test_netns_the_next_window_is_armed_by_a_timer_started_ahead_and_still_rolls_back(
    netns_lab: RouterLab, netns: str
) -> None:
    """In netns mode (one appliance per router) a rollback timer is started after each windowed
    apply, so the next window is armed without waiting for an interpreter; armed that way, an
    unconfirmed window still rolls back."""
    lab = netns_lab
    await lab.apply(web_bundle(1))
    assert waiting_timers(lab.root) == set()  # no window, no timer started ahead
    await lab.apply(web_bundle(2, ssh_port=2222), confirm_timeout=60)
    await lab.ok("confirm 2")
    # The timer started ahead has forked away from its launcher and waits to be armed.
    await eventually_true(lambda: len(detached_timers(lab.root)) == 1, timeout=10)
    (spare,) = detached_timers(lab.root)
    before = canonical_netfilter(saved(netns))
    applied = await lab.apply(web_bundle(3, ssh_port=2223), confirm_timeout=1)
    assert applied["pending_confirm"] is True
    pending = json.loads((lab.root / "applier" / "pending.json").read_text())
    assert pending["pid"] == spare  # armed: the timer started ahead guards this window
    show, _ = await eventually(lambda: lab.ok("show"), rolled_back, timeout=15)
    assert show["version"] == 2 and show["last_rollback"]["ok"] is True
    assert canonical_netfilter(saved(netns)) == before
    assert spare not in waiting_timers(lab.root)  # it ran its window and ended


@needs_netns
async def test_netns_first_bundle_rolled_back_leaves_the_namespace_as_it_was(
    netns_lab: RouterLab, netns: str
) -> None:
    lab = netns_lab
    assert rule_lines(saved(netns)) == set()
    await lab.apply(web_bundle(1), confirm_timeout=1)
    show, _ = await eventually(lambda: lab.ok("show"), rolled_back, timeout=15)
    assert show["version"] is None and show["last_rollback"]["ok"] is True
    after = saved(netns)
    assert "SYSVM_" not in after and rule_lines(after) == set()
    assert ":INPUT ACCEPT" in after and ":FORWARD ACCEPT" in after
    assert (await lab.ok("check"))["drift"] is False


@needs_netns
@pytest.mark.parametrize("variant", VARIANTS)
def test_netns_a_ruleset_failing_in_a_later_table_leaves_the_tables_as_they_were(
    netns: str, variant: str, tmp_path: Path
) -> None:
    """A complete ruleset is loaded without a separate --test pass: if it fails part way (legacy
    iptables has committed the tables before the failing one), the ruleset live before is loaded
    again, so the tables end exactly as they were."""
    site = RouterSite(tmp_path / "router", netns, variant, services=False)
    state = site.state()
    state.ensure()
    good = rendered_for(web_bundle(1), tmp_path).iptables
    assert ns(netns, f"{variant}-restore", stdin=good).returncode == 0
    before = canonical_netfilter(saved(netns, variant))
    new = rendered_for(web_bundle(2, ssh_port=2222), tmp_path).iptables
    # filter and nat load; mangle names a chain nobody declared.
    bad = new.replace("*mangle\n", "*mangle\n-A SYSVM_NOWHERE -j ACCEPT\n", 1)
    assert bad.index("*filter") < bad.index("*mangle") and bad != new
    with pytest.raises(TablesError) as err:
        install(
            state,
            site.tables(state),
            site.reloads(state),
            files={},
            service_files={},
            services_before={},
            services_now={},
            change=TablesChange(bad, test=False, undo=good),
            watch=Stopwatch(),
        )
    assert "the previous ruleset is live again" in str(err.value)
    assert canonical_netfilter(saved(netns, variant)) == before


@needs_netns
@pytest.mark.parametrize("variant", VARIANTS)
def test_netns_a_first_bundle_failing_in_a_later_table_leaves_what_ran_before(
    netns: str, variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before a router's first bundle, what to load again on failure is what the tables hold,
    read while the bundle is parsed. A failure in a later table cannot be produced with a valid
    bundle, so the rendered ruleset is given a bad mangle line (an injected fault)."""
    for table, chain, source in (
        ("filter", "INPUT", "192.0.2.99/32"),
        ("nat", "POSTROUTING", "192.0.2.98/32"),
        ("mangle", "PREROUTING", "192.0.2.97/32"),
    ):
        made = ns(netns, variant, "-t", table, "-A", chain, "-s", source, "-j", "RETURN")
        assert made.returncode == 0, made.stderr
    before = canonical_netfilter(saved(netns, variant))
    applier = RouterApplier(RouterSite(tmp_path / "router", netns, variant, services=False))
    render = applier.render

    def bad_render(*args: Any, **kwargs: Any) -> Any:
        rendered = render(*args, **kwargs)
        good = rendered.iptables
        rendered.__dict__["iptables"] = good.replace("*mangle\n", "*mangle\n-A SYSVM_NO -j X\n")
        return rendered

    monkeypatch.setattr(applier, "render", bad_render)
    with pytest.raises(ApplyFailed) as err:
        applier.apply(web_bundle(1).to_json())
    assert "the previous ruleset is live again" in str(err.value)
    after = canonical_netfilter(saved(netns, variant))
    assert after == before and "-A INPUT -s 192.0.2.99/32 -j RETURN" in after


@needs_netns
def test_netns_refused_ruleset_names_the_failing_line(netns: str) -> None:
    bad = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n"
    with pytest.raises(TablesError) as err:
        NamespaceTables(netns).test(bad)
    assert "line 3: -A INPUT -p tcp --dport 99999 -j ACCEPT" in str(err.value)


@needs_netns
async def test_netns_failed_apply_changes_nothing_and_leaves_no_timer(
    netns_lab: RouterLab, netns: str
) -> None:
    lab = netns_lab
    v1 = web_bundle(1)
    await lab.apply(v1)
    files = {p.name: p.read_text() for p in (lab.root / "config").iterdir()}
    subprocess.run(["ip", "netns", "del", netns], check=True)  # the tables become unreachable
    failed = await lab.run("apply --confirm-timeout 30", web_bundle(2, ssh_port=2222).to_json())
    assert failed.exit_status == 1
    assert failed.body["error"].startswith("version 2 not applied: ")
    show = await lab.ok("show")
    assert show["version"] == 1 and show["pending_confirm"] is None
    assert {p.name: p.read_text() for p in (lab.root / "config").iterdir()} == files
    assert not (lab.root / "applier" / "pending.json").exists()
    assert sorted(p.name for p in (lab.root / "applier").glob("data-*")) == [
        f"data-{json.loads((lab.root / 'applier' / 'live.meta.json').read_text())['serial']}.json"
    ]


# ---------------------------------------------------------------- timing (printed, not asserted)


@needs_netns
@pytest.mark.timeout(600)
@pytest.mark.parametrize("netns_lab", VARIANTS, indirect=True)
async def test_netns_timing_ten_thousand_rules_full_and_one_rule_delta(
    netns_lab: RouterLab, netns: str
) -> None:
    lab = netns_lab
    variant = lab.sites[ROUTER].iptables
    big = big_bundle()
    text = big.to_json()
    changed = one_rule_changed(big, 4001, start_port=60_000, end_port=60_010)
    changed_text = changed.to_json()
    windowed = one_rule_changed(changed, 4001, start_port=61_000, end_port=61_010)
    windowed_text = windowed.to_json()
    await lab.ok("show")  # connection up and applier loaded: time the work, not the setup

    async def timed(command: str, stdin: str) -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        answer = await lab.ok(command, stdin)
        return time.perf_counter() - start, answer

    t_full, full = await timed("apply", text)
    assert full["iptables"] == "full" and full["drift"] is False
    t_delta, delta = await timed("apply", changed_text)
    assert delta["iptables"] == "delta" and delta["drift"] is False
    expected = rendered_for(changed, lab.root)
    assert delta["live_digest"] == expected.expected_live_digest
    assert live_digest(saved(netns, variant), expected.files) == expected.expected_live_digest
    t_window, window = await timed("apply --confirm-timeout 60", windowed_text)
    assert window["iptables"] == "delta" and window["pending_confirm"] is True
    start = time.perf_counter()
    await lab.ok(f"confirm {windowed.version}")
    t_confirm = time.perf_counter() - start
    print(
        f"\nTIMING netns {variant} over SSH, 10k-rule bundle ({len(text)} bytes, "
        f"{full['timings_ms']['total']:.0f} ms inside the router): full apply {t_full:.3f}s "
        f"{full['timings_ms']}\n  one-rule change {t_delta:.3f}s {delta['timings_ms']}"
        f"\n  one-rule change with a 60s confirm window {t_window:.3f}s {window['timings_ms']}"
        f"\n  confirm {t_confirm * 1000:.0f} ms"
    )

"""The engine's SSH transport against real appliance endpoints on loopback (real asyncssh, no mocks)."""

from __future__ import annotations

import asyncio
import json
import random
import stat
import string
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from backend.appliance.endpoint import ApplianceEndpoints, CommandContext
from backend.errors import HostKeyMismatch, TransportError, TransportTimeout
from backend.transport.ssh import (
    SystemVMTransport,
    generate_keypair,
    load_client_key,
    new_host_key,
)

VM = "s-1-VM"


@dataclass
class Lab:
    """An endpoint host, one VM's host key pair, and a transport holding the engine's key."""

    endpoints: ApplianceEndpoints
    transport: SystemVMTransport
    host_private: str
    host_public: str


@pytest.fixture(scope="module")
def engine_key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "id_ed25519"
    generate_keypair(path)
    return path


@pytest.fixture
async def lab(engine_key_path: Path) -> AsyncIterator[Lab]:
    public_line = engine_key_path.with_suffix(".pub").read_text()
    endpoints = ApplianceEndpoints(public_line)
    transport = SystemVMTransport(load_client_key(engine_key_path), max_channels=4)
    host_private, host_public = new_host_key()
    yield Lab(endpoints, transport, host_private, host_public)
    await transport.close()
    await endpoints.stop_all()


def test_generated_keypair_is_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "id_ed25519"
    generate_keypair(path)
    first = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")
    generate_keypair(path)
    assert path.read_bytes() == first
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


async def test_status_returns_boot_args(lab: Lab) -> None:
    boot_args = {"type": "secstorage", "zone": "1", "controladdr": "169.254.3.7"}
    port = await lab.endpoints.start(VM, lab.host_private, boot_args=boot_args)
    assert lab.endpoints.port_of(VM) == port and lab.endpoints.is_running(VM)

    result = await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")

    assert result.exit_status == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["vm"] == VM
    assert status["boot_args"] == boot_args
    assert status["uptime"] >= 0


async def test_stdin_round_trips_1_mib_through_echo(lab: Lab) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)
    rng = random.Random(3922)
    payload = "".join(rng.choices(string.printable, k=1024 * 1024))

    result = await lab.transport.run(
        "127.0.0.1", port, lab.host_public, "sysvm-appliance echo", stdin=payload
    )

    assert result.exit_status == 0
    assert len(result.stdout) == len(payload)
    assert result.stdout == payload


async def test_wrong_host_key_is_refused_with_host_key_mismatch(lab: Lab) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)
    _, other_public = new_host_key()

    with pytest.raises(HostKeyMismatch, match=rf"127\.0\.0\.1:{port}.*doesn't match"):
        await lab.transport.run("127.0.0.1", port, other_public, "sysvm-appliance status")
    assert lab.endpoints.connections_accepted(VM) == 1  # the handshake got that far, then stopped


async def test_client_key_not_authorized_is_refused(lab: Lab) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)
    stranger = SystemVMTransport(asyncssh.generate_private_key("ssh-ed25519"))
    try:
        with pytest.raises(
            TransportError, match=rf"127\.0\.0\.1:{port}.*refused the engine's SSH key"
        ):
            await stranger.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
    finally:
        await stranger.close()


async def test_connection_is_reused_across_20_calls(lab: Lab) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)

    for _ in range(20):
        result = await lab.transport.run(
            "127.0.0.1", port, lab.host_public, "sysvm-appliance status"
        )
        assert result.exit_status == 0

    assert lab.endpoints.connections_accepted(VM) == 1


async def test_stopped_endpoint_gives_transport_error_and_restart_on_same_port_reconnects(
    lab: Lab,
) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)
    assert (
        await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
    ).exit_status == 0

    await lab.endpoints.stop(VM)
    assert not lab.endpoints.is_running(VM) and lab.endpoints.port_of(VM) is None
    with pytest.raises(TransportError, match=rf"127\.0\.0\.1:{port}"):
        await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")

    assert await lab.endpoints.start(VM, lab.host_private, port=port) == port
    result = await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
    assert result.exit_status == 0
    assert lab.endpoints.connections_accepted(VM) == 1


async def test_unknown_command_exits_127(lab: Lab) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)

    result = await lab.transport.run("127.0.0.1", port, lab.host_public, "rm -rf /")

    assert result.exit_status == 127
    assert "unknown command" in result.stderr
    assert result.stdout == ""


async def test_50_concurrent_calls_share_one_connection_with_at_most_max_channels_in_flight(
    lab: Lab,
) -> None:
    async def nap(ctx: CommandContext) -> int:
        await asyncio.sleep(0.02)
        ctx.write(ctx.args[0])
        return 0

    lab.endpoints.register("sysvm-test nap", nap)
    port = await lab.endpoints.start(VM, lab.host_private)

    results = await asyncio.gather(
        *(
            lab.transport.run("127.0.0.1", port, lab.host_public, f"sysvm-test nap {i}")
            for i in range(50)
        )
    )

    assert [r.stdout for r in results] == [str(i) for i in range(50)]
    assert all(r.exit_status == 0 for r in results)
    assert lab.endpoints.connections_accepted(VM) == 1
    assert lab.endpoints.peak_commands(VM) == 4  # the lab transport's max_channels


async def test_command_over_its_timeout_raises_transport_timeout_and_the_connection_stays_usable(
    lab: Lab, engine_key_path: Path
) -> None:
    async def hang(ctx: CommandContext) -> int:
        await asyncio.sleep(10)
        return 0

    lab.endpoints.register("sysvm-test hang", hang)
    port = await lab.endpoints.start(VM, lab.host_private)
    impatient = SystemVMTransport(load_client_key(engine_key_path), command_timeout=0.2)
    try:
        with pytest.raises(TransportTimeout, match=rf"127\.0\.0\.1:{port}.*0\.2s"):
            await impatient.run("127.0.0.1", port, lab.host_public, "sysvm-test hang")
        result = await impatient.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
        assert result.exit_status == 0
        assert lab.endpoints.connections_accepted(VM) == 1
    finally:
        await impatient.close()


async def test_interactive_shell_is_refused(lab: Lab, engine_key_path: Path) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)
    async with asyncssh.connect(
        "127.0.0.1",
        port,
        username="root",
        client_keys=[load_client_key(engine_key_path)],
        known_hosts=asyncssh.import_known_hosts(f"* {lab.host_public}\n"),
        config=[],
        agent_path=None,
    ) as conn:
        shell = await conn.create_process(stdin=asyncssh.DEVNULL)
        completed = await shell.wait()

    assert completed.exit_status == 1
    assert "refused" in str(completed.stderr)


async def test_cancelling_a_run_closes_the_remote_commands_session_and_frees_its_channel(
    lab: Lab,
) -> None:
    started, told_to_stop = asyncio.Event(), asyncio.Event()

    async def wait_for_hangup(ctx: CommandContext) -> int:
        started.set()
        await ctx.wait_closed()
        told_to_stop.set()
        return 0

    lab.endpoints.register("sysvm-test wait", wait_for_hangup)
    port = await lab.endpoints.start(VM, lab.host_private)
    runs = [
        asyncio.create_task(
            lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-test wait")
        )
        for _ in range(4)  # every channel slot of the lab transport
    ]
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.1)  # all four are running remotely

    for run in runs:
        run.cancel()
    done = await asyncio.gather(*runs, return_exceptions=True)

    assert all(isinstance(d, asyncio.CancelledError) for d in done)
    await asyncio.wait_for(told_to_stop.wait(), 5)
    result = await asyncio.wait_for(
        lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status"), 5
    )
    assert result.exit_status == 0  # the cancelled runs gave their channel slots back
    assert lab.endpoints.connections_accepted(VM) == 1


async def test_ssh_work_runs_on_the_transports_own_thread_not_the_callers(
    lab: Lab, engine_key_path: Path
) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)
    key = load_client_key(engine_key_path)
    signed_on: list[int] = []
    sign = key.sign

    def recording_sign(data: bytes, algorithm: bytes) -> bytes:
        signed_on.append(threading.get_ident())
        return sign(data, algorithm)

    key.sign = recording_sign  # type: ignore[method-assign]
    transport = SystemVMTransport(key)
    try:
        result = await transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
        lines = [
            line
            async for line in transport.stream(
                "127.0.0.1", port, lab.host_public, "sysvm-appliance status"
            )
        ]
    finally:
        await transport.close()

    assert result.exit_status == 0 and json.loads(lines[0])["vm"] == VM
    assert len(signed_on) == 1  # one handshake, on a thread that is not this loop's
    assert signed_on[0] != threading.get_ident()


async def test_transport_is_usable_again_after_close(lab: Lab) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)
    await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")

    await lab.transport.close()
    result = await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")

    assert result.exit_status == 0
    assert lab.endpoints.connections_accepted(VM) == 2


async def test_drop_makes_the_next_command_dial_a_new_connection(lab: Lab) -> None:
    port = await lab.endpoints.start(VM, lab.host_private)
    await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")

    lab.transport.drop("127.0.0.1", port, lab.host_public)
    result = await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")

    assert result.exit_status == 0
    assert lab.endpoints.connections_accepted(VM) == 2

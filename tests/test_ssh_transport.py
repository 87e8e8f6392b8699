"""The engine's SSH transport against real appliance endpoints on loopback (real asyncssh, no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import stat
import string
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from backend.appliance.endpoint import ApplianceEndpoints, CommandContext
from backend.errors import HostKeyMismatch, TransportError, TransportTimeout
from backend.helper_processes import HELPER_NICENESS
from backend.transport import frames
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


def _tcp_peers(pid: int, port: int) -> int:
    """How many TCP connections to 127.0.0.1:`port` the process `pid` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and remote == f"0100007F:{port:04X}" and inode in inodes:
            held += 1
    return held


async def test_ssh_connections_live_in_the_transports_worker_process_not_the_callers(
    lab: Lab,
) -> None:
    """Key exchanges and encryption take CPU in bursts: in the caller's process they held the
    interpreter lock its event loop needs (loop stalls of tens of ms with 100 routers)."""
    port = await lab.endpoints.start(VM, lab.host_private)
    result = await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
    lines = [
        line
        async for line in lab.transport.stream(
            "127.0.0.1", port, lab.host_public, "sysvm-appliance status"
        )
    ]

    assert result.exit_status == 0 and json.loads(lines[0])["vm"] == VM
    worker = lab.transport.worker_pid
    assert worker is not None and worker != os.getpid()
    assert _tcp_peers(worker, port) == 1  # one connection, reused, held by the worker
    assert _tcp_peers(os.getpid(), port) == 0
    assert lab.endpoints.connections_accepted(VM) == 1
    # it yields the CPU to the caller's event loop (backend.helper_processes)
    wanted = min(os.getpriority(os.PRIO_PROCESS, 0) + HELPER_NICENESS, 19)
    assert os.getpriority(os.PRIO_PROCESS, worker) == wanted


async def test_a_worker_that_dies_fails_the_commands_in_flight_and_the_next_one_starts_anew(
    lab: Lab,
) -> None:
    started = asyncio.Event()

    async def hang(ctx: CommandContext) -> int:
        started.set()
        await ctx.wait_closed()
        return 0

    lab.endpoints.register("sysvm-test hang", hang)
    port = await lab.endpoints.start(VM, lab.host_private)
    running = asyncio.create_task(
        lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-test hang")
    )
    await asyncio.wait_for(started.wait(), 5)
    first = lab.transport.worker_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)  # a crash of the worker, as only a real signal makes one

    with pytest.raises(TransportError, match="SSH worker process exited"):
        await asyncio.wait_for(running, 5)
    result = await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
    assert result.exit_status == 0
    assert lab.transport.worker_pid not in (None, first)


def test_the_worker_exits_when_its_engine_dies_without_closing_it(engine_key_path: Path) -> None:
    """The engine killed (no `close()`): its end of the socket closes and the worker, holding
    connections to system VMs, must not live on."""
    code = f"""
import asyncio, os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from pathlib import Path
from backend.transport.ssh import SystemVMTransport, load_client_key
async def main():
    t = SystemVMTransport(load_client_key(Path({str(engine_key_path)!r})))
    await t.start()
    print(t.worker_pid, flush=True)
    os._exit(0)
asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(done.stdout.strip())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"worker {pid} outlived its engine"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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


# --------------------------------------------------------------------------- worker frames


def _reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_frames_carry_bytes_beside_the_json_header_and_end_cleanly() -> None:
    payload = bytes(range(256)) * 5  # not UTF-8, never inside the JSON
    reader = _reader_of(
        frames.encode({"op": "run", "id": 7}, payload) + frames.encode({"op": "close"})
    )
    assert await frames.read(reader) == ({"op": "run", "id": 7}, payload)
    assert await frames.read(reader) == ({"op": "close"}, b"")
    assert await frames.read(reader) is None  # end of file between frames


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (frames.encode({"op": "run"}, b"abc")[:-1], "cut inside a frame"),
        (frames.encode({"op": "run"})[:5], "cut inside a frame's lengths"),
        (b"\x00\x00\x00\x02\x00\x00\x00\x00[]", "without an op"),
        (b"\x00\x00\x00\x02\x00\x00\x00\x00{x", "not JSON"),
        (b"\x7f\x00\x00\x00\x00\x00\x00\x00", "a frame header of"),
    ],
)
async def test_a_malformed_frame_is_refused_saying_why(data: bytes, why: str) -> None:
    with pytest.raises(frames.FrameError, match=why):
        await frames.read(_reader_of(data))


def _worker_children() -> set[int]:
    """Live SSH worker processes started by this process."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes()
            if fields[0] != "Z" and int(fields[1]) == os.getpid() and b"ssh_worker" in argv:
                found.add(int(entry.name))
    return found


async def test_closing_while_the_worker_starts_ends_that_worker_too(engine_key_path: Path) -> None:
    """The engine starts its worker in the background and may stop at once (a cancelled start):
    close() must not leave that worker running."""
    before = _worker_children()
    transport = SystemVMTransport(load_client_key(engine_key_path))
    starting = asyncio.create_task(transport.start())
    await asyncio.sleep(0.05)  # spawned, still importing asyncssh
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    assert _worker_children() - before  # it was started

    await transport.close()

    assert _worker_children() - before == set()


async def test_a_run_cancelled_as_soon_as_it_is_sent_ends_at_once(lab: Lab) -> None:
    """The request and its cancel reach the worker together: the request must still be
    answered (cancelled) rather than left for the caller to wait out CANCEL_TIMEOUT."""
    port = await lab.endpoints.start(VM, lab.host_private)
    await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
    for _ in range(5):
        run = asyncio.create_task(
            lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
        )
        await asyncio.sleep(0)  # sent, not yet answered
        started = time.monotonic()
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        assert time.monotonic() - started < 2
    result = await lab.transport.run("127.0.0.1", port, lab.host_public, "sysvm-appliance status")
    assert result.exit_status == 0

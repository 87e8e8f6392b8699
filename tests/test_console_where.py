"""`console`: where a VM's VNC display is and how to open it, or why there is none."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backend.engine.core import Engine
from backend.errors import NotFound
from backend.services.console import _how_to_connect, _vnc_of
from tests.conftest import converge_lab, run_cli


async def test_lab_vms_say_why_they_have_no_console(make_engine: Any) -> None:
    engine: Engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=1, vms=1)
    ssvm = next(v for v in await engine.system_vms_list("zone1") if v["type"] == "ssvm")
    where = await engine.console(ssvm["name"])
    assert where["kind"] == "ssvm" and where["host"] == "zone1-host1"
    assert where["vnc"] is None and where["connect"] == []
    assert "test-driver host" in where["reason"]
    guest = await engine.console("zone1-net1-vm1")
    assert guest["kind"] == "guest" and "test-driver" in guest["reason"]
    job = await engine.wait_job((await engine.guest_vm_action("zone1-net1-vm1", "stop")).id, 30)
    assert job.state == "succeeded", job.error
    stopped = await engine.console("zone1-net1-vm1")
    assert stopped["state"] == "Stopped" and "while it is Running" in stopped["reason"]
    with pytest.raises(NotFound, match="no system VM or guest VM named 'nope'"):
        await engine.console("nope")


def test_the_display_port_is_read_from_the_live_domain_xml() -> None:
    live = (
        "<domain><devices><graphics type='vnc' port='5907' autoport='yes' listen='127.0.0.1'/>"
        "</devices></domain>"
    )
    assert _vnc_of(live) == {"listen": "127.0.0.1", "port": 5907}
    defined = live.replace("5907", "-1")  # not running: no port allocated yet
    assert _vnc_of(defined) is None
    assert _vnc_of("<domain><devices/></domain>") is None


@pytest.mark.parametrize(
    ("uri", "listen", "commands"),
    [
        ("qemu:///system", "127.0.0.1", ["vncviewer 127.0.0.1::5901"]),
        (
            "qemu+ssh://ops@kvm1.example.org/system",
            "127.0.0.1",
            ["ssh -N -L 5901:127.0.0.1:5901 ops@kvm1.example.org", "vncviewer localhost::5901"],
        ),
        ("qemu+ssh://kvm1/system", "0.0.0.0", ["vncviewer kvm1::5901"]),
        ("qemu+tcp://kvm1/system", "192.0.2.10", ["vncviewer 192.0.2.10::5901"]),
    ],
)
def test_how_to_connect_tunnels_to_a_remote_hosts_loopback(
    uri: str, listen: str, commands: list[str]
) -> None:
    assert _how_to_connect(uri, {"listen": listen, "port": 5901}) == commands


def test_cli_console_names_the_reason_and_fails(home: Any) -> None:
    assert run_cli("lab", "up", "--zones", "1", "--networks", "0").returncode == 0
    done = run_cli("console", "zone1-nothing")
    assert done.returncode == 1 and "no system VM or guest VM named" in done.stderr
    ssvm = run_cli("systemvm", "list", "--json")
    name = next(v["name"] for v in json.loads(ssvm.stdout) if v["type"] == "ssvm")
    done = run_cli("console", name)
    assert done.returncode == 1 and f"{name}: no console: " in done.stdout
    run_cli("engine", "stop")

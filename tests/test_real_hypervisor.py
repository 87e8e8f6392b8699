"""On a real libvirtd with QEMU/KVM (qemu:///system): system VMs are provisioned as real KVM
domains with VNC on 127.0.0.1, and one killed from outside with `virsh destroy` comes back.

Until the system VM image lands, a real domain boots no operating system: its guest agent is
still played by the local SSH endpoint (as on the lab), so "Running" here means: a real QEMU
process runs the domain, and the engine reached its agent over SSH with the VM's host key.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from backend.db.models import PrimaryStorage
from backend.services.system_vms import BRIDGES
from tests.conftest import converge_lab
from tests.qemu_host import virsh


@pytest.fixture
def bridges() -> Iterator[list[str]]:
    """The bridges system VM NICs attach to, isolated (no address, no uplink); removed after."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    made = []
    for name in sorted(set(BRIDGES.values())):
        if subprocess.run(["ip", "link", "show", name], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
            subprocess.run(["ip", "link", "set", name, "up"], check=True)
            made.append(name)
    yield made
    for name in made:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _vnc_port(name: str) -> int:
    xml = virsh("dumpxml", name)
    assert xml.returncode == 0, xml.stderr
    graphics = ET.fromstring(xml.stdout).find("./devices/graphics[@type='vnc']")
    assert graphics is not None and graphics.get("listen") == "127.0.0.1"
    return int(graphics.get("port", "-1"))


def _rfb_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(12)


async def _wait(engine: Any, name: str, predicate: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        vm = await engine.system_vm(name)
        if predicate(vm):
            return dict(vm)
        assert time.monotonic() < deadline, f"{name}: {vm['state']} on {vm['host']}"
        await asyncio.sleep(0.1)


async def test_system_vms_run_on_real_kvm_and_virsh_destroy_is_healed(
    qemu_uri: str, bridges: list[str], make_engine: Any
) -> None:
    suffix = "t" + uuid.uuid4().hex[:8]  # domain names are global on the host: make them ours
    engine = await make_engine(
        SYSVM_INSTANCE_NAME=suffix,
        SYSVM_HOST_PING_INTERVAL="0.2",
        SYSVM_HOST_PING_TIMEOUT="1",
        SYSVM_SYSTEMVM_STOP_TIMEOUT="2",
    )
    try:
        await converge_lab(engine, zones=1, hosts=1, networks=1, vms=0)
        await engine.host_add("zone1", "kvm1", qemu_uri)
        # The lab host fails: the zone's SSVM and CPVM are provisioned again on the KVM host.
        await engine.lab_host("zone1-host1", up=False)
        ssvm = next(v for v in await engine.system_vms_list("zone1") if v["type"] == "ssvm")
        ssvm = await _wait(
            engine, ssvm["name"], lambda v: v["state"] == "Running" and v["host"] == "kvm1", 60
        )
        assert re.fullmatch(rf"s-\d+-{suffix}", ssvm["name"])
        # a guest VM on the network brings its router up, on the only Up host: KVM
        job = await engine.wait_job(
            (await engine.guest_vm_deploy("zone1-net1", f"web-{suffix}")).id, 60
        )
        assert job.state == "succeeded", job.error
        router = (await engine.status())["zones"][0]["networks"][0]["router"]["name"]
        router_vm = await engine.system_vm(router)
        assert router_vm["state"] == "Running" and router_vm["host"] == "kvm1"

        for name in (ssvm["name"], router):
            assert virsh("domstate", name).stdout.strip() == "running"
            port = _vnc_port(name)
            assert port >= 5900 and _rfb_banner(port).startswith(b"RFB ")
            where = await engine.console(name)  # the operator's way to that same screen
            assert where["vnc"] == {"listen": "127.0.0.1", "port": port}, where
            assert where["connect"] == [f"vncviewer 127.0.0.1::{port}"]
        oem = virsh("dumpxml", ssvm["name"]).stdout
        assert "cloudstack:template=domP type=secstorage" in oem

        # An outside actor kills the SSVM; the engine hears libvirt's event and brings it back.
        started = ssvm["started_at"]
        t0 = time.monotonic()
        out = virsh("destroy", ssvm["name"])
        assert out.returncode == 0, out.stderr
        healed = await _wait(
            engine,
            ssvm["name"],
            lambda v: v["state"] == "Running" and v["started_at"] != started,
            30,
        )
        healed_in = time.monotonic() - t0
        assert virsh("domstate", ssvm["name"]).stdout.strip() == "running"
        assert healed["host"] == "kvm1"
        print(f"virsh destroy healed in {healed_in:.2f} s")
    finally:
        await engine.stop()
        listed = virsh("list", "--all", "--name").stdout.split()
        for name in listed:
            if name.endswith(suffix) or name == f"web-{suffix}":
                virsh("destroy", name)
                virsh("undefine", name)


async def test_template_is_uploaded_to_the_kvm_hosts_pool_once_and_vms_boot_from_it(
    qemu_uri: str, bridges: list[str], make_engine: Any, tmp_path: Any
) -> None:
    """virStorageVol.upload into a dir pool on a real libvirtd, with progress, cached per pool."""
    import http.server
    import threading

    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img (qemu-utils) is not installed")
    www = tmp_path / "www"
    www.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(www / "tiny.qcow2"), "64M"], check=True
    )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    suffix = "t" + uuid.uuid4().hex[:8]
    engine = await make_engine(
        SYSVM_INSTANCE_NAME=suffix, SYSVM_HOST_PING_INTERVAL="0.2", SYSVM_HOST_PING_TIMEOUT="1"
    )
    pool = None
    cleanup: list[Path] = []
    try:
        await converge_lab(engine, zones=1, hosts=1, networks=1, vms=0)
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny.qcow2"
        job = await engine.wait_job(
            (await engine.template_register("zone1", "tiny", url, "QCOW2")).id, 60
        )
        assert job.state == "succeeded", job.error
        # Primary storage lives where QEMU (running as libvirt-qemu) can reach it, as on a real
        # host; pytest's temporary directories are private to root. (There is no API for
        # primary storage yet, so the test points the lab zone's pool there directly.)
        pool_dir = Path(f"/var/lib/sysvm-test-{suffix}")
        pool_dir.mkdir(mode=0o755, parents=True)
        cleanup.append(pool_dir)

        async def point_pool(s: Any) -> None:
            row = (await s.scalars(select(PrimaryStorage))).one()
            row.path = str(pool_dir)

        await engine.db.write(point_pool)
        await engine.host_add("zone1", f"kvm-{suffix}", qemu_uri)
        await engine.lab_host("zone1-host1", up=False)  # the guest VMs go to the KVM host
        deadline = time.monotonic() + 30
        while (await engine.status())["zones"][0]["hosts"][0]["state"] != "Alert":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        messages: list[str] = []

        async def watch() -> None:
            async for ev in engine.subscribe(["job"]):
                messages.append(str(ev.fields.get("message", "")))

        watcher = asyncio.create_task(watch())
        pool = (
            "zone1-primary"  # the lab zone's primary storage, defined on the KVM host on first use
        )
        names = [f"web1-{suffix}", f"web2-{suffix}"]
        for name in names:
            job = await engine.wait_job(
                (await engine.guest_vm_deploy("zone1-net1", name, template="tiny")).id, 120
            )
            assert job.state == "succeeded", job.error
        watcher.cancel()
        assert sum("copying tiny" in m for m in messages) >= 1
        vols = [
            line.split()[0]
            for line in virsh("vol-list", pool).stdout.splitlines()[2:]
            if line.split()
        ]
        assert [v for v in vols if v.startswith("template-")] == ["template-2.qcow2"], vols  # once
        for name in names:
            assert virsh("domstate", name).stdout.strip() == "running"
            xml = virsh("dumpxml", name).stdout
            assert f"{name}-root.qcow2" in xml and "backingStore" in xml
    finally:
        await engine.stop()
        server.shutdown()
        for name in virsh("list", "--all", "--name").stdout.split():
            if name.endswith(suffix):
                virsh("destroy", name)
                virsh("undefine", name)
        if pool:
            for line in virsh("vol-list", pool).stdout.splitlines()[2:]:
                if line.split():
                    virsh("vol-delete", line.split()[0], "--pool", pool)
            virsh("pool-destroy", pool)
            virsh("pool-undefine", pool)
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)

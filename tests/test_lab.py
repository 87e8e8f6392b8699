"""The embedded lab: idempotent, real SSH guests with their own host keys, and a clean `down`."""

from __future__ import annotations

import socket

from sqlalchemy import select

from backend.db.models import SystemVM
from backend.engine.core import Engine
from backend.services.status import count_objects


async def test_lab_up_twice_creates_nothing_new(lab_engine: Engine) -> None:
    before = await lab_engine.status()
    job = await lab_engine.wait_job((await lab_engine.lab_up()).id, 60)
    assert job.state == "succeeded", job.error
    assert await lab_engine.status() == before
    assert count_objects(before) == {
        "zones": 2,
        "hosts": 4,
        "system_vms": 8,
        "networks": 4,
        "vms": 12,
    }


async def test_every_running_system_vm_answers_ssh_with_its_own_host_key(
    lab_engine: Engine,
) -> None:
    async with lab_engine.db.read() as s:
        vms = (await s.scalars(select(SystemVM))).all()
    keys = {vm.host_key_public for vm in vms}
    assert len(keys) == len(vms) == 8, "each system VM has its own generated host key"
    for vm in vms:
        addr = lab_engine.guests.ssh_endpoint(vm)
        assert addr is not None
        result = await lab_engine.transport.run(*addr, vm.host_key_public, "sysvm-appliance status")
        assert result.exit_status == 0 and f'"vm": "{vm.name}"' in result.stdout
    # the boot arguments reached the guest, CloudStack style
    ssvm = next(v for v in vms if v.type == "ssvm")
    assert ssvm.boot_args["type"] == "secstorage" and ssvm.boot_args["eth0ip"].startswith(
        "169.254."
    )


async def test_lab_domains_carry_boot_args_in_smbios_and_metadata(lab_engine: Engine) -> None:
    tree = await lab_engine.status()
    ssvm = next(v for v in tree["zones"][0]["system_vms"] if v["type"] == "ssvm")
    host_id = next(iter(lab_engine.hypervisors.known))
    for hid in lab_engine.hypervisors.known:
        states = await lab_engine.hypervisors.get(hid).domain_states()
        if ssvm["name"] in states:
            host_id = hid
            assert states[ssvm["name"]] == "running"
    xml = await lab_engine.hypervisors.get(host_id).domain_xml(ssvm["name"])
    assert "<entry>cloudstack:template=domP type=secstorage" in xml
    assert "sysvm:bootargs" in xml and "<graphics type='vnc'" in xml


async def test_lab_down_removes_records_files_domains_and_endpoints(lab_engine: Engine) -> None:
    async with lab_engine.db.read() as s:
        vms = (await s.scalars(select(SystemVM))).all()
    ports = [lab_engine.guests.ssh_endpoint(vm)[1] for vm in vms]  # type: ignore[index]
    assert all(ports)
    job = await lab_engine.wait_job((await lab_engine.lab_down()).id, 60)
    assert job.state == "succeeded", job.error
    assert (await lab_engine.status())["zones"] == []
    assert not (lab_engine.home / "lab").exists()
    assert lab_engine.hypervisors.known == set()
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} still answers"

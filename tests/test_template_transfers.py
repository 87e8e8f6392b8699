"""Template transfers through the zone's SSVM, end to end on the lab: a real HTTP server on
loopback, the engine, the SSVM's agent over SSH, the image store on disk."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.engine.core import Engine
from backend.errors import InvalidInput
from tests.conftest import converge_lab

MakeEngine = Callable[..., Awaitable[Engine]]
BLOB = os.urandom(6 * 2**20)
SHA256 = "{SHA-256}" + hashlib.sha256(BLOB).hexdigest()


class _Origin(http.server.ThreadingHTTPServer):
    daemon_threads = True
    rate = 0  # bytes per second; 0 = as fast as possible
    ranges: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Origin

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/blob.raw":
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        self.server.ranges.append(rng or "")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB) - start))
        self.end_headers()
        step = 64 * 1024
        try:
            for off in range(start, len(BLOB), step):
                self.wfile.write(BLOB[off : off + step])
                if self.server.rate:
                    time.sleep(step / self.server.rate)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def origin() -> Iterator[_Origin]:
    server = _Origin(("127.0.0.1", 0), _Handler)
    server.ranges = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def url(origin: _Origin, path: str = "/blob.raw") -> str:
    return f"http://127.0.0.1:{origin.server_address[1]}{path}"


async def template(engine: Engine, name: str) -> dict[str, Any]:
    return next(t for t in await engine.templates_list() if t["name"] == name)


async def test_registered_template_is_downloaded_verified_and_stored(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    job = await engine.template_register("zone1", "blob", url(origin), "RAW", SHA256)
    job = await engine.wait_job(job.id, 60)
    assert job.state == "succeeded", job.error
    t = await template(engine, "blob")
    assert t["state"] == "DOWNLOADED" and t["size"] == len(BLOB)
    assert t["transfer"]["bytes_done"] == len(BLOB) and t["transfer"]["ssvm"].startswith("s-")
    stored = Path(engine.home / "lab/secondary/zone1/template/tmpl/admin" / str(t["id"]))
    assert (stored / f"{t['id']}.raw").read_bytes() == BLOB
    props = (stored / "template.properties").read_text()
    assert "format=RAW" in props.replace(" ", "") or "format=raw" in props.replace(" ", "").lower()
    assert not [p for p in stored.iterdir() if p.name.endswith(".part")]


async def test_wrong_checksum_fails_saying_expected_and_got_and_leaves_nothing(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    wrong = "{SHA-256}" + "0" * 64
    job = await engine.wait_job(
        (await engine.template_register("zone1", "blob", url(origin), "RAW", wrong)).id, 60
    )
    assert job.state == "failed"
    t = await template(engine, "blob")
    assert t["state"] == "DOWNLOAD_ERROR"
    assert "0" * 16 in t["error"] and hashlib.sha256(BLOB).hexdigest()[:16] in t["error"]
    stored = engine.home / "lab/secondary/zone1/template/tmpl/admin" / str(t["id"])
    assert not stored.exists() or not any(stored.iterdir())


async def test_bad_requests_name_the_field_and_store_nothing(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    for kwargs, field in (
        ({"url": "ftp://127.0.0.1/x.raw"}, "url"),
        ({"url": "http://127.0.0.1/a b"}, "url"),
        ({"format": "VMDK"}, "format"),
        ({"checksum": "{SHA-256}abc"}, "checksum"),
        ({"name": "bad;name"}, "name"),
    ):
        args: dict[str, Any] = {
            "name": "t1",
            "url": url(origin),
            "format": "RAW",
            "checksum": None,
        } | kwargs
        with pytest.raises(InvalidInput) as err:
            await engine.template_register(
                "zone1", args["name"], args["url"], args["format"], args["checksum"]
            )
        assert err.value.field == field
    assert [t["name"] for t in await engine.templates_list()] == ["systemvm-template"]
    assert await engine.jobs() != [] and all(j.kind == "lab.up" for j in await engine.jobs())


async def test_transfer_waits_for_a_running_ssvm_and_says_so(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine(SYSVM_LAB_BOOT_DELAY="2")
    lab = await engine.lab_up(zones=1, hosts=1, networks=0, vms=0)
    while not await engine.templates_list():  # the zone is recorded, its SSVM still booting
        await asyncio.sleep(0.05)
    job = await engine.template_register("zone1", "early", url(origin), "RAW", SHA256)
    await asyncio.sleep(0.5)
    t = await template(engine, "early")
    assert "waiting for a Running secondary storage VM" in t["transfer"]["reason"]
    assert (await engine.job(job.id)).message.startswith("waiting for a Running")
    assert (await engine.wait_job(job.id, 60)).state == "succeeded"
    assert (await engine.wait_job(lab.id, 60)).state == "succeeded"


async def test_ssvm_dying_mid_transfer_resumes_on_the_replacement_from_the_bytes_written(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine(SYSVM_JOB_PROGRESS_INTERVAL="0.1")
    await converge_lab(engine, zones=1, hosts=2, networks=0, vms=0)
    origin.rate = 2 * 2**20  # 3 s for the whole blob
    job = await engine.template_register("zone1", "blob", url(origin), "RAW", SHA256)
    for _ in range(100):
        t = await template(engine, "blob")
        if t["transfer"]["bytes_done"] > 2**20:
            break
        await asyncio.sleep(0.05)
    ssvm = t["transfer"]["ssvm"]
    await engine.lab_crash(ssvm)
    job = await engine.wait_job(job.id, 60)
    assert job.state == "succeeded", job.error
    t = await template(engine, "blob")
    assert t["state"] == "DOWNLOADED"
    resumed = [r for r in origin.ranges if r]
    assert resumed and int(resumed[-1][6:].split("-")[0]) >= 2**20, origin.ranges
    stored = (
        engine.home / "lab/secondary/zone1/template/tmpl/admin" / str(t["id"]) / f"{t['id']}.raw"
    )
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == SHA256[9:]


async def test_cancelled_transfer_stops_within_a_second_abandoned_and_cleaned(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    origin.rate = 2**20
    job = await engine.template_register("zone1", "slow", url(origin), "RAW", SHA256)
    while (await template(engine, "slow"))["transfer"]["bytes_done"] == 0:
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    job = await engine.cancel_job(job.id)
    assert job.state == "cancelled" and time.monotonic() - t0 < 1.0
    t = await template(engine, "slow")
    assert t["state"] == "ABANDONED"
    stored = engine.home / "lab/secondary/zone1/template/tmpl/admin" / str(t["id"])
    await asyncio.sleep(0.3)
    assert not stored.exists() or not any(stored.iterdir()), list(stored.iterdir())


async def test_upload_from_the_jump_host_is_verified_and_stored(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    source = tmp_path / "local.raw"
    source.write_bytes(BLOB)
    job = await engine.wait_job(
        (await engine.template_upload("zone1", "up", str(source), "RAW", SHA256)).id, 60
    )
    assert job.state == "succeeded", job.error
    t = await template(engine, "up")
    assert t["state"] == "UPLOADED" and t["size"] == len(BLOB)


async def test_first_start_from_a_template_records_the_copy_on_a_lab_host_and_says_so(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=1, vms=0)
    job = await engine.wait_job(
        (await engine.template_register("zone1", "blob", url(origin), "RAW", SHA256)).id, 60
    )
    assert job.state == "succeeded", job.error
    seen: list[tuple[int, str]] = []

    async def watch() -> None:
        async for ev in engine.subscribe(["job"]):
            seen.append((ev.entity_id, str(ev.fields.get("message", ""))))

    watcher = asyncio.create_task(watch())
    first = await engine.wait_job(
        (await engine.guest_vm_deploy("zone1-net1", "web1", template="blob")).id, 60
    )
    second = await engine.wait_job(
        (await engine.guest_vm_deploy("zone1-net1", "web2", template="blob")).id, 60
    )
    watcher.cancel()
    assert first.state == second.state == "succeeded", (first.error, second.error)
    recorded = {job_id: m for job_id, m in seen if "recorded, not performed" in m}
    assert list(recorded) == [first.id], "the copy is recorded once per host pool, then cached"
    assert "libvirt's test driver has no upload streams" in recorded[first.id]
    with pytest.raises(InvalidInput) as err:
        await engine.guest_vm_deploy("zone1-net1", "web3", template="no-such-template")
    assert err.value.field == "template"


async def test_eight_concurrent_transfers_all_arrive_intact(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    jobs = [
        await engine.template_register("zone1", f"c{i}", url(origin), "RAW", SHA256)
        for i in range(8)
    ]
    done = [await engine.wait_job(j.id, 120) for j in jobs]
    assert [j.state for j in done] == ["succeeded"] * 8, [j.error for j in done]
    states = {t["name"]: t["state"] for t in await engine.templates_list()}
    assert all(states[f"c{i}"] == "DOWNLOADED" for i in range(8))


async def test_declared_format_that_does_not_match_the_image_is_refused(
    make_engine: MakeEngine, origin: _Origin
) -> None:
    engine = await make_engine()
    await converge_lab(engine, zones=1, hosts=1, networks=0, vms=0)
    job = await engine.wait_job(
        (await engine.template_register("zone1", "liar", url(origin), "QCOW2")).id, 60
    )
    assert job.state == "failed"
    t = await template(engine, "liar")
    assert t["state"] == "DOWNLOAD_ERROR" and "QCOW2" in t["error"] and "RAW" in t["error"], t[
        "error"
    ]

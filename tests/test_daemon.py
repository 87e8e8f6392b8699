"""The engine daemon as an operator meets it: started on demand, one per home, stopped cleanly,
and honest after `kill -9`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from backend.api.connect import process_alive
from tests.conftest import run_cli


def _pid(home: Path) -> int:
    return int((home / "engine.pid").read_text())


def _wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_lab_up_then_status_json_shows_the_default_lab_and_stop_leaves_no_process(
    home: Path,
) -> None:
    up = run_cli("lab", "up")
    assert up.returncode == 0, up.stderr
    assert "succeeded" in up.stdout
    out = run_cli("status", "--json")
    assert out.returncode == 0, out.stderr
    tree = json.loads(out.stdout)
    assert len(tree["zones"]) == 2
    for zone in tree["zones"]:
        states = {(v["type"], v["state"]) for v in zone["system_vms"]}
        assert ("ssvm", "Running") in states and ("cpvm", "Running") in states
        assert len(zone["networks"]) == 2
    assert sum(len(n["vms"]) for z in tree["zones"] for n in z["networks"]) == 12
    pid = _pid(home)
    stop = run_cli("engine", "stop")
    assert stop.returncode == 0 and f"pid {pid}" in stop.stdout
    assert _wait_gone(pid), "the engine process outlived `sysvm engine stop`"
    assert not (home / "engine.sock").exists() and not (home / "engine.pid").exists()


def test_second_engine_on_the_same_home_is_refused_with_one_line(home: Path) -> None:
    assert run_cli("engine", "status").returncode == 1  # none yet, and status does not start one
    assert run_cli("status").returncode == 0  # starts one
    second = run_cli("engine", "serve")
    assert second.returncode == 3
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "already runs" in lines[0] and str(_pid(home)) in lines[0]
    run_cli("engine", "stop")


def test_stale_socket_left_by_a_killed_engine_is_replaced(home: Path) -> None:
    home.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(home / "engine.sock"))  # bound, never listening: what a crash leaves
    stale.close()
    out = run_cli("engine", "status")
    assert out.returncode == 1 and "no engine running" in out.stdout
    out = run_cli("status")
    assert out.returncode == 0, out.stderr
    assert "no zones yet" in out.stdout
    run_cli("engine", "stop")


def test_malformed_config_is_one_clear_line_and_changes_nothing(home: Path) -> None:
    assert run_cli("lab", "up", "--zones", "1", "--networks", "0").returncode == 0
    run_cli("engine", "stop")
    db = home / "sysvm.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    (home / "config.toml").write_text("[lab]\nzones = = 3\n")
    out = run_cli("status")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "config.toml" in out.stderr and "line 2" in out.stderr
    (home / "config.toml").write_text("[lab]\nzonez = 3\n")
    out = run_cli("lab", "up")
    assert out.returncode == 1 and "did you mean 'lab.zones'" in out.stderr
    assert not (home / "engine.pid").exists(), "no engine may start on a bad config"
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_engine_failing_to_start_is_reported_with_its_log(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "sysvm.db").write_bytes(b"this is not a database" * 100)
    out = run_cli("status")
    assert out.returncode == 1
    assert "engine exited" in out.stderr and "sysvm.db" in out.stderr


def test_killed_engine_resumes_its_interrupted_lab_job(home: Path) -> None:
    slow = {"SYSVM_LAB_BOOT_DELAY": "2"}  # system VMs take 2 s to boot: time to kill mid-job
    out = run_cli(
        "lab",
        "up",
        "--zones",
        "1",
        "--networks",
        "1",
        "--vms",
        "1",
        "--no-wait",
        "--json",
        env=slow,
    )
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout)["id"]
    deadline = time.monotonic() + 20
    while True:
        job = json.loads(run_cli("jobs", "show", str(job_id), "--json").stdout)
        if job["state"] == "running" and job["progress"] > 5:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    pid = _pid(home)
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid)
    assert (home / "engine.sock").exists(), "kill -9 leaves the socket behind"

    # Any command starts a new engine, which resumes the job rather than leaving it "running".
    out = run_cli("jobs", "wait", str(job_id), "--json", env=slow)
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    tree = json.loads(run_cli("status", "--json").stdout)
    states = sorted(v["state"] for v in tree["zones"][0]["system_vms"])
    assert states == ["Running", "Running", "Running"]
    assert _pid(home) != pid
    run_cli("engine", "stop")


@pytest.mark.parametrize("flag", ["--help"])
def test_help_explains_the_commands(flag: str) -> None:
    out = run_cli(flag)
    assert out.returncode == 0
    for command in ("tui", "status", "engine", "lab", "config", "jobs", "events"):
        assert command in out.stdout

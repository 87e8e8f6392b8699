"""Fixtures for console tests: a real engine (and lab) in tmp_path, SYSVM_HOME set; no fakes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import platformdirs
import pytest
from textual.pilot import Pilot

from backend.config import load_config
from backend.engine.core import Engine

LAB = {"zones": 2, "hosts": 2, "networks": 2, "vms": 3}


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own config and data dirs never leak into a test."""
    user = tmp_path / "user"
    monkeypatch.setattr(platformdirs, "user_config_dir", lambda *a, **k: str(user / "config"))
    monkeypatch.setattr(platformdirs, "user_data_dir", lambda *a, **k: str(user / "data"))


@pytest.fixture
def sysvm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SYSVM_HOME", str(home))
    return home


@pytest.fixture
async def console_engine(sysvm_home: Path) -> AsyncIterator[Engine]:
    """A started engine with an empty cloud."""
    engine = Engine(load_config(home=sysvm_home, env={"SYSVM_HOME": str(sysvm_home)}))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.fixture
async def lab(console_engine: Engine) -> Engine:
    """A started engine with a lab of 2 zones x (2 hosts, 2 networks x 3 VMs), all running."""
    job = await console_engine.lab_up(**LAB)
    job = await console_engine.wait_job(job.id, 60)
    assert job.state == "succeeded", job.error
    return console_engine


Waiter = Callable[..., Awaitable[None]]


@pytest.fixture
def wait_until() -> Waiter:
    """`await wait_until(pilot, condition, timeout=15, what="...")`: let the app run until
    `condition()` is true; the test fails after `timeout` seconds (a cap for a loaded CI
    machine, not a delay: a passing condition returns at once)."""

    async def wait(
        pilot: Pilot[None], condition: Callable[[], object], timeout: float = 15.0, what: str = ""
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
            await pilot.pause(0.02)

    return wait

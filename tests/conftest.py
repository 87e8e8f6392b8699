"""Shared fixtures: every test gets its own SYSVM_HOME; engines are real (libvirt test driver,
real SSH endpoints on loopback, real SQLite)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from backend.config import Config, load_config
from backend.engine.core import Engine
from tests.qemu_host import qemu_prefix, qemu_uri  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No test ever touches the real user's data: SYSVM_HOME points into the test's tmp dir."""
    home = tmp_path / "home"
    monkeypatch.setenv("SYSVM_HOME", str(home))
    for key in list(os.environ):
        if key.startswith("SYSVM_") and key != "SYSVM_HOME":
            monkeypatch.delenv(key)
    yield home
    # An engine a test started through the CLI must not outlive it.
    pid_file = home / "engine.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 9)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture
def home(_isolated_home: Path) -> Path:
    return _isolated_home


def make_config(home: Path, **env: str) -> Config:
    return load_config(home=home, env={"SYSVM_HOME": str(home), **env})


@pytest.fixture
async def engine(home: Path) -> AsyncIterator[Engine]:
    eng = Engine(make_config(home))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


@pytest.fixture
async def make_engine(home: Path) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    """A factory of started engines with settings given as SYSVM_* variables; all stopped after."""
    made: list[Engine] = []

    async def make(**env: str) -> Engine:
        eng = Engine(make_config(home, **env))
        await eng.start()
        made.append(eng)
        return eng

    yield make
    for eng in made:
        await eng.stop()


async def converge_lab(engine: Engine, **size: int) -> None:
    job = await engine.wait_job((await engine.lab_up(**size)).id, timeout=120)
    assert job.state == "succeeded", job.error


@pytest.fixture
async def lab_engine(engine: Engine) -> Engine:
    """An engine with the default lab converged (2 zones, 2 networks each, 3 VMs each)."""
    job = await engine.lab_up()
    job = await engine.wait_job(job.id, timeout=60)
    assert job.state == "succeeded", job.error
    return engine


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `sysvm ARGS` as an operator would, in a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )

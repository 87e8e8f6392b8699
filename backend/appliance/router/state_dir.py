"""A router's state directory: what its applier keeps on disk between commands and across reboots.

Layout under the router's root directory:

    config/                   the service config files as rendered (RouterPaths.config_dir)
    state/                    leases and pid files of the services (RouterPaths.state_dir)
    applier/lock              flock held by every command and by the rollback timer while they act
    applier/live.meta.json    the snapshot that is live (version, digests, services, data file)
    applier/confirmed.meta.json   the last confirmed snapshot: what a rollback and a boot restore
    applier/data-SERIAL.json  a snapshot's bulk (bundle JSON, iptables-restore text, files);
                              immutable, shared by live and confirmed when they are the same
    applier/pending.json      the open confirm window, if any (version, timer token and pid)
    applier/confirmed-V       confirm marker of version V
    applier/rollback.json     the last rollback
    applier/tables.rules      local mode only: the recorded ruleset that stands in for the kernel's
    applier/reloads.jsonl     local mode only: service reloads that would have happened
    applier/timer.log         stderr of rollback timers

Every file is replaced by write-to-temp-then-rename, so a reader sees it whole or not at all.
Standard library only: the rollback timer imports this and must start fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LIVE = "live"
CONFIRMED = "confirmed"
# Config files holding secrets (strongSwan's PSK, pppd's passwords) are private to root; the
# others stay readable, since dnsmasq re-reads its hosts files after dropping privileges.
SECRET_FILES = frozenset({"ipsec.secrets", "chap-secrets"})


def write_atomically(path: Path, data: str | bytes, *, durable: bool = False) -> None:
    """Replace `path` with `data` through a temporary file and a rename (fsync'd when `durable`)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class SnapshotMeta:
    """What a snapshot is, without its bulk: enough for `show`, version checks and rollbacks.

    `version`/`digest` are None for the factory state (what the router ran before its first
    bundle). `live_digest` is the digest measured once the snapshot went live (None: not measured).
    """

    version: int | None
    digest: str | None
    serial: str
    expected_live_digest: str
    services: dict[str, bool]
    service_files: dict[str, list[str]]
    live_digest: str | None = None

    def managed_files(self) -> list[str]:
        """Every config file name the applier owns (present or not in this snapshot)."""
        return sorted({n for names in self.service_files.values() for n in names})


@dataclass(frozen=True)
class SnapshotData:
    """A snapshot's bulk: the bundle as received (None for the factory state), ruleset and files."""

    bundle_json: str | None
    iptables: str
    files: dict[str, str]


@dataclass(frozen=True)
class PendingConfirm:
    """An open confirm window: `version` is live but rolls back at `deadline` (epoch seconds)
    unless confirmed. `token` names the rollback timer armed for it; `pid` is that timer."""

    version: int
    token: str
    deadline: float
    timeout: float
    pid: int
    rollback_to: int | None


@dataclass(frozen=True)
class RollbackRecord:
    """One rollback: from which version to which, when, who did it and why, and whether it worked."""

    from_version: int | None
    to_version: int | None
    to_digest: str | None
    at: float
    by: str
    reason: str
    ok: bool = True
    error: str | None = None


def new_serial() -> str:
    return secrets.token_hex(8)


class RouterStateDir:
    """The files of one router's applier (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_dir = root / "config"
        self.state_dir = root / "state"
        self.applier_dir = root / "applier"
        self.tables_file = self.applier_dir / "tables.rules"
        self.reloads_file = self.applier_dir / "reloads.jsonl"
        self.timer_log = self.applier_dir / "timer.log"

    def ensure(self) -> None:
        """Create the directories (the applier's own is private to root)."""
        for d in (self.config_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.applier_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the router's lock: commands and the rollback timer never act at the same time."""
        fd = os.open(self.applier_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # ------------------------------------------------------------------ snapshots

    def _meta_path(self, which: str) -> Path:
        return self.applier_dir / f"{which}.meta.json"

    def _data_path(self, serial: str) -> Path:
        return self.applier_dir / f"data-{serial}.json"

    def read_meta(self, which: str) -> SnapshotMeta | None:
        """The live or confirmed snapshot's meta, or None when there is none."""
        raw = _read_json(self._meta_path(which))
        return None if raw is None else SnapshotMeta(**raw)

    def read_data(self, meta: SnapshotMeta) -> SnapshotData:
        raw = _read_json(self._data_path(meta.serial))
        if raw is None:
            raise FileNotFoundError(f"snapshot data {meta.serial} is missing")
        return SnapshotData(**raw)

    def write_data(self, serial: str, data: SnapshotData) -> None:
        body = json.dumps(asdict(data), separators=(",", ":"))
        write_atomically(self._data_path(serial), body, durable=True)

    def drop_data(self, serial: str) -> None:
        """Remove snapshot data that never became live or confirmed."""
        with contextlib.suppress(FileNotFoundError):
            self._data_path(serial).unlink()

    def write_meta(self, which: str, meta: SnapshotMeta) -> None:
        """Point `which` at a snapshot whose data is written (the rename is the commit)."""
        write_atomically(self._meta_path(which), json.dumps(asdict(meta)), durable=True)

    def collect_data(self) -> None:
        """Remove snapshot data neither live nor confirmed refers to any more (call it with the
        lock held and no snapshot being written)."""
        keep = {m.serial for m in (self.read_meta(LIVE), self.read_meta(CONFIRMED)) if m}
        for path in self.applier_dir.glob("data-*.json"):
            if path.name[5:-5] not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ------------------------------------------------------------------ confirm window

    def read_pending(self) -> PendingConfirm | None:
        raw = _read_json(self.applier_dir / "pending.json")
        return None if raw is None else PendingConfirm(**raw)

    def write_pending(self, pending: PendingConfirm) -> None:
        write_atomically(
            self.applier_dir / "pending.json", json.dumps(asdict(pending)), durable=True
        )

    def clear_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.applier_dir / "pending.json").unlink()

    def _marker(self, version: int) -> Path:
        return self.applier_dir / f"confirmed-{version}"

    def mark_confirmed(self, version: int) -> None:
        """Leave the confirm marker of `version` (a timer armed for it then stands down)."""
        write_atomically(self._marker(version), f"{version}\n", durable=True)
        for path in self.applier_dir.glob("confirmed-*"):
            suffix = path.name.removeprefix("confirmed-")
            if suffix.isdigit() and int(suffix) < version:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def is_confirmed(self, version: int) -> bool:
        return self._marker(version).exists()

    # ------------------------------------------------------------------ rollbacks

    def read_rollback(self) -> RollbackRecord | None:
        raw = _read_json(self.applier_dir / "rollback.json")
        return None if raw is None else RollbackRecord(**raw)

    def write_rollback(self, record: RollbackRecord) -> None:
        write_atomically(
            self.applier_dir / "rollback.json", json.dumps(asdict(record)), durable=True
        )

    # ------------------------------------------------------------------ config files

    def read_config_files(self, names: Iterable[str]) -> dict[str, str]:
        """The config files that exist now, by name."""
        out: dict[str, str] = {}
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                out[name] = (self.config_dir / name).read_text()
        return out

    def stage_config_files(self, files: Mapping[str, str]) -> dict[str, Path]:
        """Write each file to a temporary name beside its final one; returns name -> temp path."""
        staged: dict[str, Path] = {}
        try:
            for name, text in files.items():
                fd, tmp = tempfile.mkstemp(dir=self.config_dir, prefix=f".{name}.", suffix=".new")
                staged[name] = Path(tmp)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.chmod(tmp, 0o600 if name in SECRET_FILES else 0o644)
        except BaseException:
            discard_staged(staged)
            raise
        return staged

    def swap_config_files(self, staged: Mapping[str, Path], remove: Iterable[str]) -> None:
        """Rename staged files over their final names and remove the files no longer wanted."""
        for name, tmp in staged.items():
            os.replace(tmp, self.config_dir / name)
        for name in remove:
            with contextlib.suppress(FileNotFoundError):
                (self.config_dir / name).unlink()


def discard_staged(staged: Mapping[str, Path]) -> None:
    for tmp in staged.values():
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None

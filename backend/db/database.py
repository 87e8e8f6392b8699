"""The engine's database: async sessions, migrations on start, and safe writes.

SQLite (the default) allows one writer at a time; writes in this process go through one lock
and retry on `database is locked`, so concurrent services never see spurious failures.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from backend.errors import SchemaTooNew, SysvmError

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")


def sqlite_url(path: Path, *, driver: str = "aiosqlite") -> str:
    return f"sqlite+{driver}:///{path}"


def _alembic_config(sync_url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", sync_url)
    return cfg


def head_revision() -> str:
    """The newest schema revision this sysvm knows."""
    head = ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def migrate(path: Path) -> str:
    """Bring the database at `path` to the newest schema; refuse one written by a newer sysvm.

    Blocking: call it in a thread. Returns the revision the database is at afterwards.
    """
    sync_url = sqlite_url(path, driver="pysqlite")
    cfg = _alembic_config(sync_url)
    script = ScriptDirectory.from_config(cfg)
    engine = create_engine(sync_url)
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        if current is not None:
            try:
                script.get_revision(current)
            except Exception as exc:
                raise SchemaTooNew(
                    f"database {path} has schema revision {current}, which this sysvm "
                    f"(schema {script.get_current_head()}) does not know: it was written by a newer "
                    "sysvm; upgrade sysvm or point SYSVM_HOME elsewhere (nothing was changed)"
                ) from exc
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SysvmError:
        raise
    except DatabaseError as exc:
        raise SysvmError(
            f"cannot open database {path}: {exc.orig}; if it is damaged, move it aside "
            "(the engine then starts empty)"
        ) from exc
    finally:
        engine.dispose()
    return head_revision()


class Database:
    """Async access to one SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Each aiosqlite connection is a thread; opening one blocks the loop while the thread
        # starts, so keep enough of them pooled that bursts of readers never open new ones.
        self.engine: AsyncEngine = create_async_engine(
            sqlite_url(path), pool_size=32, max_overflow=32, pool_timeout=60
        )
        event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = asyncio.Lock()

    async def open(self) -> str:
        """Migrate (in a thread) and return the schema revision."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return await asyncio.to_thread(migrate, self.path)

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reading; nothing it changes is committed."""
        async with self.sessions() as session:
            yield session

    async def write(self, work: Callable[[AsyncSession], Awaitable[T]], *, retries: int = 20) -> T:
        """Run `work` in one transaction, committed at the end; retried while SQLite is busy.

        `work` must be safe to run again (it is rolled back before a retry).
        """
        delay = 0.01
        for attempt in range(retries + 1):
            async with self._write_lock:
                async with self.sessions() as session:
                    try:
                        result = await work(session)
                        await session.commit()
                        return result
                    except OperationalError as exc:
                        await session.rollback()
                        if "locked" not in str(exc.orig) or attempt == retries:
                            raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()

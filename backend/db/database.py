"""The engine's database: commands run in its worker process, units of work in its threads,
async sessions, migrations on start, and safe writes.

SQLite (the default) allows one writer at a time; writes in this process go through one lock
and retry on `database is locked`, so concurrent services never see spurious failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from backend.db.worker import READ, WRITE, DatabaseWorker, is_command
from backend.errors import SysvmError
from backend.turns import take_turn

T = TypeVar("T")
log = logging.getLogger(__name__)

POOL_SIZE = 32
"""Connections kept open (each an aiosqlite thread), and sessions open at once outside another."""

_in_session: ContextVar[bool] = ContextVar("sysvm_db_in_session", default=False)


def sqlite_url(path: Path, *, driver: str = "aiosqlite") -> str:
    return f"sqlite+{driver}:///{path}"


SCHEMA_HEAD = "0001"
"""The newest schema revision (`backend.db.schema.head_revision()`, checked by a test). A database
already there opens without loading alembic, which would stay in the engine's memory (~11 MiB)."""


ALEMBIC_VERSION_TABLE = (
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)
"""As alembic itself creates it, so later migrations find what they expect."""


def current_revision(path: Path) -> str | None:
    """The schema revision the database at `path` records (None: new or never migrated)."""
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None  # no such table yet, or unreadable: the migration says which
    return str(row[0]) if row else None


async def ensure_schema(path: Path) -> str:
    """Bring the database at `path` to SCHEMA_HEAD and return it.

    A database already there, or a new one, never loads alembic: a new one gets the model's
    tables directly and is stamped with SCHEMA_HEAD (a test checks that this is exactly what the
    migrations build). Only an older database is migrated with alembic (`backend.db.schema`),
    which also refuses one written by a newer sysvm."""
    if await asyncio.to_thread(current_revision, path) == SCHEMA_HEAD:
        return SCHEMA_HEAD
    return await asyncio.to_thread(_bring_to_head, path)


def _bring_to_head(path: Path) -> str:
    """Create or migrate, one process at a time (engines, tools and tests may open the same new
    file at once): under an flock of `path`.lock, look again, then act."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = current_revision(path)
        if current == SCHEMA_HEAD:
            return SCHEMA_HEAD
        try:
            if current is None and _create_if_empty(path):
                return SCHEMA_HEAD
        except DatabaseError as exc:
            raise SysvmError(
                f"cannot open database {path}: {exc.orig}; if it is damaged, move it aside "
                "(the engine then starts empty)"
            ) from exc
        from backend.db.schema import migrate

        return migrate(path)
    finally:
        os.close(fd)


def _create_if_empty(path: Path) -> bool:
    """Create the schema in a database without any table; False if it has tables already."""
    from sqlalchemy import create_engine, inspect, text

    from backend.db.models import Base

    engine = create_engine(sqlite_url(path, driver="pysqlite"))
    try:
        with engine.begin() as conn:
            if inspect(conn).get_table_names():
                return False
            Base.metadata.create_all(conn)
            conn.execute(text(ALEMBIC_VERSION_TABLE))
            conn.execute(
                text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": SCHEMA_HEAD}
            )
    finally:
        engine.dispose()
    return True


class Database:
    """Access to one SQLite database file, two ways.

    `run_read(work)` and `run_write(work)` run `work(session)`, a plain function given a
    synchronous session, whole, and hand back its result: one hop from the event loop per unit
    of work. Prefer them, with a command (`backend.db.worker`: a marked module-level function,
    or a partial of one, that needs nothing of the engine's memory): it runs in the database's
    worker process, so SQLAlchemy's Python does not hold the GIL the loop needs. Any other unit
    (a closure) runs in one of the database's two threads (one reads, one writes). An
    async session (`read()`, `write()`) hops to its aiosqlite thread for every statement, fetch,
    commit and rollback: a lookup by name costs ~1-1.5 ms of the loop's CPU that way against
    ~0.1 ms (`bench/bench_db_hops.py`), which counts when a hundred jobs run at once.

    Each aiosqlite connection is a thread, and opening one blocks the loop while the thread
    starts. So the pool's connections are opened by `open()`, and at most POOL_SIZE sessions are
    open at once: a burst of callers waits for a pooled connection instead of opening (and
    closing again) overflow ones. A session opened inside another (same task) is not held back,
    so nesting cannot deadlock; it may use an overflow connection.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.engine: AsyncEngine = create_async_engine(
            sqlite_url(path), pool_size=POOL_SIZE, max_overflow=POOL_SIZE, pool_timeout=60
        )
        event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = asyncio.Lock()
        self._session_slots = asyncio.Semaphore(POOL_SIZE)
        self.sync_engine, self._sync_sessions = sync_sessions(path)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sysvm-db-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sysvm-db-write")
        self.worker = DatabaseWorker(path)

    async def open(self) -> str:
        """Migrate (in a thread), open the pool's connections, start the worker process and
        return the schema revision."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        revision = await ensure_schema(self.path)
        async with contextlib.AsyncExitStack() as pooled:
            for _ in range(POOL_SIZE):
                await pooled.enter_async_context(self.engine.connect())
        await self.worker.start()
        return revision

    async def close(self) -> None:
        await self.worker.stop()
        await self.engine.dispose()
        await asyncio.to_thread(self._close_threads)

    def _close_threads(self) -> None:
        """Let queued units of work finish, then close the threads' connections."""
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self.sync_engine.dispose()

    async def run_read(self, work: Callable[[Session], T], *, large: bool = False) -> T:
        """`work(session)` run whole in the worker process if it is a command (see
        `backend.db.worker`), else in the reading thread; nothing it changes is committed.
        Objects it returns are detached: load in `work` what the caller needs. A command whose
        arguments or result are `large` (megabytes) runs in the thread too: copying them to and
        from the worker costs more than the GIL it saves (10,000 rules: 61 ms against 34).
        With the answer, the caller takes its turn on the loop (`backend.turns`)."""
        if self._in_worker(work, large):
            result = await self.worker.call(READ, work)
        else:
            result = await asyncio.get_running_loop().run_in_executor(
                self._reader, functools.partial(run_unit, self._sync_sessions, work, write=False)
            )
        await take_turn()
        return result

    def _in_worker(self, work: Callable[[Session], T], large: bool) -> bool:
        return self.worker.running and is_command(work) and not large

    async def run_write(
        self, work: Callable[[Session], T], *, retries: int = 20, large: bool = False
    ) -> T:
        """`work(session)` run whole in the worker process if it is a command (see
        `backend.db.worker`) and not `large` (as for `run_read`), else in the writing thread,
        in one transaction committed at the
        end, under the same lock as `write()`, retried while SQLite is busy (so `work` must be
        safe to run again). A cancelled caller gets CancelledError at once; the transaction
        still ends whole (a thread cannot be cut), and the lock is held until it has. With the
        answer, the caller takes its turn on the loop (`backend.turns`)."""
        loop = asyncio.get_running_loop()

        def attempt() -> Awaitable[T]:
            if self._in_worker(work, large):
                return self.worker.call(WRITE, work)
            return loop.run_in_executor(
                self._writer, functools.partial(run_unit, self._sync_sessions, work, write=True)
            )

        result = await _uncut(self._while_busy(attempt, retries))
        await take_turn()
        return result

    async def _while_busy(self, attempt: Callable[[], Awaitable[T]], retries: int) -> T:
        """`attempt()` under the write lock, again after a pause while SQLite says it is locked
        (another process writes)."""
        delay = 0.01
        for n in range(retries + 1):
            async with self._write_lock:
                try:
                    return await attempt()
                except OperationalError as exc:
                    if "locked" not in str(exc.orig) or n == retries:
                        raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reading; nothing it changes is committed."""
        async with self._session() as session:
            yield session

    async def write(self, work: Callable[[AsyncSession], Awaitable[T]], *, retries: int = 20) -> T:
        """Run `work` in one transaction, committed at the end; retried while SQLite is busy.

        `work` must be safe to run again (it is rolled back before a retry). The transaction
        runs in a task of its own that the caller's cancellation does not cut: cut between its
        statements and its rollback, it left SQLite's write lock held by a pooled connection,
        and every later write (a cancelled job recording that it was cancelled) waited for it.
        A cancelled caller gets CancelledError at once; its transaction still ends whole.
        """

        async def attempt() -> T:
            async with self._session() as session:
                try:
                    result = await work(session)
                    await session.commit()
                    return result
                except OperationalError:
                    await session.rollback()
                    raise

        return await _uncut(self._while_busy(attempt, retries))

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        """A session, waiting for one of POOL_SIZE slots unless this task already holds one."""
        if _in_session.get():
            async with self.sessions() as session:
                yield session
            return
        async with self._session_slots:
            token = _in_session.set(True)
            try:
                async with self.sessions() as session:
                    yield session
            finally:
                _in_session.reset(token)


def sync_sessions(path: Path) -> tuple[Engine, sessionmaker[Session]]:
    """Synchronous sessions on the database at `path` (pysqlite; SQLAlchemy opens a file
    database's connections with check_same_thread off, so the pool may close them from any
    thread): for the database's threads and its worker process."""
    engine = create_engine(
        sqlite_url(path, driver="pysqlite"), pool_size=2, max_overflow=2, pool_timeout=60
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine, sessionmaker(engine, expire_on_commit=False)


def run_unit(sessions: sessionmaker[Session], work: Callable[[Session], T], *, write: bool) -> T:
    """`work(session)` in a session of its own; committed at the end when `write`."""
    with sessions() as session:
        result = work(session)
        if write:
            session.commit()
        return result


async def _uncut(work: Awaitable[T]) -> T:
    """Await `work` in a task of its own that the caller's cancellation does not cut: the
    caller gets CancelledError at once, the work still ends whole."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_forget_outcome)
        raise


def _forget_outcome(task: asyncio.Future[Any]) -> None:
    """The outcome of a write whose caller was cancelled: nobody awaits it any more."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a write whose caller was cancelled failed: %s", task.exception())


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()

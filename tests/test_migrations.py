"""Schema: migrations build the model from empty; a newer schema is refused untouched."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from backend.db.models import Base
from backend.db.schema import head_revision, migrate
from backend.errors import SchemaTooNew


def test_migrations_from_empty_build_exactly_the_model(tmp_path: Path) -> None:
    db = tmp_path / "sysvm.db"
    assert migrate(db) == head_revision()
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_migrating_twice_is_a_no_op(tmp_path: Path) -> None:
    db = tmp_path / "sysvm.db"
    migrate(db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    migrate(db)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_database_from_a_newer_schema_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    db = tmp_path / "sysvm.db"
    migrate(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
        conn.execute("CREATE TABLE future_table (x INTEGER)")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(SchemaTooNew, match="newer sysvm"):
        migrate(db)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_schema_head_constant_is_the_newest_migration() -> None:
    from backend.db.database import SCHEMA_HEAD

    assert SCHEMA_HEAD == head_revision(), "bump SCHEMA_HEAD with each new migration"


async def test_a_new_database_is_built_from_the_model_without_loading_alembic(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    from backend.db.database import SCHEMA_HEAD, current_revision

    db = tmp_path / "sysvm.db"
    probe = (
        "import asyncio, sys; from pathlib import Path; "
        "from backend.db.database import Database; "
        f"db = Database(Path({str(db)!r})); print(asyncio.run(db.open())); "
        "print(asyncio.run(db.open())); print('alembic' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [SCHEMA_HEAD, SCHEMA_HEAD, "False"]
    assert current_revision(db) == SCHEMA_HEAD
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        version_table = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE name = 'alembic_version'"
        ).scalar()
    engine.dispose()
    assert diff == []
    migrated = tmp_path / "migrated.db"
    migrate(migrated)
    with sqlite3.connect(migrated) as conn:
        (alembics,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'alembic_version'"
        ).fetchone()
    assert "".join(str(version_table).split()) == "".join(alembics.split())
    assert migrate(db) == SCHEMA_HEAD  # alembic agrees it is at the head


async def test_the_engine_refuses_a_newer_schema_untouched(tmp_path: Path) -> None:
    from backend.db.database import ensure_schema

    db = tmp_path / "sysvm.db"
    migrate(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(SchemaTooNew, match="written by a newer sysvm"):
        await ensure_schema(db)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_processes_opening_one_new_database_at_once_all_get_the_schema(tmp_path: Path) -> None:
    import subprocess
    import sys

    from backend.db.database import SCHEMA_HEAD

    db = tmp_path / "sysvm.db"
    probe = (
        "import asyncio; from pathlib import Path; from backend.db.database import Database; "
        f"print(asyncio.run(Database(Path({str(db)!r})).open()))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert outs == [SCHEMA_HEAD] * 4
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)

"""Schema: migrations build the model from empty; a newer schema is refused untouched."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from backend.db.database import head_revision, migrate
from backend.db.models import Base
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

"""Schema migrations with alembic.

The engine imports this only to upgrade a database written by an older sysvm (see
`backend.db.database.ensure_schema`), so alembic does not sit in its memory otherwise.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.exc import DatabaseError

from backend.db.database import sqlite_url
from backend.errors import SchemaTooNew, SysvmError

MIGRATIONS = Path(__file__).parent / "migrations"


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

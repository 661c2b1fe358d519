"""Schema: migrations create exactly what the models describe, on SQLite and PostgreSQL; SQLite runs in WAL mode."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from node.db.engine import alembic_config, make_engine, migrate
from node.db.models import Base


def test_migrations_match_models(engine):
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_migrate_twice_is_harmless_and_wal_is_on(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    migrate(engine)
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert connection.execute(text("select version_num from alembic_version")).scalar() == head


def test_upgrade_keeps_rows_of_an_older_schema(tmp_path):
    """Batch migrations copy SQLite tables; with foreign keys enforced, dropping a referenced table
    would fail and the node would not start on its own database."""
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0003")
        connection.execute(text("insert into studies values (1, '1.2.3', 'P1', 'Doe^J', '20260101', 'pelvis', 'A1')"))
        connection.execute(text("insert into series values (1, '1.2.3.4', 1, 'CT', 2, 'pelvis', '1.2.3.5')"))
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from series where study_id = 1")).scalar() == 1
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1

"""Upgrades: a database made by an earlier release of the schema, with a row in every table it has, opened by
the current code. The migrations run to the newest revision and every row is still there, every value as it
was. The tables and columns are read from the old database itself, so a table added later is covered without
touching this test."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import JSON, Boolean, Column, DateTime, Engine, Float, Integer, MetaData, String, Table, inspect, text

from node.db.engine import alembic_config, make_engine, open_database
from node.harness import NodeProcess, free_port

SCRIPTS = ScriptDirectory.from_config(alembic_config())
HEAD = SCRIPTS.get_current_head()
PREVIOUS = SCRIPTS.get_revision(HEAD).down_revision
EARLIER = [script.revision for script in SCRIPTS.walk_revisions() if script.revision != HEAD]  # newest first


def database_at(revision: str, url: str) -> Engine:
    """A new database whose schema is `revision`'s, as that release's node made it."""
    engine = make_engine(url, fsync=False)
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return engine


def sample_value(table: Table, column: Column) -> object:
    """A value of the column's type, telling which column it came from; 1 for a key, so that every reference
    finds the first row of the table it names."""
    if column.primary_key or column.foreign_keys:
        return 1
    kind = column.type
    if isinstance(kind, Boolean):
        return True
    if isinstance(kind, Integer):
        return 7
    if isinstance(kind, Float):
        return 0.25
    if isinstance(kind, DateTime):
        return datetime(2025, 3, 4, 5, 6, 7, 890000)
    if isinstance(kind, JSON):
        return {"kept": [table.name, column.name]}
    name = f"{table.name}.{column.name}"
    return name[: kind.length] if isinstance(kind, String) and kind.length else name


def fill_every_table(engine: Engine) -> MetaData:
    """One row in each table of the database's schema, referenced tables first; the schema as reflected."""
    schema = MetaData()
    schema.reflect(engine)
    with engine.begin() as connection:
        for table in schema.sorted_tables:
            if table.name != "alembic_version":
                connection.execute(table.insert().values({column.name: sample_value(table, column) for column in table.columns}))
    return schema


def stored_rows(engine: Engine, schema: MetaData) -> dict[str, list[dict]]:
    """Each table's rows as the database stores them (no type conversion), in the columns `schema` gives it."""
    rows = {}
    with engine.connect() as connection:
        for table in schema.sorted_tables:
            if table.name != "alembic_version":
                columns = ", ".join(f'"{column.name}"' for column in table.columns)
                stored = connection.execute(text(f'SELECT {columns} FROM "{table.name}"'))
                rows[table.name] = [dict(row) for row in stored.mappings()]
    return rows


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@pytest.mark.parametrize("revision", EARLIER)
def test_the_current_node_upgrades_a_database_of_an_earlier_release_and_loses_nothing(revision, tmp_path):
    url = f"sqlite:///{tmp_path / 'rtnode.sqlite3'}"
    old = database_at(revision, url)
    old_schema = fill_every_table(old)
    before = stored_rows(old, old_schema)
    old.dispose()
    assert all(len(rows) == 1 for rows in before.values()) and len(before) == len(old_schema.tables) - 1

    current = open_database(url)
    assert current_revision(current) == HEAD
    assert set(inspect(current).get_table_names()) >= set(old_schema.tables)
    assert stored_rows(current, old_schema) == before
    current.dispose()


def test_rtnode_jobs_lists_the_jobs_of_the_previous_release(tmp_path):
    node = NodeProcess(root=tmp_path, port=free_port())
    old = database_at(PREVIOUS, node.database_url)
    fill_every_table(old)
    old.dispose()
    listed = node.rtnode("jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    (job,) = json.loads(listed.stdout)
    assert (job["id"], job["series_instance_uid"], job["error"]) == (1, "series.series_instance_uid", "jobs.error")
    assert Path(node.database).is_file() and current_revision(make_engine(node.database_url)) == HEAD

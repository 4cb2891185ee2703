"""Alembic migrations create exactly the ORM schema, and downgrade removes it, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from index.db import downgrade, make_engine, upgrade
from index.models import Base


def test_upgrade_matches_models_and_downgrade_removes_everything(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            assert diffs == [], f"models and migrations disagree: {diffs}"
            tables = set(inspect(conn).get_table_names())
        assert set(Base.metadata.tables) <= tables
        downgrade(database_url)
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        upgrade(database_url)  # and back up again
    finally:
        engine.dispose()

"""Alembic environment: the URL comes from the caller's config (index.db.alembic_config) or
XDLABEL_DATABASE_URL; the target schema is index.models."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import pool

from index.db import make_engine
from index.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or os.environ.get(
    "XDLABEL_DATABASE_URL", "sqlite:///xdlabel-data/xdlabel.db")


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        # batch mode lets later migrations alter SQLite tables
        context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

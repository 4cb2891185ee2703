"""embedding change log

Every insert, delete and update of an embedding row, whatever wrote it (the store, a cascade from a
deleted image or dataset, plain SQL), appends to ``embedding_changes`` through database triggers;
indexes record the last ``seq`` they cover and catch up by reading the log past it. On SQLite the
embeddings table is recreated with AUTOINCREMENT, so a deleted row's id is never handed out again.

PostgreSQL: the trigger is a deferred constraint trigger that takes a transaction-level advisory
lock, so log rows are numbered at commit time, in commit order: a reader that has seen ``seq`` N
can never later see a smaller one appear (a plain sequence would number rows in insert order,
and a slow transaction could commit a smaller seq after a reader moved past it). SQLite has one
writer at a time, so its order is the commit order already.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 01:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_COLUMNS = "model_version_id, kind, embedding_id, op"
_TRACKED = ("id", "model_version_id", "kind", "image_id", "vector")

_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER embedding_changes_insert AFTER INSERT ON embeddings BEGIN
        INSERT INTO embedding_changes ({_COLUMNS}) VALUES (NEW.model_version_id, NEW.kind, NEW.id, 'add'); END""",
    f"""CREATE TRIGGER embedding_changes_delete AFTER DELETE ON embeddings BEGIN
        INSERT INTO embedding_changes ({_COLUMNS}) VALUES (OLD.model_version_id, OLD.kind, OLD.id, 'delete'); END""",
    f"""CREATE TRIGGER embedding_changes_update AFTER UPDATE OF {', '.join(_TRACKED)} ON embeddings BEGIN
        INSERT INTO embedding_changes ({_COLUMNS}) VALUES (OLD.model_version_id, OLD.kind, OLD.id, 'delete');
        INSERT INTO embedding_changes ({_COLUMNS}) VALUES (NEW.model_version_id, NEW.kind, NEW.id, 'add'); END""",
]

_UNCHANGED = " AND ".join(f"NEW.{c} IS NOT DISTINCT FROM OLD.{c}" for c in _TRACKED)
_POSTGRES = [
    f"""CREATE FUNCTION embedding_changes_log() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND {_UNCHANGED} THEN
            RETURN NULL;
        END IF;
        -- one committer at a time from here to the end of its transaction: seq order = commit order
        PERFORM pg_advisory_xact_lock(7262718350);
        IF TG_OP IN ('DELETE', 'UPDATE') THEN
            INSERT INTO embedding_changes ({_COLUMNS}) VALUES (OLD.model_version_id, OLD.kind, OLD.id, 'delete');
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            INSERT INTO embedding_changes ({_COLUMNS}) VALUES (NEW.model_version_id, NEW.kind, NEW.id, 'add');
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE CONSTRAINT TRIGGER embedding_changes_log AFTER INSERT OR UPDATE OR DELETE ON embeddings
       DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION embedding_changes_log()""",
]


def _recreate_embeddings(autoincrement: bool) -> None:
    with op.batch_alter_table('embeddings', recreate='always',
                              table_kwargs={'sqlite_autoincrement': autoincrement}):
        pass


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('embedding_changes',
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('embedding_id', sa.Integer(), nullable=False),
    sa.Column('op', sa.String(length=8), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_embedding_changes')),
    sqlite_autoincrement=True,
    )
    with op.batch_alter_table('embedding_changes', schema=None) as batch_op:
        batch_op.create_index('ix_embedding_changes_tail', ['model_version_id', 'kind', 'seq'], unique=False)

    if op.get_bind().dialect.name == 'sqlite':
        _recreate_embeddings(True)  # drops any trigger on the old table, so triggers come after
        for statement in _SQLITE_TRIGGERS:
            op.execute(statement)
    else:
        for statement in _POSTGRES:
            op.execute(statement)


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name == 'sqlite':
        for name in ('insert', 'delete', 'update'):
            op.execute(f'DROP TRIGGER IF EXISTS embedding_changes_{name}')
        _recreate_embeddings(False)
    else:
        op.execute('DROP TRIGGER IF EXISTS embedding_changes_log ON embeddings')
        op.execute('DROP FUNCTION IF EXISTS embedding_changes_log()')
    with op.batch_alter_table('embedding_changes', schema=None) as batch_op:
        batch_op.drop_index('ix_embedding_changes_tail')

    op.drop_table('embedding_changes')

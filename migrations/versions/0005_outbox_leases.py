"""outbox leases: claimed rows have an owner and an expiry; forced redos replace

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 01:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('ls_deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('replace_existing', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('ls_deliveries', schema=None) as batch_op:
        batch_op.drop_column('replace_existing')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('lease_owner')

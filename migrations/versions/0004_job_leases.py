"""job leases: a fencing token and a lease expiry per job

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 01:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        # Existing jobs start at token 0; a running job without a lease expiry counts as expired, so a
        # job left running by a worker of the previous version is taken over by the first new worker.
        batch_op.add_column(sa.Column('lease_token', sa.Integer(), nullable=False, server_default=sa.text('0')))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('lease_token')

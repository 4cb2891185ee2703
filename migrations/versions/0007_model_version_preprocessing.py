"""model version preprocessing

A model version's key now covers the preprocessing (short side, size guard, dtype) besides config and
weights; the row records it. Existing rows keep NULL there and stay readable: their names have no
preprocessing key, so a process registers a new version rather than adding differently made vectors
to theirs.

Revision ID: 0007
Revises: 0008
Create Date: 2026-12-01 04:30:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("preprocessing", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("preprocessing")

"""videos and their frames

A ``videos`` table (one row per video content per dataset) and ``video_frames``, which makes an
image a frame of a video at a timestamp (a new table: altering ``images`` would rebuild it on
SQLite, and dropping the old table there cascades to the images' vectors).

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-01 04:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('videos',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dataset_id', sa.Integer(), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.Column('duration', sa.Float(), nullable=True),
    sa.Column('fps', sa.Float(), nullable=True),
    sa.Column('codec', sa.String(length=32), nullable=True),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('sampling', sa.JSON(), nullable=False),
    sa.Column('meta', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_videos_dataset_id_datasets'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_videos')),
    sa.UniqueConstraint('dataset_id', 'sha256', name='uq_videos_dataset_sha256')
    )
    with op.batch_alter_table('videos', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_videos_dataset_id'), ['dataset_id'], unique=False)

    op.create_table('video_frames',
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('video_id', sa.Integer(), nullable=False),
    sa.Column('timestamp', sa.Float(), nullable=False),
    sa.Column('pts', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_video_frames_image_id_images'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['video_id'], ['videos.id'], name=op.f('fk_video_frames_video_id_videos'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id', name=op.f('pk_video_frames'))
    )
    with op.batch_alter_table('video_frames', schema=None) as batch_op:
        batch_op.create_index('ix_video_frames_video_time', ['video_id', 'timestamp'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('video_frames', schema=None) as batch_op:
        batch_op.drop_index('ix_video_frames_video_time')

    op.drop_table('video_frames')
    with op.batch_alter_table('videos', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_videos_dataset_id'))

    op.drop_table('videos')

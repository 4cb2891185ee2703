"""SQL schema (SQLAlchemy 2, typed ORM). SQL is the source of truth; FAISS indexes are caches.

Vectors are stored as little-endian float32 bytes so an index can always be rebuilt from SQL.
Migrations in ``migrations/`` create exactly this schema (a test compares the two).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps with an offset on every database: stored as UTC (SQLite keeps no offset, so an
    aware value is converted first and a naive one is taken as UTC) and read back aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime()}


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="dataset", cascade="all, delete-orphan",
                                               passive_deletes=True)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "sha256", name="uq_images_dataset_sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    mode: Mapped[str | None] = mapped_column(String(16))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending|done|failed
    error: Mapped[str | None] = mapped_column(Text)
    caption: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    dataset: Mapped[Dataset] = relationship(back_populates="images")
    tags: Mapped[list[ImageTag]] = relationship(cascade="all, delete-orphan", passive_deletes=True,
                                                lazy="selectin")


class Video(Base):
    """A video whose sampled frames are image rows (``Image.video_id``), once per dataset by content.

    ``status``: pending while its frames are being written (a rerun resumes it), done, or failed
    with ``error`` (frames written before the failure stay)."""

    __tablename__ = "videos"
    __table_args__ = (UniqueConstraint("dataset_id", "sha256", name="uq_videos_dataset_sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    duration: Mapped[float | None] = mapped_column(Float)  # seconds
    fps: Mapped[float | None] = mapped_column(Float)  # the stream's average frame rate
    codec: Mapped[str | None] = mapped_column(String(32))
    frames: Mapped[int] = mapped_column(Integer, default=0)  # sampled frames stored
    sampling: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the policy its frames were sampled by
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|done|failed
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class VideoFrame(Base):
    """An image that is a frame of a video, and when it shows. A table of its own rather than columns
    on ``images``: adding a foreign key there would rebuild that table on SQLite, and dropping the old
    one cascades to every image's vectors, tags and predictions."""

    __tablename__ = "video_frames"
    __table_args__ = (Index("ix_video_frames_video_time", "video_id", "timestamp"),)

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    video_id: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"))
    timestamp: Mapped[float] = mapped_column(Float)  # seconds from the video's start
    pts: Mapped[int] = mapped_column(Integer)  # the frame's presentation timestamp in its stream's time base


class ImageTag(Base):
    __tablename__ = "image_tags"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    # Short side, size guard and dtype the vectors were made with; None for versions registered before
    # they were recorded (their names carry no preprocessing key, so no new process reuses them).
    preprocessing: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Embedding(Base):
    """One vector: an image's (kind='image') or a region's (kind='region', with mask and box).

    Its primary key is its id in the FAISS index of (model_version_id, kind); ids are never reused
    (AUTOINCREMENT on SQLite, a sequence on PostgreSQL). Every insert, update and delete, by any
    path, is appended to ``embedding_changes`` by triggers (migration 0006).
    """

    __tablename__ = "embeddings"
    __table_args__ = (Index("ix_embeddings_version_kind", "model_version_id", "kind", "id"),
                      {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # image | region
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    box: Mapped[list[Any] | None] = mapped_column()  # [x0, y0, x1, y1] pixels
    mask_rle: Mapped[dict[str, Any] | None] = mapped_column()  # COCO RLE {size, counts}
    score: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(200))


class EmbeddingChange(Base):
    """The change log of embeddings, written only by database triggers: ``seq`` grows in commit
    order, so an index that covers the log up to N catches up by reading the rows past N."""

    __tablename__ = "embedding_changes"
    __table_args__ = (Index("ix_embedding_changes_tail", "model_version_id", "kind", "seq"),
                      {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))
    embedding_id: Mapped[int] = mapped_column(Integer)
    op: Mapped[str] = mapped_column(String(8))  # add | delete


class Prediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(32))  # semantic|instance|panoptic|grounding|caption
    payload: Mapped[dict[str, Any]] = mapped_column()
    score: Mapped[float | None] = mapped_column(Float)
    ls_task_id: Mapped[int | None] = mapped_column(Integer, index=True)
    push_state: Mapped[str] = mapped_column(String(16), default="none")  # none|pending|pushed|failed
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Annotation(Base):
    """A human label imported from Label Studio."""

    __tablename__ = "annotations"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"), index=True)
    ls_task_id: Mapped[int | None] = mapped_column(Integer, index=True)
    ls_annotation_id: Mapped[int | None] = mapped_column(Integer, unique=True)
    ls_project_id: Mapped[int | None] = mapped_column(Integer, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column()  # the annotation as Label Studio sent it
    task_data: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the task's data (image URL...)
    action: Mapped[str] = mapped_column(String(32))  # the latest webhook action
    deleted_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class LabelStudioDelivery(Base):
    """Outbox of predictions for Label Studio: written in the transaction that computed them,
    delivered in bulk later, so an outage of Label Studio loses nothing. One row per
    (server, project, task, model version): enqueuing twice changes nothing."""

    __tablename__ = "ls_deliveries"
    __table_args__ = (UniqueConstraint("server", "project_id", "task_id", "model_version",
                                       name="uq_ls_deliveries_target"),
                      Index("ix_ls_deliveries_state", "server", "state", "id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    server: Mapped[str] = mapped_column(String(500))  # Label Studio base URL
    project_id: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[str] = mapped_column(String(200))
    result: Mapped[list[Any]] = mapped_column()
    score: Mapped[float | None] = mapped_column(Float)  # 1 - uncertainty: sort ascending to review
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    # pending -> sending (a request is out: on a crash the next run asks Label Studio) -> delivered | failed
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()
    # A deliverer owns the rows it claimed until lease_expires_at; every write it makes is fenced
    # by lease_owner (a token per claim), so one that lost its lease changes nothing.
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    # A forced redo: the task's earlier predictions of this model version are deleted before sending.
    replace_existing: Mapped[bool] = mapped_column(default=False)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    total: Mapped[int | None] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)  # why the job itself failed
    errors: Mapped[list[Any]] = mapped_column(default=list)  # the latest per-item failures [{uri, reason}]
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    # The fencing token: +1 on every claim; each write of a worker carries the token it claimed with,
    # so a worker whose lease expired (and was taken over) can no longer change the job.
    lease_token: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column()  # renewed by the worker's heartbeat


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the key; the key is shown once
    scopes: Mapped[list[Any]] = mapped_column(default=list)  # e.g. ["read", "write"]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()

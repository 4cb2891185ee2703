"""Plain data-access functions over a Session (no classes, no globals).

The get-or-create and insert-if-new functions are safe when several processes run them at once:
they insert with ``ON CONFLICT DO NOTHING`` (SQLite and PostgreSQL) and read back what won, so a
race ends with one row and no error in either process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from index.models import Dataset, Image, ImageTag, ModelVersion


def _insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT, which has ``on_conflict_do_nothing``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"no conflict-tolerant insert for {dialect}")


def create_dataset(session: Session, *, name: str, description: str = "") -> Dataset:
    dataset = Dataset(name=name, description=description)
    session.add(dataset)
    session.flush()
    return dataset


def dataset_by_name(session: Session, name: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.name == name))


def get_or_create_dataset(session: Session, *, name: str, description: str = "") -> Dataset:
    """The dataset called ``name``, created if missing; two processes creating it at once both get
    the same row. Commit the session to keep a new one."""
    existing = dataset_by_name(session, name)
    if existing is not None:
        return existing
    session.execute(_insert(session, Dataset).values(name=name, description=description)
                    .on_conflict_do_nothing(index_elements=[Dataset.name]))
    dataset = dataset_by_name(session, name)
    assert dataset is not None  # inserted here or by whoever won the race
    return dataset


def add_image(session: Session, *, dataset_id: int, uri: str, sha256: str, width: int | None = None,
              height: int | None = None, mode: str | None = None, meta: dict[str, Any] | None = None,
              tags: Sequence[str] = (), status: str = "done", caption: str | None = None) -> Image:
    image = Image(dataset_id=dataset_id, uri=uri, sha256=sha256, width=width, height=height, mode=mode,
                  meta=meta or {}, status=status, caption=caption,
                  tags=[ImageTag(tag=t) for t in dict.fromkeys(tags)])
    session.add(image)
    session.flush()
    return image


def insert_image_if_new(session: Session, *, dataset_id: int, uri: str, sha256: str, width: int | None = None,
                        height: int | None = None, mode: str | None = None, meta: dict[str, Any] | None = None,
                        tags: Sequence[str] = (), status: str = "done", caption: str | None = None,
                        error: str | None = None) -> int | None:
    """Inserts the image unless the dataset already holds its content (``sha256``), committed or
    not (a concurrent insert is waited for); returns the new id, or None when it was there."""
    values = {"dataset_id": dataset_id, "uri": uri, "sha256": sha256, "width": width, "height": height,
              "mode": mode, "meta": meta or {}, "status": status, "caption": caption, "error": error}
    new_id = session.scalar(_insert(session, Image).values(**values)
                            .on_conflict_do_nothing(index_elements=[Image.dataset_id, Image.sha256])
                            .returning(Image.id))
    if new_id is not None and tags:
        session.add_all([ImageTag(image_id=new_id, tag=t) for t in dict.fromkeys(tags)])
        session.flush()
    return new_id


def get_or_create_model_version(session: Session, *, name: str, checkpoint_sha256: str,
                                embedding_dim: int, preprocessing: dict[str, Any] | None = None) -> ModelVersion:
    version = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if version is None:  # two processes loading a new model at once both end with one row
        session.execute(_insert(session, ModelVersion)
                        .values(name=name, checkpoint_sha256=checkpoint_sha256, embedding_dim=embedding_dim,
                                preprocessing=preprocessing)
                        .on_conflict_do_nothing(index_elements=[ModelVersion.name]))
        version = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        assert version is not None
    if version.checkpoint_sha256 != checkpoint_sha256 or version.embedding_dim != embedding_dim:
        raise ValueError(f"model version {name!r} exists with another checkpoint or dimension")
    return version

"""Plain data-access functions over a Session (no classes, no globals)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from index.models import Dataset, Image, ImageTag, ModelVersion


def create_dataset(session: Session, *, name: str, description: str = "") -> Dataset:
    dataset = Dataset(name=name, description=description)
    session.add(dataset)
    session.flush()
    return dataset


def dataset_by_name(session: Session, name: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.name == name))


def add_image(session: Session, *, dataset_id: int, uri: str, sha256: str, width: int | None = None,
              height: int | None = None, mode: str | None = None, meta: dict[str, Any] | None = None,
              tags: Sequence[str] = (), status: str = "done", caption: str | None = None) -> Image:
    image = Image(dataset_id=dataset_id, uri=uri, sha256=sha256, width=width, height=height, mode=mode,
                  meta=meta or {}, status=status, caption=caption,
                  tags=[ImageTag(tag=t) for t in dict.fromkeys(tags)])
    session.add(image)
    session.flush()
    return image


def get_or_create_model_version(session: Session, *, name: str, checkpoint_sha256: str,
                                embedding_dim: int) -> ModelVersion:
    version = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if version is None:
        version = ModelVersion(name=name, checkpoint_sha256=checkpoint_sha256, embedding_dim=embedding_dim)
        session.add(version)
        session.flush()
    elif version.checkpoint_sha256 != checkpoint_sha256 or version.embedding_dim != embedding_dim:
        raise ValueError(f"model version {name!r} exists with another checkpoint or dimension")
    return version

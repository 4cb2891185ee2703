"""Search filters and the SQL that turns them into the embedding ids they allow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select

from index.models import Embedding, Image, ImageTag

__all__ = ["Filters", "filtered_ids"]


@dataclass(frozen=True)
class Filters:
    dataset_ids: Sequence[int] = ()
    tags: Sequence[str] = ()  # every tag must be present
    meta: dict[str, Any] = field(default_factory=dict)  # equality on top-level metadata fields
    created_after: datetime | None = None
    created_before: datetime | None = None

    @property
    def empty(self) -> bool:
        return not (self.dataset_ids or self.tags or self.meta or self.created_after or self.created_before)


def filtered_ids(model_version_id: int, kind: str, filters: Filters) -> Select[Any]:
    """SQL for the embedding ids that pass ``filters``."""
    query = select(Embedding.id).where(Embedding.model_version_id == model_version_id, Embedding.kind == kind)
    if filters.empty:
        return query
    query = query.join(Image, Image.id == Embedding.image_id)
    if filters.dataset_ids:
        query = query.where(Image.dataset_id.in_(list(filters.dataset_ids)))
    for tag in filters.tags:
        query = query.where(select(ImageTag.image_id).where(ImageTag.image_id == Image.id,
                                                            ImageTag.tag == tag).exists())
    for key, value in filters.meta.items():
        column = Image.meta[key]
        if isinstance(value, bool):
            query = query.where(column.as_boolean() == value)
        elif isinstance(value, int | float):
            query = query.where(column.as_float() == float(value))
        else:
            query = query.where(column.as_string() == str(value))
    if filters.created_after is not None:
        query = query.where(Image.created_at >= filters.created_after)
    if filters.created_before is not None:
        query = query.where(Image.created_at < filters.created_before)
    return query

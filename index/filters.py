"""Search filters and the SQL that turns them into the embedding ids they allow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Select, String, bindparam, case, false, literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from index.models import Embedding, Image, ImageTag

__all__ = ["Filters", "filtered_ids"]


@dataclass(frozen=True)
class Filters:
    dataset_ids: Sequence[int] = ()
    tags: Sequence[str] = ()  # every tag must be present
    meta: dict[str, Any] = field(default_factory=dict)  # equality on top-level metadata fields
    created_after: datetime | None = None  # aware: compared as instants on every database
    created_before: datetime | None = None

    @property
    def empty(self) -> bool:
        return not (self.dataset_ids or self.tags or self.meta or self.created_after or self.created_before)


class meta_type(FunctionElement[str]):
    """The JSON type of ``images.meta[key]`` in one vocabulary on every database: number, string,
    boolean, null, object, array (NULL when the key is absent)."""

    type = String()
    inherit_cache = False  # the key is rendered into the statement

    def __init__(self, key: str) -> None:
        self.meta_key = key
        super().__init__(Image.meta)


@compiles(meta_type, "sqlite")
def _meta_type_sqlite(element: meta_type, compiler: SQLCompiler, **kw: Any) -> str:
    path = compiler.process(literal('$."' + element.meta_key + '"'), **kw)
    kind = f"json_type({compiler.process(element.clauses, **kw)}, {path})"
    return (f"CASE {kind} WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number' WHEN 'text' THEN 'string' "
            f"WHEN 'true' THEN 'boolean' WHEN 'false' THEN 'boolean' ELSE {kind} END")


@compiles(meta_type)
def _meta_type_default(element: meta_type, compiler: SQLCompiler, **kw: Any) -> str:  # PostgreSQL
    return f"json_typeof({compiler.process(Image.meta[element.meta_key], **kw)})"


def _meta_equals(key: str, value: Any) -> ColumnElement[bool]:
    """``meta[key] == value`` compared only where the stored value has the same JSON type: a CASE,
    so PostgreSQL never casts another type's text (its AND does not promise an order)."""
    column = Image.meta[key]
    if isinstance(value, bool):
        kind, test = "boolean", column.as_boolean() == value
    elif isinstance(value, int | float):
        kind, test = "number", column.as_float() == float(value)
    else:
        kind, test = "string", column.as_string() == str(value)
    return case((meta_type(key) == kind, test), else_=false())  # type: ignore[no-any-return]


def filtered_ids(model_version_id: int, kind: str, filters: Filters) -> Select[Any]:
    """SQL for the embedding ids that pass ``filters``."""
    query = select(Embedding.id).where(Embedding.model_version_id == model_version_id, Embedding.kind == kind)
    if filters.empty:
        return query
    query = query.join(Image, Image.id == Embedding.image_id)
    if filters.dataset_ids:
        # 64-bit binds: an id past PostgreSQL's 32-bit keys matches nothing instead of failing
        query = query.where(Image.dataset_id.in_(bindparam("dataset_ids", list(filters.dataset_ids), expanding=True,
                                                           type_=BigInteger)))
    for tag in filters.tags:
        query = query.where(select(ImageTag.image_id).where(ImageTag.image_id == Image.id,
                                                            ImageTag.tag == tag).exists())
    for key, value in filters.meta.items():
        query = query.where(_meta_equals(key, value))
    if filters.created_after is not None:
        query = query.where(Image.created_at >= filters.created_after)
    if filters.created_before is not None:
        query = query.where(Image.created_at < filters.created_before)
    return query

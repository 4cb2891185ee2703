"""Request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from index.filters import Filters


class FilterIn(BaseModel):
    dataset_ids: list[int] = []
    tags: list[str] = Field(default=[], description="every tag must be present")
    meta: dict[str, str | int | float | bool] = Field(default={}, description="equality on metadata fields")
    created_after: datetime | None = None
    created_before: datetime | None = None

    def to_filters(self) -> Filters:
        return Filters(tuple(self.dataset_ids), tuple(self.tags), dict(self.meta), self.created_after,
                       self.created_before)


class TextSearchIn(BaseModel):
    query: str = Field(min_length=1, max_length=1000)
    negative: str | None = Field(default=None, max_length=1000, description="what the hits should not show")
    k: int = Field(default=20, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=100_000)
    min_score: float | None = None
    filters: FilterIn = FilterIn()


class Hit(BaseModel):
    image_id: int
    score: float
    dataset_id: int
    uri: str
    caption: str | None
    width: int | None
    height: int | None
    tags: list[str]
    meta: dict[str, Any]
    region_id: int | None = None
    box: list[float] | None = None
    mask_rle: dict[str, Any] | None = None


class SearchOut(BaseModel):
    hits: list[Hit]
    next_offset: int | None


class DatasetIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: str = ""


class DatasetOut(BaseModel):
    id: int
    name: str
    description: str
    image_count: int


class ImageOut(BaseModel):
    id: int
    dataset_id: int
    uri: str
    sha256: str
    width: int | None
    height: int | None
    mode: str | None
    meta: dict[str, Any]
    tags: list[str]
    status: str
    error: str | None
    caption: str | None
    created_at: datetime


class ModelVersionOut(BaseModel):
    id: int
    name: str
    checkpoint_sha256: str
    embedding_dim: int


class JobIn(BaseModel):
    kind: str = "ingest"
    dataset: str = Field(min_length=1, max_length=200)
    sources: list[str] = Field(min_length=1, description="folders, files, .txt/.csv lists, COCO .json, URLs")
    tags: list[str] = []
    batch_size: int = Field(default=4, ge=1, le=256)


class JobOut(BaseModel):
    id: int
    kind: str
    state: str
    params: dict[str, Any]
    total: int | None
    done: int
    failed: int
    images_per_s: float
    eta_s: float | None
    errors: list[dict[str, Any]]
    error: str | None
    worker: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

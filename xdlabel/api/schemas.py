"""Request and response bodies."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from index.filters import Filters

INT64_MAX = 2**63 - 1
# An id as the database stores it (64-bit); larger numbers are refused with 422, not sent to SQL.
Id = Annotated[int, Field(ge=0, le=INT64_MAX)]


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800" sent as a JSON escape
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+23:59 lies before year 1 in UTC
        raise ValueError("the instant is out of range in UTC") from None


# Text that reaches SQL or a stored row: PostgreSQL refuses NUL characters, and neither database nor
# the JSON answers can hold text that is not valid UTF-8, so both are refused here (422).
Text = Annotated[str, AfterValidator(_storable)]
MetaKey = Annotated[str, Field(pattern=r"^[\w .:-]{1,100}$", description="letters, digits, _ . : - and spaces"),
                    AfterValidator(_storable)]
Instant = Annotated[AwareDatetime, AfterValidator(_utc)]
# Numbers within +-2^53 compare exactly as floats on both databases.
MetaNumber = Annotated[int, Field(ge=-(2**53), le=2**53)] | Annotated[float, Field(allow_inf_nan=False)]


class ErrorDetail(BaseModel):
    status: int
    message: str


class ErrorOut(BaseModel):
    """Every error answer: ``{"error": {"status": ..., "message": ...}}``."""

    error: ErrorDetail


class FilterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_ids: list[Id] = Field(default=[], max_length=1000)
    tags: list[Text] = Field(default=[], max_length=100, description="every tag must be present")
    meta: dict[MetaKey, bool | MetaNumber | Text] = Field(
        default={}, max_length=50, description="equality on metadata fields; a value matches only rows "
                                                "holding the same JSON type (number, string or boolean)")
    created_after: Instant | None = Field(default=None, description="with an offset, e.g. +05:00 or Z")
    created_before: Instant | None = Field(default=None, description="with an offset, e.g. +05:00 or Z")

    def to_filters(self) -> Filters:
        return Filters(tuple(self.dataset_ids), tuple(self.tags), dict(self.meta), self.created_after,
                       self.created_before)


class TextSearchIn(BaseModel):
    query: Text = Field(min_length=1, max_length=1000)
    negative: Text | None = Field(default=None, max_length=1000, description="what the hits should not show")
    k: int = Field(default=20, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=100_000)
    min_score: float | None = Field(default=None, allow_inf_nan=False)
    filters: FilterIn = FilterIn()
    recall: float | None = Field(default=None, gt=0, le=1, description="recall@10 target (default "
                                 "XDLABEL_SEARCH_RECALL, 0.95); the index probes what its calibration says it needs")
    nprobe: int | None = Field(default=None, ge=1, le=1 << 20, description="expert override of recall: IVF lists "
                               "to probe (a graph index: its search beam, efSearch)")


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
    name: Text = Field(min_length=1, max_length=200)
    description: Text = Field(default="", max_length=10_000)


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
    kind: Text = "ingest"
    dataset: Text = Field(min_length=1, max_length=200)
    sources: list[Annotated[Text, Field(min_length=1, max_length=4096)]] = Field(
        min_length=1, max_length=1000,
        description="http(s) URLs; folders, files, .txt/.csv lists and COCO .json only under XDLABEL_SOURCE_ROOTS;"
                    " a repeated source is read once")
    tags: list[Annotated[Text, Field(min_length=1, max_length=100)]] = Field(default=[], max_length=100)
    batch_size: int = Field(default=4, ge=1, le=32)
    outputs: list[Literal["embedding", "regions", "caption"]] | None = Field(
        default=None, min_length=1, description="what to store per image (embedding always); default: the server's")

    @field_validator("sources")
    @classmethod
    def _once(cls, sources: list[str]) -> list[str]:
        return list(dict.fromkeys(sources))

    @field_validator("outputs")
    @classmethod
    def _with_embedding(cls, outputs: list[str] | None) -> list[str] | None:
        if outputs is not None and "embedding" not in outputs:
            raise ValueError("outputs must include embedding: it is what image search reads")
        return list(dict.fromkeys(outputs)) if outputs is not None else None


class KeyOut(BaseModel):
    """An API key as listed: never its hash."""

    id: int
    name: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


class ReadyOut(BaseModel):
    status: str
    model: str | None = Field(default=None, description="only with a valid API key")
    database: str | None = Field(default=None, description="the SQL dialect; only with a valid API key")


class PredictionOut(BaseModel):
    id: int
    task: str
    payload: dict[str, Any]
    score: float | None
    model_version_id: int


class RegionOut(BaseModel):
    id: int
    box: list[float] | None
    mask_rle: dict[str, Any] | None
    score: float | None
    label: str | None


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

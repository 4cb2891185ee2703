"""Text, image and region search: queries become vectors with the model, then the store searches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import bindparam, select

from index.filters import Filters
from index.models import Embedding, Image, ImageTag
from index.store import Hit, from_bytes
from xdlabel.services import Services
from xdlabel.textqueries import TextQueries

NEGATIVE_WEIGHT = 0.5  # score = sim(query) - 0.5 * sim(negative): linear, so exact in the index


def public_uri(uri: str, roots: Sequence[Path] = ()) -> str:
    """A stored URI as API answers show it: URLs as they are; a local file as its path under the
    source root that holds it, else its file name, never the server's absolute path."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        return uri
    path = Path(unquote(parsed.path))
    for root in roots:
        root = Path(root).resolve()
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


class NotFound(LookupError):
    pass


@dataclass(frozen=True)
class SearchResult:
    hits: list[dict[str, Any]]
    next_offset: int | None


# Built once: constructing a select costs more than running it on this path.
_IMAGES = select(Image.id, Image.dataset_id, Image.uri, Image.caption, Image.width, Image.height,
                 Image.meta).where(Image.id.in_(bindparam("ids", expanding=True)))
_TAGS = select(ImageTag.image_id, ImageTag.tag).where(ImageTag.image_id.in_(bindparam("ids", expanding=True)))


def _image_rows(services: Services, hits: list[Hit]) -> dict[int, dict[str, Any]]:
    """The shown columns and tags of the hits' images, as plain rows from one connection (ORM
    objects cost more than the search itself on this path)."""
    if not hits:
        return {}
    ids = {"ids": list({h.image_id for h in hits})}
    with services.engine.connect() as conn:
        rows = {r[0]: {**r._mapping, "tags": []} for r in conn.execute(_IMAGES, ids)}
        for image_id, tag in conn.execute(_TAGS, ids):
            if image_id in rows:
                rows[image_id]["tags"].append(tag)
    return rows


def _present(services: Services, hits: list[Hit], k: int, offset: int, regions: bool) -> SearchResult:
    images = _image_rows(services, hits)
    roots = services.settings.source_roots
    out = []
    for h in hits:
        im = images.get(h.image_id)
        if im is None:
            continue
        item: dict[str, Any] = {"image_id": h.image_id, "score": round(h.score, 6), "dataset_id": im["dataset_id"],
                                "uri": public_uri(im["uri"], roots), "caption": im["caption"], "width": im["width"],
                                "height": im["height"], "tags": sorted(im["tags"]), "meta": im["meta"]}
        if regions:
            item.update(region_id=h.embedding_id, box=h.box, mask_rle=h.mask_rle)
        out.append(item)
    return SearchResult(out, offset + k if len(hits) == k else None)


def text_queries(services: Services, kind: str) -> TextQueries:
    """The process's cached, batching text encoder for ``kind`` (image: retrieval queries of the
    image space; region: plain sentence embeddings), made on first use."""
    encoders = services.text_queries
    with services.model_lock:
        if kind not in encoders:
            predictor = services.predictor
            embed = predictor.text_query_embeddings if kind == "image" else predictor.text_embeddings
            encoders[kind] = TextQueries(embed, services.model_lock)
        return encoders[kind]


def _text_vector(services: Services, text: str, negative: str | None, kind: str) -> np.ndarray:
    vectors = text_queries(services, kind).vectors([text] + ([negative] if negative else []))
    return vectors[0] - NEGATIVE_WEIGHT * vectors[1] if negative else vectors[0]


def search_text(services: Services, text: str, *, k: int = 20, offset: int = 0, min_score: float | None = None,
                negative: str | None = None, filters: Filters | None = None, regions: bool = False,
                recall: float | None = None, nprobe: int | None = None) -> SearchResult:
    """``recall``: recall@10 target (default XDLABEL_SEARCH_RECALL); ``nprobe`` overrides it."""
    kind = "region" if regions else "image"
    query = _text_vector(services, text, negative, kind)
    hits = services.store.search(services.model.version_id, kind, query[None], k, filters=filters,
                                 offset=offset, min_score=min_score, recall=recall, nprobe=nprobe)[0]
    return _present(services, hits, k, offset, regions)


def search_image(services: Services, *, image: PILImage.Image | None = None, image_id: int | None = None,
                 k: int = 20, offset: int = 0, min_score: float | None = None,
                 filters: Filters | None = None, recall: float | None = None,
                 nprobe: int | None = None) -> SearchResult:
    model = services.model
    if image is not None:
        predictor = services.predictor
        with services.model_lock:
            query = predictor.image_embeddings(predictor.encode(image))[0]
    else:
        with services.sessions() as session:
            data = session.scalar(select(Embedding.vector).where(
                Embedding.image_id == image_id, Embedding.kind == "image",
                Embedding.model_version_id == model.version_id))
        if data is None:
            raise NotFound(f"image {image_id} has no embedding for model {model.name}")
        query = from_bytes(data)
    hits = services.store.search(model.version_id, "image", query[None], k, filters=filters, offset=offset,
                                 min_score=min_score, recall=recall, nprobe=nprobe)[0]
    return _present(services, hits, k, offset, regions=False)

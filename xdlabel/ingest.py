"""Turning image files into SQL rows, vectors and predictions, one model pass per image.

This is the synchronous core; batched, resumable jobs on workers and Ray build on it (issue 6).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from sqlalchemy import select

from index.models import Image, Prediction
from index.repository import add_image, create_dataset, dataset_by_name
from index.store import NewEmbedding
from xdlabel.services import Services

PILImage.MAX_IMAGE_PIXELS = 100_000_000  # decompression-bomb guard: larger images are refused


def encode_rle(mask: np.ndarray) -> dict[str, object]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, object]) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": str(rle["counts"]).encode("ascii")}).astype(bool)


@dataclass
class IngestReport:
    added: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason


def _load(path: Path) -> tuple[PILImage.Image, str]:
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file")
    image = PILImage.open(io.BytesIO(data))
    image.load()
    return image, hashlib.sha256(data).hexdigest()


def ingest_files(services: Services, dataset: str, paths: Sequence[Path], *, batch_size: int = 4,
                 tags: Sequence[str] = ()) -> IngestReport:
    report = IngestReport()
    predictor, model = services.predictor, services.model
    with services.sessions() as session:
        ds = dataset_by_name(session, dataset) or create_dataset(session, name=dataset)
        session.commit()
        dataset_id = ds.id
    for start in range(0, len(paths), batch_size):
        batch: list[tuple[Path, PILImage.Image, str]] = []
        with services.sessions() as session:
            for path in paths[start:start + batch_size]:
                try:
                    image, digest = _load(path)
                except Exception as err:  # noqa: BLE001 - any decoder error is a bad file
                    report.failed[str(path)] = f"{type(err).__name__}: {err}"
                    session.add(Image(dataset_id=dataset_id, uri=path.resolve().as_uri(), sha256="0" * 64,
                                      status="failed", error=report.failed[str(path)], meta={}))
                    continue
                exists = session.scalar(select(Image.id).where(Image.dataset_id == dataset_id,
                                                               Image.sha256 == digest))
                if exists is not None or digest in {d for _, _, d in batch}:
                    report.duplicates.append(str(path))
                    continue
                batch.append((path, image, digest))
            session.commit()
        if not batch:
            continue
        features = predictor.encode([image for _, image, _ in batch])
        image_vectors = predictor.image_embeddings(features)
        regions = predictor.region_embeddings(features)
        captions = predictor.caption(features)
        with services.sessions() as session:
            items = []
            for k, (path, image, digest) in enumerate(batch):
                row = add_image(session, dataset_id=dataset_id, uri=path.resolve().as_uri(), sha256=digest,
                                width=image.width, height=image.height, mode=image.mode, tags=tags,
                                caption=captions[k])
                session.add(Prediction(image_id=row.id, model_version_id=model.version_id, task="caption",
                                       payload={"text": captions[k]}))
                items.append(NewEmbedding(row.id, "image", image_vectors[k]))
                items += [NewEmbedding(row.id, "region", r.embedding, box=list(r.box), mask_rle=encode_rle(r.mask),
                                       score=r.score) for r in regions[k]]
                report.added.append(row.id)
            services.store.add_embeddings(session, model.version_id, model.image_dim,
                                          [i for i in items if i.kind == "image"])
            services.store.add_embeddings(session, model.version_id, model.region_dim,
                                          [i for i in items if i.kind == "region"])
    return report

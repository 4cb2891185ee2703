"""/v1 routes: search, images, datasets, model versions."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlparse

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, Response
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import func, select

from index.models import Dataset, Embedding, Image, Job, ModelVersion, Prediction
from index.repository import create_dataset, dataset_by_name
from xdlabel import jobs
from xdlabel.api.auth import ServicesDep, require
from xdlabel.api.schemas import (
    DatasetIn,
    DatasetOut,
    FilterIn,
    ImageOut,
    JobIn,
    JobOut,
    ModelVersionOut,
    SearchOut,
    TextSearchIn,
)
from xdlabel.search import NotFound, search_image, search_text
from xdlabel.services import Services

router = APIRouter(prefix="/v1")
READ, WRITE = require("read"), require("write")


# -- search ------------------------------------------------------------------------------------

@router.post("/search/text", response_model=SearchOut, dependencies=[READ], tags=["search"])
def text_to_image(body: TextSearchIn, services: ServicesDep) -> SearchOut:
    """Images whose content matches the text (official X-Decoder retrieval score)."""
    result = search_text(services, body.query, k=body.k, offset=body.offset, min_score=body.min_score,
                         negative=body.negative, filters=body.filters.to_filters())
    return SearchOut.model_validate(result, from_attributes=True)


@router.post("/search/regions", response_model=SearchOut, dependencies=[READ], tags=["search"])
def text_to_region(body: TextSearchIn, services: ServicesDep) -> SearchOut:
    """Regions matching the text, with their image, box, mask (COCO RLE) and score."""
    result = search_text(services, body.query, k=body.k, offset=body.offset, min_score=body.min_score,
                         negative=body.negative, filters=body.filters.to_filters(), regions=True)
    return SearchOut.model_validate(result, from_attributes=True)


@router.post("/search/image", response_model=SearchOut, dependencies=[READ], tags=["search"])
async def image_to_image(services: ServicesDep, file: Annotated[UploadFile | None, File()] = None,
                         image_id: Annotated[int | None, Form()] = None,
                         k: Annotated[int, Form(ge=1, le=1000)] = 20, offset: Annotated[int, Form(ge=0)] = 0,
                         min_score: Annotated[float | None, Form()] = None,
                         filters: Annotated[str | None, Form(description="FilterIn as JSON")] = None) -> SearchOut:
    """Images similar to an uploaded image or to a stored one (``image_id``)."""
    if (file is None) == (image_id is None):
        raise HTTPException(400, "send exactly one of: an image file, an image_id")
    parsed = FilterIn.model_validate_json(filters) if filters else FilterIn()
    image = None
    if file is not None:
        data = await file.read(services.settings.max_upload_bytes + 1)
        if len(data) > services.settings.max_upload_bytes:
            raise HTTPException(413, f"image larger than {services.settings.max_upload_bytes} bytes")
        try:
            image = PILImage.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError, PILImage.DecompressionBombError) as err:
            raise HTTPException(400, f"not a readable image: {err}") from None
    try:
        result = search_image(services, image=image, image_id=image_id, k=k, offset=offset, min_score=min_score,
                              filters=parsed.to_filters())
    except NotFound as err:
        raise HTTPException(404, str(err)) from None
    return SearchOut.model_validate(result, from_attributes=True)


# -- images -----------------------------------------------------------------------------------

def _image(services: Services, image_id: int) -> Image:
    with services.sessions() as session:
        image = session.get(Image, image_id)
        if image is None:
            raise HTTPException(404, f"image {image_id} not found")
        return image


def _local_path(image: Image) -> Path:
    parsed = urlparse(image.uri)
    path = Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else None
    if path is None or not path.is_file():
        raise HTTPException(404, f"the original of image {image.id} is not available ({image.uri})")
    return path


@router.get("/images/{image_id}", response_model=ImageOut, dependencies=[READ], tags=["images"])
def get_image(image_id: int, services: ServicesDep) -> ImageOut:
    image = _image(services, image_id)
    return ImageOut.model_validate({**{c: getattr(image, c) for c in ImageOut.model_fields if c != "tags"},
                                    "tags": sorted(t.tag for t in image.tags)})


@router.get("/images/{image_id}/original", dependencies=[READ], tags=["images"])
def get_original(image_id: int, services: ServicesDep) -> FileResponse:
    return FileResponse(_local_path(_image(services, image_id)))


@router.get("/images/{image_id}/thumbnail", dependencies=[READ], tags=["images"])
def get_thumbnail(image_id: int, services: ServicesDep, size: Annotated[int, Query(ge=16, le=1024)] = 256
                  ) -> Response:
    image = _image(services, image_id)
    cached = services.settings.thumbnail_dir / f"{image.sha256}-{size}.jpg"
    if not cached.is_file():
        with PILImage.open(_local_path(image)) as original:
            thumb = original.convert("RGB")
            thumb.thumbnail((size, size))
            cached.parent.mkdir(parents=True, exist_ok=True)
            thumb.save(cached, "JPEG", quality=85)
    return Response(cached.read_bytes(), media_type="image/jpeg")


@router.get("/images/{image_id}/predictions", dependencies=[READ], tags=["images"])
def get_predictions(image_id: int, services: ServicesDep) -> list[dict[str, object]]:
    _image(services, image_id)
    with services.sessions() as session:
        rows = session.scalars(select(Prediction).where(Prediction.image_id == image_id)).all()
        return [{"id": p.id, "task": p.task, "payload": p.payload, "score": p.score,
                 "model_version_id": p.model_version_id} for p in rows]


@router.get("/images/{image_id}/regions", dependencies=[READ], tags=["images"])
def get_regions(image_id: int, services: ServicesDep) -> list[dict[str, object]]:
    _image(services, image_id)
    with services.sessions() as session:
        rows = session.scalars(select(Embedding).where(Embedding.image_id == image_id,
                                                       Embedding.kind == "region")).all()
        return [{"id": e.id, "box": e.box, "mask_rle": e.mask_rle, "score": e.score, "label": e.label}
                for e in rows]


# -- datasets ---------------------------------------------------------------------------------

@router.get("/datasets", response_model=list[DatasetOut], dependencies=[READ], tags=["datasets"])
def list_datasets(services: ServicesDep) -> list[DatasetOut]:
    with services.sessions() as session:
        rows = session.execute(select(Dataset, func.count(Image.id)).outerjoin(Image).group_by(Dataset.id)
                               .order_by(Dataset.id)).all()
        return [DatasetOut(id=d.id, name=d.name, description=d.description, image_count=n) for d, n in rows]


@router.post("/datasets", response_model=DatasetOut, status_code=201, dependencies=[WRITE], tags=["datasets"])
def post_dataset(body: DatasetIn, services: ServicesDep) -> DatasetOut:
    with services.sessions() as session:
        if dataset_by_name(session, body.name) is not None:
            raise HTTPException(409, f"dataset {body.name!r} exists")
        dataset = create_dataset(session, name=body.name, description=body.description)
        session.commit()
        return DatasetOut(id=dataset.id, name=dataset.name, description=dataset.description, image_count=0)


@router.delete("/datasets/{dataset_id}", status_code=204, dependencies=[WRITE], tags=["datasets"])
def delete_dataset(dataset_id: int, services: ServicesDep) -> Response:
    """Deletes the dataset with its images, predictions and vectors (SQL and index)."""
    with services.sessions() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise HTTPException(404, f"dataset {dataset_id} not found")
        image_ids = list(session.scalars(select(Image.id).where(Image.dataset_id == dataset_id)))
        services.store.remove_images(session, image_ids)
        session.delete(session.get(Dataset, dataset_id))
        session.commit()
    return Response(status_code=204)


# -- jobs -------------------------------------------------------------------------------------

@router.post("/jobs", response_model=JobOut, status_code=201, dependencies=[WRITE], tags=["jobs"])
def post_job(body: JobIn, services: ServicesDep) -> JobOut:
    """Queue an ingestion job; `xdlabel worker` processes run it."""
    with services.sessions() as session:
        try:
            job = jobs.submit(session, body.kind, body.model_dump(exclude={"kind"}))
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        return JobOut.model_validate(jobs.describe(job))


@router.get("/jobs/{job_id}", response_model=JobOut, dependencies=[READ], tags=["jobs"])
def get_job(job_id: int, services: ServicesDep) -> JobOut:
    with services.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return JobOut.model_validate(jobs.describe(job))


@router.get("/jobs", response_model=list[JobOut], dependencies=[READ], tags=["jobs"])
def list_jobs(services: ServicesDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[JobOut]:
    with services.sessions() as session:
        return [JobOut.model_validate(jobs.describe(j))
                for j in session.scalars(select(Job).order_by(Job.id.desc()).limit(limit))]


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, dependencies=[WRITE], tags=["jobs"])
def cancel_job(job_id: int, services: ServicesDep) -> JobOut:
    with services.sessions() as session:
        job = jobs.cancel(session, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return JobOut.model_validate(jobs.describe(job))


# -- models -----------------------------------------------------------------------------------

@router.get("/models", response_model=list[ModelVersionOut], dependencies=[READ], tags=["models"])
def list_models(services: ServicesDep) -> list[ModelVersionOut]:
    with services.sessions() as session:
        return [ModelVersionOut.model_validate(m, from_attributes=True)
                for m in session.scalars(select(ModelVersion).order_by(ModelVersion.id))]

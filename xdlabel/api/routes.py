"""/v1 routes: search, images, datasets, jobs, model versions, API keys."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path as FilePath
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import func, select

from index.models import Dataset, Embedding, Image, Job, ModelVersion, Prediction
from index.repository import create_dataset, dataset_by_name
from xdlabel import jobs
from xdlabel.api.auth import ServicesDep, list_api_keys, require, revoke_api_key
from xdlabel.api.limits import MEDIA_TYPES, decode, open_image
from xdlabel.api.schemas import (
    INT64_MAX,
    DatasetIn,
    DatasetOut,
    ErrorOut,
    FilterIn,
    ImageOut,
    JobIn,
    JobOut,
    KeyOut,
    ModelVersionOut,
    PredictionOut,
    RegionOut,
    SearchOut,
    Text,
    TextSearchIn,
)
from xdlabel.search import NotFound, public_uri, search_image, search_text
from xdlabel.services import Services
from xdlabel.sources import SourceRefused, check_sources

# Every error answer has the same body; documented once for all routes.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in (
        (400, "bad request"), (401, "missing or invalid API key"), (403, "the key lacks the scope"),
        (404, "not found"), (409, "conflict"), (413, "over a size limit"), (422, "invalid input"),
        (503, "the database is busy or not reachable"), (507, "out of disk space"))}
router = APIRouter(prefix="/v1", responses=ERRORS)
READ, WRITE = require("read"), require("write")
PathId = Annotated[int, Path(ge=0, le=INT64_MAX, description="a 64-bit id")]
IMAGE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()},
          "description": "the image"}}
THUMBNAIL_SIZES = (64, 128, 256, 512, 1024)




def _stored(services: Services, key: int, what: str) -> int:
    """An id the database's keys can hold (PostgreSQL's are 32-bit); any other cannot exist: 404."""
    largest = 2**31 - 1 if services.engine.dialect.name == "postgresql" else INT64_MAX
    if key > largest:
        raise HTTPException(404, f"{what} {key} not found")
    return key


# -- search ------------------------------------------------------------------------------------

@router.post("/search/text", response_model=SearchOut, dependencies=[READ], tags=["search"])
def text_to_image(body: TextSearchIn, services: ServicesDep) -> SearchOut:
    """Images whose content matches the text (official X-Decoder retrieval score)."""
    result = search_text(services, body.query, k=body.k, offset=body.offset, min_score=body.min_score,
                         negative=body.negative, filters=body.filters.to_filters(), recall=body.recall,
                         nprobe=body.nprobe)
    return SearchOut.model_validate(result, from_attributes=True)


@router.post("/search/regions", response_model=SearchOut, dependencies=[READ], tags=["search"])
def text_to_region(body: TextSearchIn, services: ServicesDep) -> SearchOut:
    """Regions matching the text, with their image, box, mask (COCO RLE) and score."""
    result = search_text(services, body.query, k=body.k, offset=body.offset, min_score=body.min_score,
                         negative=body.negative, filters=body.filters.to_filters(), regions=True,
                         recall=body.recall, nprobe=body.nprobe)
    return SearchOut.model_validate(result, from_attributes=True)


def _filters(raw: str | None) -> FilterIn:
    if not raw:
        return FilterIn()
    try:
        return FilterIn.model_validate_json(raw)
    except ValidationError as err:
        parts = [f"filters.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}".replace("filters.: ", "filters: ")
                 for e in err.errors(include_url=False, include_input=False)]
        raise HTTPException(422, "; ".join(parts) + " (filters must be a JSON object)") from None


@router.post("/search/image", response_model=SearchOut, dependencies=[READ], tags=["search"])
def image_to_image(services: ServicesDep, file: Annotated[UploadFile | None, File()] = None,
                   image_id: Annotated[int | None, Form(ge=0, le=INT64_MAX)] = None,
                   k: Annotated[int, Form(ge=1, le=1000)] = 20, offset: Annotated[int, Form(ge=0, le=100_000)] = 0,
                   min_score: Annotated[float | None, Form(allow_inf_nan=False)] = None,
                   filters: Annotated[Text | None, Form(description="FilterIn as a JSON object")] = None,
                   recall: Annotated[float | None, Form(gt=0, le=1)] = None,
                   nprobe: Annotated[int | None, Form(ge=1, le=1 << 20)] = None) -> SearchOut:
    """Images similar to an uploaded image or to a stored one (``image_id``). A plain ``def``: the
    decode and the model run in a worker thread, one model call at a time, never on the event loop."""
    if (file is None) == (image_id is None):
        raise HTTPException(400, "send exactly one of: an image file, an image_id")
    parsed = _filters(filters)
    if image_id is not None:
        _stored(services, image_id, "image")
    image = None
    settings = services.settings
    if file is not None:
        data = file.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"image larger than {settings.max_upload_bytes} bytes (XDLABEL_MAX_UPLOAD_BYTES)")
        image = decode(open_image(data, settings.max_image_pixels, "the uploaded file"), "the uploaded file")
    try:
        result = search_image(services, image=image, image_id=image_id, k=k, offset=offset, min_score=min_score,
                              filters=parsed.to_filters(), recall=recall, nprobe=nprobe)
    except NotFound as err:
        raise HTTPException(404, str(err)) from None
    return SearchOut.model_validate(result, from_attributes=True)


# -- images -----------------------------------------------------------------------------------

def _image(services: Services, image_id: int) -> Image:
    _stored(services, image_id, "image")
    with services.sessions() as session:
        image = session.get(Image, image_id)
        if image is None:
            raise HTTPException(404, f"image {image_id} not found")
        return image


def _served_path(services: Services, image: Image) -> FilePath:
    """The local file of an image that decoded at ingestion; failed or pending images, URLs and
    anything inside the data folder (the database, indexes) are never read back."""
    unavailable = HTTPException(404, f"the original of image {image.id} is not available")
    if image.status != "done":
        raise unavailable
    parsed = urlparse(image.uri)
    if parsed.scheme not in ("file", ""):
        raise unavailable
    path = FilePath(unquote(parsed.path)).resolve()
    if path.is_relative_to(services.settings.data_dir.resolve()) or not path.is_file():
        raise unavailable
    return path


def _verified_bytes(services: Services, image: Image) -> bytes:
    """The original's bytes, read once and only when they are still the ingested ones (same sha256,
    under the limit); everything served or rendered from the original comes from these bytes."""
    from xdlabel.api.video_files import frame_png

    frame = frame_png(services, image)  # a video frame: decoded from its verified video
    if frame is not None:
        return frame
    path = _served_path(services, image)
    limit = services.settings.max_image_bytes
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:  # unreadable now (permissions, removed): as unavailable as a missing file
        raise HTTPException(404, f"the original of image {image.id} is not available") from None
    if len(data) > limit or hashlib.sha256(data).hexdigest() != image.sha256:
        raise HTTPException(404, f"the original of image {image.id} changed since it was ingested")
    return data


def _image_out(services: Services, image: Image) -> ImageOut:
    values = {c: getattr(image, c) for c in ImageOut.model_fields if c != "tags"}
    values["uri"] = public_uri(image.uri, services.settings.source_roots)
    if image.error and values["uri"] != image.uri:  # the reason, without the server's path
        values["error"] = image.error.replace(unquote(urlparse(image.uri).path), values["uri"])
    return ImageOut.model_validate({**values, "tags": sorted(t.tag for t in image.tags)})


@router.get("/images/{image_id}", response_model=ImageOut, dependencies=[READ], tags=["images"])
def get_image(image_id: PathId, services: ServicesDep) -> ImageOut:
    """An image's record; a local file's ``uri`` is its path under its source root, else its name."""
    return _image_out(services, _image(services, image_id))


@router.get("/images/{image_id}/original", dependencies=[READ], tags=["images"], response_class=Response,
            responses=IMAGE_RESPONSE)
def get_original(image_id: PathId, services: ServicesDep) -> Response:
    """The stored file, only when it is still the image that was ingested (same bytes, decodes as a
    JPEG, PNG, GIF, WebP, BMP or TIFF within the pixel limit), with that format's content type."""
    image = _image(services, image_id)
    data = _verified_bytes(services, image)
    with open_image(data, services.settings.max_image_pixels, f"the original of image {image.id}") as opened:
        media = MEDIA_TYPES[str(opened.format)]
    return Response(data, media_type=media)


@router.get("/images/{image_id}/thumbnail", dependencies=[READ], tags=["images"], response_class=Response,
            responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "a JPEG at most size x size (size rounded up to a bucket)"}})
def get_thumbnail(image_id: PathId, services: ServicesDep, size: Annotated[int, Query(ge=16, le=1024)] = 256
                  ) -> Response:
    """A JPEG of the verified original (as /original checks it), at most ``size`` rounded up to
    64, 128, 256, 512 or 1024 pixels a side."""
    image = _image(services, image_id)
    size = next(b for b in THUMBNAIL_SIZES if b >= size)  # a few files per image, whatever sizes are asked
    cached = services.settings.thumbnail_dir / f"{image.sha256}-{size}.jpg"
    if not cached.is_file():
        what = f"the original of image {image.id}"
        data = _verified_bytes(services, image)  # never a path opened again after the check
        with open_image(data, services.settings.max_image_pixels, what) as original:
            thumb = decode(original, what, size=(size, size)).convert("RGB")
            thumb.thumbnail((size, size))
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(f".{uuid.uuid4().hex}.part")
            thumb.save(partial, "JPEG", quality=85)
            partial.replace(cached)  # a reader never sees half a file
    return Response(cached.read_bytes(), media_type="image/jpeg")


@router.get("/images/{image_id}/predictions", response_model=list[PredictionOut], dependencies=[READ],
            tags=["images"])
def get_predictions(image_id: PathId, services: ServicesDep) -> list[PredictionOut]:
    _image(services, image_id)
    with services.sessions() as session:
        rows = session.scalars(select(Prediction).where(Prediction.image_id == image_id)).all()
        return [PredictionOut(id=p.id, task=p.task, payload=p.payload, score=p.score,
                              model_version_id=p.model_version_id) for p in rows]


@router.get("/images/{image_id}/regions", response_model=list[RegionOut], dependencies=[READ], tags=["images"])
def get_regions(image_id: PathId, services: ServicesDep) -> list[RegionOut]:
    _image(services, image_id)
    with services.sessions() as session:
        rows = session.scalars(select(Embedding).where(Embedding.image_id == image_id,
                                                       Embedding.kind == "region")).all()
        return [RegionOut(id=e.id, box=e.box, mask_rle=e.mask_rle, score=e.score, label=e.label) for e in rows]


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
def delete_dataset(dataset_id: PathId, services: ServicesDep) -> Response:
    """Deletes the dataset with its images, predictions and vectors (SQL and index)."""
    _stored(services, dataset_id, "dataset")
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

# An absolute path or file:// URI inside a message (not the path part of an http URL).
_PATH_IN_TEXT = re.compile(r"file://[^\s'\",;:()\[\]]+|(?<![\w:/.~-])/[^\s'\",;:()\[\]]+")


def _hide_paths(text: str, roots: list[FilePath]) -> str:
    return _PATH_IN_TEXT.sub(lambda m: public_uri(m.group(0), roots), text)


def _job_out(services: Services, job: Job) -> JobOut:
    """A job as answers show it: failed files as their path under their source root (else their
    name), and the job's error as one line without SQL, parameters or server paths."""
    shown = jobs.describe(job)
    roots = list(services.settings.source_roots)
    shown["errors"] = [{**e, "uri": public_uri(str(e.get("uri", "")), roots),
                        "reason": _hide_paths(str(e.get("reason", "")), roots)}
                       for e in shown["errors"] or [] if isinstance(e, dict)]
    if shown["error"]:
        first = str(shown["error"]).split("[SQL:")[0].strip().splitlines() or [""]
        shown["error"] = _hide_paths(first[0].strip(), roots)[:500]
    return JobOut.model_validate(shown)


@router.post("/jobs", response_model=JobOut, status_code=201, dependencies=[WRITE], tags=["jobs"])
def post_job(body: JobIn, services: ServicesDep) -> JobOut:
    """Queue an ingestion job; `xdlabel worker` processes run it. Sources are http(s) URLs, or paths
    under XDLABEL_SOURCE_ROOTS (none by default); the data folder is never a source. The job is
    marked restricted, so the worker checks the roots again when it reads."""
    settings = services.settings
    try:
        check_sources(body.sources, roots=settings.source_roots, forbidden=[settings.data_dir])
    except SourceRefused as err:
        raise HTTPException(400, str(err)) from None
    with services.sessions() as session:
        try:
            job = jobs.submit(session, body.kind, {**body.model_dump(exclude={"kind"}), "restricted": True})
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        return _job_out(services, job)


@router.get("/jobs/{job_id}", response_model=JobOut, dependencies=[READ], tags=["jobs"])
def get_job(job_id: PathId, services: ServicesDep) -> JobOut:
    _stored(services, job_id, "job")
    with services.sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return _job_out(services, job)


@router.get("/jobs", response_model=list[JobOut], dependencies=[READ], tags=["jobs"])
def list_jobs(services: ServicesDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[JobOut]:
    with services.sessions() as session:
        return [_job_out(services, j)
                for j in session.scalars(select(Job).order_by(Job.id.desc()).limit(limit))]


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, dependencies=[WRITE], tags=["jobs"])
def cancel_job(job_id: PathId, services: ServicesDep) -> JobOut:
    _stored(services, job_id, "job")
    with services.sessions() as session:
        job = jobs.cancel(session, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return _job_out(services, job)


# -- models -----------------------------------------------------------------------------------

@router.get("/models", response_model=list[ModelVersionOut], dependencies=[READ], tags=["models"])
def list_models(services: ServicesDep) -> list[ModelVersionOut]:
    with services.sessions() as session:
        return [ModelVersionOut.model_validate(m, from_attributes=True)
                for m in session.scalars(select(ModelVersion).order_by(ModelVersion.id))]


# -- API keys ---------------------------------------------------------------------------------

@router.get("/keys", response_model=list[KeyOut], dependencies=[WRITE], tags=["keys"])
def list_keys(services: ServicesDep) -> list[KeyOut]:
    """Every key with its name, scopes and dates (never its hash). Needs the write scope."""
    with services.sessions() as session:
        return [KeyOut(id=k.id, name=k.name, scopes=list(k.scopes), created_at=k.created_at,
                       revoked_at=k.revoked_at) for k in list_api_keys(session)]


@router.delete("/keys/{key_id}", status_code=204, dependencies=[WRITE], tags=["keys"])
def delete_key(key_id: PathId, services: ServicesDep) -> Response:
    """Revokes the key at once (it is kept, marked revoked). Needs the write scope."""
    _stored(services, key_id, "API key")
    with services.sessions() as session:
        if revoke_api_key(session, key_id) is None:
            raise HTTPException(404, f"API key {key_id} not found")
    return Response(status_code=204)

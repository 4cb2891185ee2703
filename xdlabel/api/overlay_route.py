"""``GET /v1/images/{id}/overlay``: the image with its stored regions drawn by ``xdlabel.overlay`` (outline,
label and score per region, legend) as a PNG: what region search searches, seen at once."""

from __future__ import annotations

import io

import numpy as np
from fastapi import APIRouter
from fastapi.responses import Response
from PIL import Image as PILImage
from PIL import ImageOps
from sqlalchemy import select

from annotator.convert import coco_rle_to_mask
from index.models import Embedding
from xdlabel.api.auth import ServicesDep
from xdlabel.api.limits import decode, open_image
from xdlabel.api.routes import ERRORS, READ, PathId, _image, _verified_bytes
from xdlabel.overlay import LabeledMask, overlay

router = APIRouter(prefix="/v1", responses=ERRORS)
MAX_SIDE = 1024  # larger originals are drawn at this size (masks follow, nearest)


@router.get("/images/{image_id}/overlay", dependencies=[READ], tags=["images"], response_class=Response,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "the image with its regions outlined, tagged and listed"}})
def get_overlay(image_id: PathId, services: ServicesDep) -> Response:
    image = _image(services, image_id)
    what = f"the original of image {image.id}"
    data = _verified_bytes(services, image)
    with open_image(data, services.settings.max_image_pixels, what) as original:
        # Upright, as ingestion saw it: the stored masks are in those pixels.
        picture = ImageOps.exif_transpose(decode(original, what)).convert("RGB")
    with services.sessions() as session:
        rows = session.scalars(select(Embedding).where(Embedding.image_id == image_id, Embedding.kind == "region")
                               .order_by(Embedding.score.desc(), Embedding.id)).all()
        regions = [(coco_rle_to_mask(e.mask_rle), e.label or "region", float(e.score or 0.0))
                   for e in rows if e.mask_rle]
    factor = min(1.0, MAX_SIDE / max(picture.size))
    if factor < 1.0:
        size = (max(1, round(picture.width * factor)), max(1, round(picture.height * factor)))
        picture = picture.resize(size, PILImage.Resampling.BICUBIC)
        regions = [(np.asarray(PILImage.fromarray(m).resize(size, PILImage.Resampling.NEAREST)), label, score)
                   for m, label, score in regions]
    segments = [LabeledMask(m.astype(bool), label, score) for m, label, score in regions
                if m.shape == (picture.height, picture.width)]
    drawn = overlay(picture, segments, title=f"image {image.id}: {len(segments)} regions")
    out = io.BytesIO()
    drawn.save(out, "PNG")
    return Response(out.getvalue(), media_type="image/png")

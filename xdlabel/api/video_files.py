"""A video's bytes and its frames' pixels, read only while the file is the one ingested.

Every byte served of a video, and every frame decoded for an image route (original, thumbnail,
overlay), comes from bytes read once and checked against the stored sha256.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from fastapi import HTTPException
from PIL import Image as PILImage
from sqlalchemy import select

from index.models import Image, Video, VideoFrame
from xdlabel.services import Services

SERVE_LIMIT = 512 * 1024 * 1024  # videos are read whole to check their hash before any byte is used


def verified_video_bytes(services: Services, video: Video) -> bytes:
    """The video's bytes, only while they are the ingested ones (same sha256): local files of
    videos that were stored, never anything in the data folder."""
    unavailable = HTTPException(404, f"the file of video {video.id} is not available")
    parsed = urlparse(video.uri)
    if video.status != "done" or parsed.scheme not in ("file", ""):
        raise unavailable
    path = Path(unquote(parsed.path)).resolve()
    if path.is_relative_to(services.settings.data_dir.resolve()) or not path.is_file():
        raise unavailable
    try:
        with open(path, "rb") as f:
            data = f.read(SERVE_LIMIT + 1)
    except OSError:
        raise unavailable from None
    if len(data) > SERVE_LIMIT:
        raise HTTPException(413, f"video {video.id} is over the {SERVE_LIMIT}-byte serving limit")
    if hashlib.sha256(data).hexdigest() != video.sha256:
        raise HTTPException(404, f"the file of video {video.id} changed since it was ingested")
    return data


def frame_png(services: Services, image: Image) -> bytes | None:
    """The frame an image row stands for, as PNG bytes decoded from its verified video; None when
    the image is not a video frame."""
    with services.sessions() as session:
        row = session.execute(select(VideoFrame.pts, Video).join(Video, Video.id == VideoFrame.video_id)
                              .where(VideoFrame.image_id == image.id)).first()
    if row is None:
        return None
    pts, video = row
    data = verified_video_bytes(services, video)
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        container.seek(pts, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts >= pts:
                if frame.pts != pts:
                    break
                out = io.BytesIO()
                PILImage.fromarray(frame.to_ndarray(format="rgb24")).save(out, format="PNG")
                return out.getvalue()
    raise HTTPException(404, f"frame {image.id} was not found in video {video.id}")

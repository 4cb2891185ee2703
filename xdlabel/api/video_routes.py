"""/v1 video routes: text -> moments search, a video's record and its verified bytes (with ranges,
so a browser's <video> can seek)."""

from __future__ import annotations

import re
from pathlib import Path as FilePath
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

from fastapi import APIRouter, Header, HTTPException, Path
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from index.models import Video
from xdlabel.api.auth import ServicesDep, require
from xdlabel.api.routes import ERRORS
from xdlabel.api.schemas import INT64_MAX, Id, MetaKey, MetaNumber, Text
from xdlabel.api.video_files import verified_video_bytes
from xdlabel.moments import VideoFilters, search_moments
from xdlabel.search import public_uri
from xdlabel.services import Services

router = APIRouter(prefix="/v1", responses=ERRORS)
READ = require("read")
PathId = Annotated[int, Path(ge=0, le=INT64_MAX, description="a 64-bit id")]
MEDIA = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
         ".mkv": "video/x-matroska", ".avi": "video/x-msvideo", ".mpg": "video/mpeg", ".mpeg": "video/mpeg",
         ".ts": "video/mp2t"}
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class VideoFilterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_ids: list[Id] = Field(default=[], max_length=1000)
    min_duration: float | None = Field(default=None, ge=0, allow_inf_nan=False, description="seconds")
    max_duration: float | None = Field(default=None, ge=0, allow_inf_nan=False, description="seconds")
    codecs: list[Text] = Field(default=[], max_length=20, description="e.g. h264, vp9")
    meta: dict[MetaKey, bool | MetaNumber | Text] = Field(default={}, max_length=50,
                                                         description="equality on the video's metadata")

    def to_filters(self) -> VideoFilters:
        return VideoFilters(tuple(self.dataset_ids), self.min_duration, self.max_duration, tuple(self.codecs),
                            dict(self.meta))


class MomentSearchIn(BaseModel):
    query: Text = Field(min_length=1, max_length=1000)
    negative: Text | None = Field(default=None, max_length=1000, description="what the moments should not show")
    k: int = Field(default=10, ge=1, le=200)
    per_video: int = Field(default=3, ge=1, le=50)
    filters: VideoFilterIn = VideoFilterIn()


class MomentOut(BaseModel):
    video_id: int
    dataset_id: int
    uri: str
    start: float = Field(description="seconds")
    end: float = Field(description="seconds")
    score: float
    best_image_id: int
    best_time: float
    frames: int
    duration: float | None
    meta: dict[str, Any]
    play: str = Field(description="the video's bytes with a media fragment: #t=start,end")


class MomentsOut(BaseModel):
    moments: list[MomentOut]


class VideoOut(BaseModel):
    id: int
    dataset_id: int
    uri: str
    status: str
    error: str | None
    width: int | None
    height: int | None
    duration: float | None
    fps: float | None
    codec: str | None
    frames: int
    sampling: dict[str, Any]
    meta: dict[str, Any]


@router.post("/search/moments", response_model=MomentsOut, dependencies=[READ], tags=["search"])
def text_to_moments(body: MomentSearchIn, services: ServicesDep) -> MomentsOut:
    """Moments of videos matching the text: adjacent matching frames of one video as a time range,
    with its best frame and score, best first."""
    moments = search_moments(services, body.query, k=body.k, negative=body.negative,
                             filters=body.filters.to_filters(), per_video=body.per_video)
    return MomentsOut(moments=[MomentOut(**m, play=f"/v1/videos/{m['video_id']}/file#t={m['start']},{m['end']}")
                               for m in moments])


def _video(services: Services, video_id: int) -> Video:
    with services.sessions() as session:
        video = session.get(Video, video_id) if video_id <= 2**31 - 1 else None
        if video is None:
            raise HTTPException(404, f"video {video_id} not found")
        return video


@router.get("/videos/{video_id}", response_model=VideoOut, dependencies=[READ], tags=["videos"])
def get_video(video_id: PathId, services: ServicesDep) -> VideoOut:
    video = _video(services, video_id)
    values = {name: getattr(video, name) for name in VideoOut.model_fields}
    values["uri"] = public_uri(video.uri, services.settings.source_roots)
    if video.error and values["uri"] != video.uri:
        values["error"] = video.error.replace(unquote(urlparse(video.uri).path), values["uri"])
    return VideoOut(**values)


@router.get("/videos/{video_id}/file", dependencies=[READ], tags=["videos"], response_class=Response,
            responses={200: {"description": "the video"}, 206: {"description": "the asked byte range"},
                       416: {"description": "a range outside the file"}})
def get_video_file(video_id: PathId, services: ServicesDep,
                   range_: Annotated[str | None, Header(alias="Range")] = None) -> Response:
    """The stored video file, only while it is the one ingested; one ``Range: bytes=a-b`` is honoured."""
    video = _video(services, video_id)
    data = verified_video_bytes(services, video)
    media = MEDIA.get(FilePath(unquote(urlparse(video.uri).path)).suffix.lower(), "application/octet-stream")
    headers = {"Accept-Ranges": "bytes"}
    match = RANGE.match(range_.strip()) if range_ else None
    if match is None or not (match[1] or match[2]):
        return Response(data, media_type=media, headers=headers)
    size = len(data)
    if match[1]:
        start, end = int(match[1]), min(int(match[2]) if match[2] else size - 1, size - 1)
    else:  # the last n bytes
        start, end = max(size - int(match[2]), 0), size - 1
    if start >= size or start > end:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    return Response(data[start:end + 1], status_code=206, media_type=media,
                    headers={**headers, "Content-Range": f"bytes {start}-{end}/{size}"})

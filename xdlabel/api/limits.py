"""Bounds on what one request may make the server read or decode."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Multipart framing around an uploaded file: boundaries, part headers, the small form fields.
MULTIPART_OVERHEAD = 64 * 1024


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes (XDLABEL_MAX_UPLOAD_BYTES)")


class BodyLimit:
    """Refuses a body over ``limit`` bytes before reading it (Content-Length) or as soon as the
    stream passes it (chunked), so an upload never reaches the disk spool beyond the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, receive, send)
            return
        headers = dict(scope["headers"])
        body_left = (length not in (None, b"0")) or b"transfer-encoding" in headers
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen, body_left
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_left = body_left and message.get("more_body", False)
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if body_left:  # answered before the body ended: close rather than drain the rest
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = BodyTooLarge(self.limit)
        response = JSONResponse({"error": {"status": 413, "message": err.detail}}, status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


# Formats served back and their content types; anything else is not an image we hand out.
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
               "BMP": "image/bmp", "TIFF": "image/tiff"}


def open_image(source: bytes | Path, max_pixels: int, what: str = "the image") -> Image.Image:
    """Opens an image lazily and checks its declared size before any pixel is decoded: a file that
    is not an image gives 422, one over ``max_pixels`` gives 413, both with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HTTPException(413, f"{what} is over the {max_pixels}-pixel limit (XDLABEL_MAX_IMAGE_PIXELS)") from None
    except UnidentifiedImageError:
        raise HTTPException(422, f"{what} is not a readable image (JPEG, PNG, GIF, WebP, BMP or TIFF)") from None
    except OSError as err:
        raise HTTPException(422, f"{what} could not be read ({err.strerror or type(err).__name__})") from None
    if image.format not in MEDIA_TYPES:
        image.close()
        raise HTTPException(422, f"{what} is a {image.format} file, not a JPEG, PNG, GIF, WebP, BMP or TIFF")
    if image.width * image.height > max_pixels:
        size = f"{image.width}x{image.height}"
        image.close()
        raise HTTPException(413, f"{what} is {size}, over the {max_pixels}-pixel limit (XDLABEL_MAX_IMAGE_PIXELS)")
    return image


def decode(image: Image.Image, what: str = "the image", **draft: Any) -> Image.Image:
    """Decodes the pixels (after ``open_image`` checked the size); a truncated or corrupt file gives 422."""
    try:
        if draft and image.format == "JPEG":
            image.draft("RGB", draft["size"])  # JPEG decodes straight at a fraction of its size
        image.load()
        return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise HTTPException(422, f"{what} could not be decoded ({type(err).__name__})") from None

"""One source item to pixels, or to its failure with a one-line reason; never an exception.

Errors that may go away (timeouts, dropped connections, HTTP 5xx and 429, Label Studio down) are
retried a few times with backoff first. A failure to get the bytes is keyed by the URI (tried
again next run); bytes that do not decode are keyed by their sha256 (remembered).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from annotator.client import LabelStudioClient, LabelStudioUnavailable
from index.retry import retry
from xdecoder.transforms import read_image
from xdlabel.sources import FetchError, Item, fetch


@dataclass
class Decoded:
    item: Item
    digest: str  # the content's sha256 when ``fetched``, else the URI's (see ``uri_key``)
    rgb: np.ndarray | None = None
    mode: str | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height), upright
    fetched: bool = False  # the bytes were read: an error is about them, and is final for them
    transient: bool = False  # the error may go away (it was retried already)


def uri_key(uri: str) -> str:
    """What a failure to get an item's bytes is stored under (there is no content hash)."""
    return hashlib.sha256(uri.encode()).hexdigest()


def is_transient_fetch(err: BaseException) -> bool:
    """Errors worth another try: a server that is down, slow, overloaded or restarting."""
    if getattr(err, "transient", False) or isinstance(err, LabelStudioUnavailable | TimeoutError):
        return True
    import httpx

    return isinstance(err, httpx.TransportError)  # connect, read and TLS handshake errors, timeouts


def reason(err: BaseException) -> str:
    """One line saying what went wrong (our own errors say it themselves; others get their type)."""
    text = " ".join(str(err).split()) or "no details"
    if not isinstance(err, FetchError | LabelStudioUnavailable | ValueError):
        text = f"{type(err).__name__}: {text}"
    return text[:500]


def _read(item: Item, *, max_bytes: int, timeout: float, allow_private: bool, labelstudio: LabelStudioClient | None,
          roots: Sequence[Path] | None, forbidden: Sequence[Path]) -> bytes:
    if "ls_image" in item.meta:
        if labelstudio is None:
            raise FetchError(f"{item.uri}: no Label Studio connection to read it")
        return labelstudio.read_file(item.meta["ls_image"], max_bytes)
    return fetch(item.uri, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private, roots=roots,
                 forbidden=forbidden)


def decode(item: Item, *, max_bytes: int, max_pixels: int, allow_private: bool,
           labelstudio: LabelStudioClient | None = None, roots: Sequence[Path] | None = None,
           forbidden: Sequence[Path] = (), timeout: float = 20.0, attempts: int = 3) -> Decoded:
    """Fetch and decode one item; never raises: a bad input comes back with ``error`` set.
    ``timeout`` bounds one download; transient fetch errors are retried ``attempts`` times in all
    with backoff."""
    try:
        data = retry(lambda: _read(item, max_bytes=max_bytes, timeout=timeout, allow_private=allow_private,
                                   labelstudio=labelstudio, roots=roots, forbidden=forbidden),
                     transient=is_transient_fetch, attempts=attempts, first_wait=0.2, max_wait=2.0, what=item.uri)
    except Exception as err:  # noqa: BLE001 - whatever it is, it is this item's failure
        return Decoded(item, uri_key(item.uri), error=reason(err), transient=is_transient_fetch(err))
    digest = hashlib.sha256(data).hexdigest()
    try:
        rgb, mode = read_image(data, max_pixels)
    except Exception as err:  # noqa: BLE001
        return Decoded(item, digest, error=reason(err), fetched=True)
    return Decoded(item, digest, rgb, mode, fetched=True)


def is_known(decoded: Decoded, known: set[str], retry_keys: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether a run can skip the item: its content is stored, and no failed row of its URI waits
    to be resolved. Failures to fetch are never skipped (they are tried again)."""
    return decoded.fetched and decoded.digest in known and uri_key(decoded.item.uri) not in retry_keys

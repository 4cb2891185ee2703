"""Where images come from: folders, lists of paths or URLs, COCO files, Label Studio projects.
And fetching them safely.

Each source yields ``Item``s (a URI plus metadata); ``fetch`` turns a URI into bytes with a
timeout and a size cap, and refuses URLs that resolve to private, loopback or link-local
addresses unless that is explicitly allowed (a server ingesting user-given URLs must not become
a proxy into its own network).
"""

from __future__ import annotations

import csv
import ipaddress
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlparse

if TYPE_CHECKING:
    from annotator.client import LabelStudioClient

LABELSTUDIO_PREFIX = "labelstudio://"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class FetchError(ValueError):
    """A URI that could not be fetched; the message says why."""


@dataclass(frozen=True)
class Item:
    uri: str  # file:///abs/path or http(s)://...
    meta: dict[str, Any] = field(default_factory=dict)


def folder_items(root: Path, pattern: str = "**/*") -> Iterator[Item]:
    """Image files under ``root`` matching ``pattern`` (recursive by default), in sorted order."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    for path in sorted(root.glob(pattern)):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            yield Item(path.resolve().as_uri())


def _as_uri(value: str, base: Path) -> str:
    if urlparse(value).scheme in ("http", "https", "file"):
        return value
    path = Path(value)
    return (path if path.is_absolute() else base / path).resolve().as_uri()


def list_items(path: Path) -> Iterator[Item]:
    """A text file with one path or URL per line, or a CSV with a ``uri`` (or ``path``/``url``)
    column whose other columns become metadata. Relative paths are relative to the file."""
    base = path.resolve().parent
    with path.open(newline="") as f:
        first = f.readline()
        f.seek(0)
        if "," in first and any(key in first.lower() for key in ("uri", "path", "url")):
            for row in csv.DictReader(f):
                column = next(c for c in ("uri", "path", "url") if c in {k.lower() for k in row})
                key = next(k for k in row if k.lower() == column)
                value = row.pop(key)
                yield Item(_as_uri(value.strip(), base), {k: v for k, v in row.items() if k})
        else:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    yield Item(_as_uri(line.strip(), base))


def coco_items(path: Path, image_root: Path | None = None) -> Iterator[Item]:
    """The ``images`` of a COCO JSON; ``file_name`` relative to ``image_root`` (default: beside it)."""
    data = json.loads(path.read_text())
    root = image_root or path.resolve().parent
    for image in data.get("images", []):
        source = image.get("coco_url") if not (root / image["file_name"]).exists() and image.get("coco_url") \
            else image["file_name"]
        yield Item(_as_uri(source, root), {"coco_id": image.get("id"), "file_name": image["file_name"]})


def labelstudio_items(client: LabelStudioClient, project_id: int) -> Iterator[Item]:
    """A project's tasks: ``labelstudio://<project>/<task>``, the image URL in ``meta["ls_image"]``
    (read through Label Studio, with its auth)."""
    from annotator.labeling import parse_labeling_config
    from annotator.project import task_image_url

    config = parse_labeling_config(client.project(project_id)["label_config"])
    for task in client.tasks(project_id):
        try:
            url = task_image_url(task, config)
        except ValueError:
            url = ""  # decoding reports the task as failed
        yield Item(f"{LABELSTUDIO_PREFIX}{project_id}/{task['id']}",
                   {"ls_project": project_id, "ls_task": task["id"], "ls_image": url})


def _check_host(host: str, allow_private: bool) -> None:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        raise FetchError(f"cannot resolve {host}: {err}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not allow_private and (address.is_private or address.is_loopback or address.is_link_local
                                  or address.is_reserved or address.is_multicast or address.is_unspecified):
            raise FetchError(f"refusing {host}: it resolves to the non-public address {address} "
                             "(set XDLABEL_ALLOW_PRIVATE_URLS=true to allow)")


def fetch(uri: str, *, max_bytes: int, timeout: float = 20.0, allow_private: bool = False) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme == "file" or parsed.scheme == "":
        path = Path(unquote(parsed.path))
        if not path.is_file():
            raise FetchError(f"no such file: {path}")
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError(f"file of {size} bytes is over the {max_bytes}-byte limit")
        return path.read_bytes()
    if parsed.scheme not in ("http", "https"):
        raise FetchError(f"unsupported URI scheme {parsed.scheme!r}")
    import httpx

    for _ in range(5):  # follow redirects by hand: every hop's host is checked
        _check_host(parsed.hostname or "", allow_private)
        with httpx.Client(timeout=timeout, follow_redirects=False) as client, client.stream("GET", uri) as r:
            if r.is_redirect:
                uri = urljoin(uri, r.headers["location"])
                parsed = urlparse(uri)
                continue
            if r.status_code != 200:
                raise FetchError(f"HTTP {r.status_code} for {uri}")
            chunks, total = [], 0
            for chunk in r.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise FetchError(f"download over the {max_bytes}-byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
    raise FetchError(f"too many redirects for {uri}")


def items_from(specs: list[str], *, glob: str = "**/*", image_root: Path | None = None,
               labelstudio: LabelStudioClient | None = None) -> list[Item]:
    """Items from what a user names: folders, image files, .txt/.csv lists, COCO .json, http(s) URLs,
    ``labelstudio://<project id>``."""
    items: list[Item] = []
    for given in specs:
        path = Path(given)
        if given.startswith(LABELSTUDIO_PREFIX):
            if labelstudio is None:
                raise ValueError(f"{given}: set XDLABEL_LS_URL and XDLABEL_LS_TOKEN to read Label Studio projects")
            project = given[len(LABELSTUDIO_PREFIX):].strip("/")
            if not project.isdigit():
                raise ValueError(f"{given}: expected {LABELSTUDIO_PREFIX}<project id>")
            items += labelstudio_items(labelstudio, int(project))
        elif given.startswith(("http://", "https://")):
            items.append(Item(given))
        elif path.is_dir():
            items += folder_items(path, glob)
        elif path.suffix.lower() in (".txt", ".csv") and path.is_file():
            items += list_items(path)
        elif path.suffix.lower() == ".json" and path.is_file():
            items += coco_items(path, image_root)
        elif path.is_file():
            items.append(Item(path.resolve().as_uri()))
        else:
            raise FileNotFoundError(f"{given} does not exist")
    return items

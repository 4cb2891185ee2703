"""Where images come from: folders, lists of paths or URLs, COCO files, Label Studio projects.
And reading them safely.

Each source yields ``Item``s (a URI plus metadata); ``fetch`` turns a URI into bytes with a
deadline and a size cap. URLs go through the guarded fetcher (annotator.fetcher): no private,
loopback or link-local addresses unless allowed. Local paths are checked against where images may
come from: ``roots=None`` is the command line's user (any path they name), a list of folders is a
request over HTTP (only paths under those folders); ``forbidden`` folders (xdlabel's data folder:
database, indexes) are never read. Paths are checked after resolving symlinks and ``..``, and
again on the file actually opened. Errors name a source as it was given and never quote what is
inside a file.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from annotator.fetcher import FetchError, GuardedFetcher
from xdlabel.video import VIDEO_SUFFIXES

if TYPE_CHECKING:
    from annotator.client import LabelStudioClient

__all__ = ["FetchError", "Item", "SourceRefused", "check_sources", "fetch", "items_from"]

LABELSTUDIO_PREFIX = "labelstudio://"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class SourceRefused(FetchError):
    """A source that may not be read: outside the allowed source folders, in xdlabel's data folder,
    or a list file that is not one. The message names the source as given, never its contents."""


@dataclass(frozen=True)
class Access:
    """Which local files may be read: under one of ``roots`` (None: anywhere) and in none of
    ``forbidden``; both resolved."""

    roots: tuple[Path, ...] | None = None
    forbidden: tuple[Path, ...] = ()

    @classmethod
    def of(cls, roots: Collection[Path | str] | None, forbidden: Collection[Path | str]) -> Access:
        return cls(None if roots is None else tuple(Path(r).resolve() for r in roots),
                   tuple(Path(f).resolve() for f in forbidden))

    @property
    def restricted(self) -> bool:
        return self.roots is not None

    def refusal(self, resolved: Path) -> str | None:
        """Why the resolved path may not be read, or None."""
        if any(resolved.is_relative_to(folder) for folder in self.forbidden):
            return "is in xdlabel's data folder, which is never a source"
        if self.roots is not None and not any(resolved.is_relative_to(root) for root in self.roots):
            return "is outside the folders sources may come from (XDLABEL_SOURCE_ROOTS)"
        return None

    def check(self, given: str, path: Path) -> Path:
        """The resolved path, or SourceRefused naming ``given``."""
        try:
            resolved = path.resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
            raise SourceRefused(f"{given} is not a valid path") from None
        reason = self.refusal(resolved)
        if reason:
            raise SourceRefused(f"{given} {reason}")
        return resolved


ANYWHERE = Access()


def _opened_path(fd: int) -> Path | None:
    """The path of an open file as the kernel sees it (Linux), None where that cannot be asked."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def open_checked(given: str, path: Path, access: Access) -> IO[bytes]:
    """A regular file opened for reading after the access check, checked again on the file that
    was opened (a symlink swapped in between does not get past it)."""
    resolved = access.check(given, path)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FetchError(f"no such file: {given}") from None
    except OSError as err:
        raise FetchError(f"cannot read {given}: {err.strerror}") from None
    f = os.fdopen(fd, "rb")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FetchError(f"{given} is not a regular file")
        opened = _opened_path(fd)
        if opened is not None:
            reason = access.refusal(opened)
        else:
            reason = None if os.path.samestat(os.fstat(fd), os.stat(resolved)) else "changed while it was opened"
        if reason:
            raise SourceRefused(f"{given} {reason}")
    except BaseException:
        f.close()
        raise
    return f


@dataclass(frozen=True)
class Item:
    uri: str  # file:///abs/path or http(s)://...
    meta: dict[str, Any] = field(default_factory=dict)


def _name(given: str) -> str:
    """A source as given, for messages (a very long one cut)."""
    return given if len(given) <= 200 else given[:200] + "..."


def folder_items(root: Path, pattern: str = "**/*", access: Access = ANYWHERE,
                 given: str | None = None) -> Iterator[Item]:
    """Image and video files under ``root`` matching ``pattern`` (recursive by default), in sorted order.
    A file that resolves (through a symlink) to where ``access`` forbids refuses the whole folder."""
    given = _name(given or str(root))
    if not root.is_dir():
        raise FileNotFoundError(f"{given} is not a folder")
    if not pattern or Path(pattern).is_absolute():
        raise SourceRefused(f"{given}: the glob pattern must be a relative one")
    for path in sorted(root.glob(pattern)):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            yield Item(access.check(os.path.join(given, os.path.relpath(path, root)), path).as_uri())


def _entry(value: str, base: Path, access: Access, where: str) -> str:
    """The URI of a path or URL named inside a list file (``where``: "list.txt line 3"); paths are
    relative to ``base`` and must be readable under ``access`` (and exist, when restricted)."""
    parsed = urlparse(value)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return value
    path = Path(unquote(parsed.path)) if scheme == "file" else Path(value)
    resolved = access.check(where, path if path.is_absolute() else base / path)
    if access.restricted and not resolved.is_file():
        raise SourceRefused(f"{where} names no file")
    return resolved.as_uri()


MAX_LINE = 64 * 1024


def _text_lines(f: IO[bytes], given: str) -> Iterator[str]:
    """A list file's lines as text; a line that is not UTF-8 or is too long refuses the file
    (by line number: its content is never quoted)."""
    number = 0
    while line := f.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE:
            raise SourceRefused(f"{given}: not a valid list file (line {number} is longer than {MAX_LINE} bytes)")
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise SourceRefused(f"{given}: not a valid list file (line {number} is not UTF-8 text)") from None


def list_items(path: Path, access: Access = ANYWHERE, given: str | None = None) -> Iterator[Item]:
    """A text file with one path or URL per line, or a CSV with a ``uri`` (or ``path``/``url``)
    column whose other columns become metadata. Relative paths are relative to the file."""
    given = _name(given or str(path))
    base = path.resolve().parent
    with open_checked(given, path, access) as f:
        lines = _text_lines(f, given)
        first = next(lines, "")
        if "," in first and any(key in first.lower() for key in ("uri", "path", "url")):
            yield from _csv_items(first, lines, base, access, given)
            return
        number = 0
        for line in _chain(first, lines):
            number += 1
            value = line.strip()
            if value and not value.startswith("#"):
                yield Item(_entry(value, base, access, f"{given} line {number}"))


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    if first:
        yield first
    yield from rest


def _csv_items(header: str, lines: Iterator[str], base: Path, access: Access, given: str) -> Iterator[Item]:
    reader = csv.DictReader(_chain(header, lines))
    try:
        names = reader.fieldnames or []
        column = next(c for c in ("uri", "path", "url") if c in {n.lower() for n in names})
        key = next(n for n in names if n.lower() == column)
        for row in reader:
            value = row.pop(key)
            where = f"{given} line {reader.line_num}"
            if not isinstance(value, str) or not value.strip():
                raise SourceRefused(f"{where} has no {column}")
            yield Item(_entry(value.strip(), base, access, where), {k: v for k, v in row.items() if k})
    except csv.Error:
        raise SourceRefused(f"{given}: not a valid list file (line {reader.line_num})") from None


def coco_items(path: Path, image_root: Path | None = None, access: Access = ANYWHERE,
               given: str | None = None) -> Iterator[Item]:
    """The ``images`` of a COCO JSON; ``file_name`` relative to ``image_root`` (default: beside it),
    its ``coco_url`` when that file is not there (or may not be read)."""
    given = _name(given or str(path))
    with open_checked(given, path, access) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise SourceRefused(f"{given}: not a valid COCO file (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise SourceRefused(f"{given}: not a valid COCO file (line {err.lineno})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise SourceRefused(f"{given}: not a valid COCO file (no images list)")
    root = image_root or path.resolve().parent
    for k, image in enumerate(images):
        where = f"{given} image {k}"
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            raise SourceRefused(f"{where} has no file_name")
        file_name, url = image["file_name"], image.get("coco_url")
        try:
            local = (root / file_name).resolve()
        except (OSError, ValueError, RuntimeError):
            raise SourceRefused(f"{where} names no valid path") from None
        reason = access.refusal(local)  # decided before looking: no telling what exists outside the roots
        if reason is None and local.is_file():
            uri = local.as_uri()
        elif isinstance(url, str) and url:
            uri = _entry(url, root, access, f"{where} coco_url")
        elif reason:
            raise SourceRefused(f"{where} {reason}")
        elif access.restricted:
            raise SourceRefused(f"{where} names no file")
        else:
            uri = local.as_uri()
        yield Item(uri, {"coco_id": image.get("id"), "file_name": file_name})


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


def fetch(uri: str, *, max_bytes: int, timeout: float = 20.0, allow_private: bool = False,
          roots: Collection[Path | str] | None = None, forbidden: Collection[Path | str] = ()) -> bytes:
    """The bytes of a file path or URI, or FetchError. http(s): through the guarded fetcher
    (``timeout`` is the whole request's deadline); files: checked against ``roots`` and
    ``forbidden`` (see the module's docstring) on the file that is opened."""
    parsed = urlparse(uri)
    if parsed.scheme == "file" or parsed.scheme == "":
        path = Path(unquote(parsed.path))
        given = _name(str(path))
        with open_checked(given, path, Access.of(roots, forbidden)) as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(max_bytes + 1) if size <= max_bytes else b""
        if size > max_bytes or len(data) > max_bytes:
            raise FetchError(f"file of {max(size, len(data))} bytes is over the {max_bytes}-byte limit")
        return data
    if parsed.scheme.lower() not in ("http", "https"):
        raise FetchError(f"unsupported URI scheme {parsed.scheme!r}")
    return GuardedFetcher(allow_private=allow_private).get(uri, max_bytes=max_bytes, timeout=timeout)


def _spec_items(given: str, access: Access, glob: str, image_root: Path | None,
                labelstudio: LabelStudioClient | None, expand: bool) -> list[Item]:
    """The items one source names; with ``expand`` False only what is checked without walking
    folders or asking Label Studio (list files are read: each line is checked)."""
    name = _name(given)
    if not given.strip():
        raise SourceRefused("a source is empty")
    if given.startswith(LABELSTUDIO_PREFIX):
        project = given[len(LABELSTUDIO_PREFIX):].strip("/")
        if not project.isdigit():
            raise SourceRefused(f"{name}: expected {LABELSTUDIO_PREFIX}<project id>")
        if not expand:
            return []
        if labelstudio is None:
            raise ValueError(f"{name}: set XDLABEL_LS_URL and XDLABEL_LS_TOKEN to read Label Studio projects")
        return list(labelstudio_items(labelstudio, int(project)))
    if given.lower().startswith(("http://", "https://")):
        return [Item(given)]
    parsed = urlparse(given)
    path = Path(unquote(parsed.path)) if parsed.scheme.lower() == "file" else Path(given)
    resolved = access.check(name, path)  # before looking: no telling what exists outside the roots
    suffix = path.suffix.lower()
    if resolved.is_dir():
        return list(folder_items(path, glob, access, name)) if expand else []
    if suffix in (".txt", ".csv") and resolved.is_file():
        return list(list_items(path, access, name))
    if suffix == ".json" and resolved.is_file():
        return list(coco_items(path, image_root, access, name))
    if resolved.is_file():
        return [Item(resolved.as_uri())]
    raise FileNotFoundError(f"{name} does not exist")


def items_from(specs: Sequence[str], *, glob: str = "**/*", image_root: Path | None = None,
               labelstudio: LabelStudioClient | None = None, roots: Collection[Path | str] | None = None,
               forbidden: Collection[Path | str] = ()) -> list[Item]:
    """Items from what a user names: folders, image files, .txt/.csv lists, COCO .json, http(s) URLs,
    ``labelstudio://<project id>``. ``roots=None``: the command line's user, who may name any path
    (but none in ``forbidden``); a list: a request over HTTP, only paths under those folders (list
    files and what they name too); URLs are checked when they are fetched."""
    access = Access.of(roots, forbidden)
    items: list[Item] = []
    for given in specs:
        items += _spec_items(given, access, glob, image_root, labelstudio, expand=True)
    return items


def check_sources(specs: Sequence[str], roots: Collection[Path | str] | None,
                  forbidden: Collection[Path | str], *, image_root: Path | None = None) -> None:
    """Raises SourceRefused naming the first source that may not be read (or does not exist),
    before a job is queued: paths outside ``roots`` or in ``forbidden``, list files that are not
    valid or name such paths. Folders are walked (and their symlinks checked) when the job runs."""
    access = Access.of(roots, forbidden)
    for given in specs:
        try:
            _spec_items(given, access, "**/*", image_root, None, expand=False)
        except FileNotFoundError:
            raise SourceRefused(f"{_name(given)} does not exist") from None

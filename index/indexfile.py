"""One saved index: a file holding the FAISS index, then a trailer with its manifest and id arrays.

* The FAISS index starts at byte 0, so FAISS can map the file and search its inverted lists in
  place (``IO_FLAG_MMAP_IFC``): opening a multi-GB index costs milliseconds instead of a read of
  every byte, and server processes opening the same file share its pages. FAISS releases without
  the flag (1.9, the declared floor) read the file whole. Mapped lists are read-only;
  ``index.vectors`` copies them into memory before the first add or remove.
* The trailer holds the manifest (JSON), the id -> image id arrays and a compressed index's segment
  ids and rotation; the file's last 16 bytes give the trailer's offset and an end mark, so it is
  found without reading the index. Files of the earlier layouts (manifest first, then the index) still load, read whole.
* A file is written under a unique temporary name in its folder and renamed over the old one, so
  concurrent savers never mix one's manifest with another's vectors (the last rename wins), a failed
  save leaves nothing, and a process still mapping the old file goes on reading the old file. That
  holds on a local disk; a file rewritten in place (``cp`` over it, not ``mv``), or renamed over by
  another host on NFS, would fault a process mapping it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

LEGACY = b"XDLIDX1\n"  # manifest + index
LEGACY_OWNERS = b"XDLIDX2\n"  # manifest + id -> image id arrays + index
TRAILER = b"XDLIDX3\n"  # after the index: manifest + id arrays, then offset + END
END = b"XDLEND3\n"
MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What a saved index holds: its kind, size, and the change-log position it covers."""

    dim: int
    kind: str  # flat | ivf | hnsw | ivfpq
    count: int
    position: int = 0  # the last embedding_changes.seq applied
    trained: int = 0  # IVF: the number of vectors it was trained for
    curve: list[tuple[int, float]] | None = None  # IVF: (nprobe, calibrated recall@10), rising
    owners: bool = False  # the file holds the id -> image id map too
    segments: list[tuple[str, int]] | None = None  # ivfpq: full-vector files beside it, (name, rows)
    rerank: int = 0  # ivfpq: calibrated candidates per wanted hit
    rotated: bool = False  # ivfpq: the trailer holds the rotation its codes were made in


@dataclass(frozen=True)
class Saved:
    index: faiss.Index
    manifest: Manifest
    owners: tuple[np.ndarray, np.ndarray] | None  # ids, image ids
    segments: list[tuple[str, np.ndarray]]  # ivfpq: segment file name, the ids of its rows
    mapped: bool  # the inverted lists are views of the file
    rotation: np.ndarray | None = None  # ivfpq: [dim, dim] float32, codes are of x @ rotation.T


def write(path: Path, index: faiss.Index, manifest: Manifest, owners: tuple[np.ndarray, np.ndarray] | None = None,
          segments: list[tuple[str, np.ndarray]] | None = None, rotation: np.ndarray | None = None) -> None:
    """Write ``path`` through a temporary file renamed over it. ``index`` must not change meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "ab") as f:
            start = f.tell()
            header = json.dumps(asdict(manifest)).encode()
            f.write(TRAILER + len(header).to_bytes(8, "little") + header)
            for array in [*(owners or ()), *(ids for _, ids in segments or [])]:
                f.write(np.ascontiguousarray(array, dtype="<i8").tobytes())
            if manifest.rotated:
                if rotation is None or rotation.shape != (manifest.dim, manifest.dim):
                    raise ValueError(f"a rotated index needs its [{manifest.dim}, {manifest.dim}] rotation")
                f.write(np.ascontiguousarray(rotation, dtype="<f4").tobytes())
            f.write(start.to_bytes(8, "little") + END)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def read(path: Path, map_lists: bool = True) -> Saved:
    """The saved index; an IVF index's lists mapped when ``map_lists`` and FAISS can. Raises
    (FileNotFoundError, RuntimeError, ValueError) on a missing or corrupt file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(len(LEGACY))
        if magic in (LEGACY, LEGACY_OWNERS):
            manifest, owners, segments, _ = _fields(f, path, magic == LEGACY_OWNERS, size)
            return Saved(faiss.read_index(faiss.PyCallbackIOReader(f.read)), manifest, owners, segments, False)
        if size < 16 + len(TRAILER):
            raise ValueError(f"{path}: not an xdlabel index file")
        f.seek(size - 16)
        tail = f.read(16)
        start = int.from_bytes(tail[:8], "little")
        if tail[8:] != END or not 0 < start <= size - 16 - len(TRAILER):
            raise ValueError(f"{path}: not an xdlabel index file (no trailer: truncated or foreign)")
        f.seek(start)
        if f.read(len(TRAILER)) != TRAILER:
            raise ValueError(f"{path}: corrupt trailer")
        manifest, owners, segments, rotation = _fields(f, path, None, size - 16)
        if f.tell() != size - 16:
            raise ValueError(f"{path}: corrupt trailer ({size - 16 - f.tell()} unexplained bytes)")
        # FAISS opens the file by name; through /proc it is this open file even if a saver has
        # since renamed another over ``path``, so the index always matches the manifest just read
        same_file = f"/proc/self/fd/{f.fileno()}"
        if os.path.exists(same_file):
            mapped = map_lists and manifest.kind != "flat" and hasattr(faiss, "IO_FLAG_MMAP_IFC")
            index = faiss.read_index(same_file, faiss.IO_FLAG_MMAP_IFC if mapped else 0)
        else:  # no /proc: read whole through this file object
            mapped = False
            f.seek(0)
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read, 16 << 20))
    return Saved(index, manifest, owners, segments, mapped, rotation)


def _fields(f: BinaryIO, path: Path, with_owners: bool | None, end: int
            ) -> tuple[Manifest, tuple[np.ndarray, np.ndarray] | None, list[tuple[str, np.ndarray]], np.ndarray | None]:
    """Manifest, id arrays, segment ids and rotation, from just after a magic; none of them may
    reach past ``end``. ``with_owners`` None: as the manifest says."""
    size = int.from_bytes(f.read(8), "little")
    if size > MAX_HEADER:
        raise ValueError(f"{path}: corrupt header")
    try:
        fields = json.loads(f.read(size))
        fields["curve"] = [tuple(point) for point in fields.get("curve") or []] or None
        fields["segments"] = [(str(n), int(c)) for n, c in fields.get("segments") or []] or None
        manifest = Manifest(**fields)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: corrupt manifest ({err})") from err
    owners = None
    if manifest.owners if with_owners is None else with_owners:
        owners = (_read_ids(f, manifest.count, path, end), _read_ids(f, manifest.count, path, end))
    segments = [(name, _read_ids(f, rows, path, end)) for name, rows in manifest.segments or []]
    rotation = None
    if manifest.rotated:
        if not isinstance(manifest.dim, int) or manifest.dim <= 0 or f.tell() + 4 * manifest.dim ** 2 > end:
            raise ValueError(f"{path}: corrupt or truncated rotation")
        rotation = np.frombuffer(f.read(4 * manifest.dim ** 2), dtype="<f4").astype(np.float32)
        rotation = rotation.reshape(manifest.dim, manifest.dim)
    return manifest, owners, segments, rotation


def _read_ids(f: BinaryIO, count: object, path: Path, end: int) -> np.ndarray:
    # bounded before reading: a corrupt count must not allocate what the file does not hold
    if not isinstance(count, int) or count < 0 or f.tell() + 8 * count > end:
        raise ValueError(f"{path}: corrupt or truncated id map ({count!r} ids)")
    return np.frombuffer(f.read(8 * count), dtype="<i8").astype(np.int64)


def remove_stale_temps(path: Path) -> int:
    """Delete temporary files that writers on this host left for ``path`` when they died."""
    removed = 0
    prefix = _temp_prefix(path)
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with suppress(FileNotFoundError):
                tmp.unlink()
                removed += 1
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

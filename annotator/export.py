"""A project's labels out of Label Studio: COCO with RLE masks, PNG masks, Label Studio JSON.

Input is always Label Studio JSON: a list of tasks, each with ``data``, ``annotations`` and
``predictions`` (what the server exports, or what xdlabel stored from webhooks). Category ids
follow the labeling config (its order, labels compared case-insensitively, ``isthing: 0`` for
``stuff="true"``), not Label Studio's own COCO export, which drops brush masks and mixes up
categories when a label appears in several tags. Without a config, labels in order of first
appearance (tasks by id). COCO counts objects, not controls: within one annotation, a region of
the same label in another control that covers the same object (the same region id, or IoU >=
0.5; a box against the object's bounding box) is not counted again, the finest kept (brush, then
polygon, then box). ``file_name`` is the image's file name (the path inside Label Studio's local
files storage, else the URL's last part; made unique by the task id when two collide), the URL
is kept in ``coco_url``; tasks without an annotation (or prediction, for that source) are left out
unless asked for.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from annotator.convert import mask_to_coco_rle, result_label, result_to_mask
from annotator.labeling import LabelingConfig
from annotator.vocabulary import fold
from index.models import Annotation

Task = dict[str, Any]
SOURCES = ("annotations", "predictions")


SAME_OBJECT_IOU = 0.5
_KIND_ORDER = {"brushlabels": 0, "polygonlabels": 1, "rectanglelabels": 2}


def tasks_from_store(session: Session, project_id: int) -> list[Task]:
    """Label Studio JSON of the human annotations xdlabel received by webhook (deleted ones left out)."""
    tasks: dict[int, Task] = {}
    rows = session.scalars(select(Annotation).where(Annotation.ls_project_id == project_id,
                                                    Annotation.deleted_at.is_(None)).order_by(Annotation.id))
    for row in rows:
        task_id = int(row.ls_task_id or 0)
        task = tasks.setdefault(task_id, {"id": task_id, "data": row.task_data, "annotations": [],
                                          "predictions": []})
        task["annotations"].append(row.payload)
    return sorted(tasks.values(), key=lambda t: int(t["id"]))


def _labels(tasks: Iterable[Task], config: LabelingConfig | None, source: str) -> list[str]:
    if config is not None:
        return config.labels
    found = (result_label(r) for t in sorted(tasks, key=lambda t: int(t["id"])) for a in t.get(source, [])
             if _usable(a, source) for r in a.get("result", []))
    seen: dict[str, str] = {}
    for label in found:
        if label:
            seen.setdefault(fold(label), label)
    return list(seen.values())


def _category_ids(labels: list[str]) -> dict[str, int]:
    """Folded label -> category id."""
    return {fold(label): i + 1 for i, label in enumerate(labels)}


def file_name(url: str) -> str:
    """``/data/local-files/?d=photos/a.png`` -> ``photos/a.png``; any other URL -> its last part."""
    parsed = urlparse(url)
    inside = parse_qs(parsed.query).get("d")
    if parsed.path.rstrip("/").endswith("/data/local-files") and inside:
        return inside[0].lstrip("/")
    return PurePosixPath(unquote(parsed.path)).name or url


def _usable(record: dict[str, Any], source: str) -> bool:
    return source == "predictions" or not record.get("was_cancelled", False)


def regions(task: Task, source: str = "annotations") -> Iterable[tuple[dict[str, Any], dict[str, Any], np.ndarray]]:
    """(annotation or prediction, result, mask) for every mask-like result of a task."""
    for record in task.get(source, []):
        if not _usable(record, source):
            continue
        for result in record.get("result", []):
            mask = result_to_mask(result)
            if mask is not None and result_label(result) is not None:
                yield record, result, mask


def _box_mask(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = np.zeros_like(mask)
    if rows.size:
        box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    return box


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def objects(task: Task, source: str = "annotations"
            ) -> Iterable[tuple[dict[str, Any], dict[str, Any], np.ndarray]]:
    """``regions`` with each object once per annotation (see the module docstring)."""
    by_record: dict[int, list[tuple[dict[str, Any], dict[str, Any], np.ndarray]]] = {}
    for item in regions(task, source):
        by_record.setdefault(id(item[0]), []).append(item)
    for items in by_record.values():
        kept: list[int] = []
        order = sorted(range(len(items)), key=lambda k: (_KIND_ORDER.get(items[k][1].get("type", ""), 3), k))
        for k in order:
            _, result, mask = items[k]
            if not mask.any():
                continue
            label = fold(result_label(result) or "")
            same = False
            for j in kept:
                _, other, other_mask = items[j]
                if fold(result_label(other) or "") != label or other.get("from_name") == result.get("from_name"):
                    continue
                if result.get("id") is not None and result.get("id") == other.get("id"):
                    same = True
                elif result.get("type") == "rectanglelabels":
                    same = _iou(mask, _box_mask(other_mask)) >= SAME_OBJECT_IOU
                else:
                    same = _iou(mask, other_mask) >= SAME_OBJECT_IOU
                if same:
                    break
            if not same:
                kept.append(k)
        yield from (items[k] for k in sorted(kept))  # in the annotation's own order


def _has(task: Task, source: str) -> bool:
    return any(_usable(r, source) and r.get("result") for r in task.get(source, []))


def to_coco(tasks: Sequence[Task], config: LabelingConfig | None = None, source: str = "annotations",
            all_tasks: bool = False) -> dict[str, Any]:
    """COCO instances with RLE masks (one per object), plus ``captions`` from TextArea results.
    Each annotation keeps ``ls_task_id`` / ``ls_id`` (the annotation's or prediction's id), and
    predictions their ``score``. ``all_tasks``: list tasks without labels too (size unknown: null)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    labels = _labels(tasks, config, source)
    category = _category_ids(labels)
    stuff = config.stuff_labels if config else frozenset()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    names: Counter[str] = Counter()
    chosen = [t for t in sorted(tasks, key=lambda t: int(t["id"])) if all_tasks or _has(t, source)]
    urls = {}
    for task in chosen:
        data = task.get("data") or {}
        url = data.get(config.image_key, "") if config else next(iter(data.values()), "")
        urls[task["id"]] = str(url)
        names[file_name(str(url))] += 1
    for task in chosen:
        size = next(((r["original_height"], r["original_width"]) for a in task.get(source, [])
                     if _usable(a, source) for r in a.get("result", []) if "original_height" in r), None)
        url = urls[task["id"]]
        name = file_name(url)
        images.append({"id": task["id"], "file_name": name if names[name] == 1 else f"{task['id']}-{name}",
                       "coco_url": url, "height": size[0] if size else None, "width": size[1] if size else None})
        for record, result, mask in objects(task, source):
            category_id = category.get(fold(result_label(result) or ""))
            if category_id is None:
                continue
            rows, cols = np.nonzero(mask)
            x0, y0 = int(cols.min()), int(rows.min())
            entry = {"id": len(annotations) + 1, "image_id": task["id"], "category_id": category_id,
                     "segmentation": mask_to_coco_rle(mask), "area": int(rows.size),
                     "bbox": [x0, y0, int(cols.max()) + 1 - x0, int(rows.max()) + 1 - y0], "iscrowd": 0,
                     "ls_task_id": task["id"], "ls_id": record.get("id")}
            if "score" in result:
                entry["score"] = result["score"]
            annotations.append(entry)
        for record in task.get(source, []):
            if not _usable(record, source):
                continue
            for result in record.get("result", []):
                if result.get("type") == "textarea":
                    for text in result.get("value", {}).get("text", []):
                        captions.append({"id": len(captions) + 1, "image_id": task["id"], "caption": text})
    return {"info": {"description": "exported by xdlabel from Label Studio", "source": source},
            "images": images, "annotations": annotations, "captions": captions,
            "categories": [{"id": category[fold(label)], "name": label, "supercategory": "",
                            "isthing": 0 if fold(label) in stuff else 1} for label in labels]}


def to_pngs(tasks: Sequence[Task], out_dir: Path, config: LabelingConfig | None = None,
            source: str = "annotations") -> list[Path]:
    """Per annotation, a label map ``task-<t>-<source>-<id>.png`` (pixel = category id, 0 = none;
    later regions win where they overlap) and ``categories.json`` mapping ids to labels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _labels(tasks, config, source)
    category = _category_ids(labels)
    if len(category) > 65535:
        raise ValueError("more than 65535 categories do not fit a 16-bit PNG")
    written = []
    for task in tasks:
        maps: dict[Any, np.ndarray] = {}
        for record, result, mask in regions(task, source):
            category_id = category.get(fold(result_label(result) or ""))
            if category_id is None:
                continue
            label_map = maps.setdefault(record.get("id"), np.zeros(mask.shape, dtype=np.uint16))
            label_map[mask] = category_id
        for record_id, label_map in maps.items():
            path = out_dir / f"task-{task['id']}-{source[:-1]}-{record_id}.png"
            dtype = np.uint8 if len(category) < 256 else np.uint16
            Image.fromarray(label_map.astype(dtype)).save(path)
            written.append(path)
    (out_dir / "categories.json").write_text(json.dumps({str(category[fold(label)]): label for label in labels},
                                                        indent=1))
    return written

"""A project's labels out of Label Studio: COCO with RLE masks, PNG masks, Label Studio JSON.

Input is always Label Studio JSON: a list of tasks, each with ``data``, ``annotations`` and
``predictions`` (what the server exports, or what xdlabel stored from webhooks). Category ids
follow the labeling config, not Label Studio's own COCO export, which drops brush masks and mixes
up categories when a label appears in several tags.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from annotator.convert import mask_to_coco_rle, result_label, result_to_mask
from annotator.labeling import LabelingConfig
from index.models import Annotation

Task = dict[str, Any]
SOURCES = ("annotations", "predictions")


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
    return list(tasks.values())


def _labels(tasks: Iterable[Task], config: LabelingConfig | None, source: str) -> list[str]:
    if config is not None:
        return config.labels
    found = (result_label(r) for t in tasks for a in t.get(source, []) for r in a.get("result", []))
    return sorted({label for label in found if label})


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


def to_coco(tasks: Sequence[Task], config: LabelingConfig | None = None, source: str = "annotations"
            ) -> dict[str, Any]:
    """COCO instances with RLE masks (one per region), plus ``captions`` from TextArea results.
    Each annotation keeps ``ls_task_id`` / ``ls_id`` (the annotation's or prediction's id), and
    predictions their ``score``."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}")
    labels = _labels(tasks, config, source)
    category = {label: i + 1 for i, label in enumerate(labels)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    for task in tasks:
        size = next(((r["original_height"], r["original_width"]) for a in task.get(source, [])
                     for r in a.get("result", []) if "original_height" in r), None)
        data = task.get("data") or {}
        image_url = data.get(config.image_key, "") if config else next(iter(data.values()), "")
        images.append({"id": task["id"], "file_name": image_url, "height": size[0] if size else None,
                       "width": size[1] if size else None})
        for record, result, mask in regions(task, source):
            label = result_label(result)
            if label not in category:
                continue
            rows, cols = np.nonzero(mask)
            if rows.size == 0:
                continue
            x0, y0 = int(cols.min()), int(rows.min())
            entry = {"id": len(annotations) + 1, "image_id": task["id"], "category_id": category[label],
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
            "categories": [{"id": i, "name": label, "supercategory": ""} for label, i in category.items()]}


def to_pngs(tasks: Sequence[Task], out_dir: Path, config: LabelingConfig | None = None,
            source: str = "annotations") -> list[Path]:
    """Per annotation, a label map ``task-<t>-<source>-<id>.png`` (pixel = category id, 0 = none;
    later regions win where they overlap) and ``categories.json`` mapping ids to labels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _labels(tasks, config, source)
    category = {label: i + 1 for i, label in enumerate(labels)}
    if len(category) > 65535:
        raise ValueError("more than 65535 categories do not fit a 16-bit PNG")
    written = []
    for task in tasks:
        maps: dict[Any, np.ndarray] = {}
        for record, result, mask in regions(task, source):
            label = result_label(result)
            if label not in category:
                continue
            label_map = maps.setdefault(record.get("id"), np.zeros(mask.shape, dtype=np.uint16))
            label_map[mask] = category[label]
        for record_id, label_map in maps.items():
            path = out_dir / f"task-{task['id']}-{source[:-1]}-{record_id}.png"
            dtype = np.uint8 if len(category) < 256 else np.uint16
            Image.fromarray(label_map.astype(dtype)).save(path)
            written.append(path)
    (out_dir / "categories.json").write_text(json.dumps({str(i): label for label, i in category.items()}, indent=1))
    return written

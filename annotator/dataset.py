"""Labelled data as training scenes for ``xdecoder.training``: Label Studio annotations and COCO files.

Each annotated task becomes one scene: its image resized to the training size, a segment per
brush / polygon / rectangle region (later regions win where they overlap), the label as the
class and as a referring phrase ("the <label>") when the label occurs once in the image, and the
TextArea text as the caption (else the labels listed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from annotator.convert import result_label, result_to_mask
from annotator.labeling import LabelingConfig
from xdecoder.training.synthetic import Scene, Segment
from xdecoder.transforms import read_image as decode_image

Task = dict


@dataclass
class LabelledData:
    scenes: list[Scene]
    class_names: list[str]
    stuff: list[str]
    skipped: dict[int, str]  # task id -> why it was left out
    digest: str  # sha256 of the annotations used: recorded with the checkpoint


def _latest_annotation(task: Task) -> dict | None:
    usable = [a for a in task.get("annotations", []) if not a.get("was_cancelled") and a.get("result")]
    return max(usable, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0), default=None)


def _resize(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return np.array(Image.fromarray(image).resize(size, resample))  # writable: torch takes it as is


def _read_or_skip(read: Callable[[Any], np.ndarray], item: Any, key: int, skipped: dict[int, str]
                  ) -> np.ndarray | None:
    try:
        return read(item)
    except Exception as err:  # noqa: BLE001 - one unreadable image is skipped, the rest train
        skipped[key] = f"image not readable: {err}"
        return None


def scenes_from_tasks(tasks: Sequence[Task], read_image: Callable[[Task], np.ndarray],
                      config: LabelingConfig | None = None, size: tuple[int, int] = (160, 128),
                      min_area: int = 4) -> LabelledData:
    """``read_image(task)`` gives the task's RGB image; ``size`` is the training (width, height).
    Class names are the config's labels (in order), else the labels found."""
    if config is not None:
        class_names = config.labels
        stuff = sorted({config.prompts[p] for p in config.stuff})
    else:
        found = {result_label(r) for t in tasks for a in t.get("annotations", []) for r in a.get("result", [])}
        class_names, stuff = sorted(label for label in found if label), []
    scenes: list[Scene] = []
    skipped: dict[int, str] = {}
    used = []
    for task in tasks:
        annotation = _latest_annotation(task)
        if annotation is None:
            skipped[task["id"]] = "no annotation"
            continue
        image = _read_or_skip(read_image, task, task["id"], skipped)
        if image is None:
            continue
        regions: list[tuple[np.ndarray, str, str | None]] = []
        for result in annotation["result"]:
            mask, label = result_to_mask(result), result_label(result)
            if mask is None or label not in class_names:
                continue
            if mask.shape != image.shape[:2]:
                skipped[task["id"]] = (f"a {mask.shape[1]}x{mask.shape[0]} mask on a "
                                       f"{image.shape[1]}x{image.shape[0]} image")
                break
            regions.append((mask, label, None))
        else:
            texts = [t for r in annotation["result"] if r.get("type") == "textarea"
                     for t in r.get("value", {}).get("text", [])]
            scene = _scene(image, regions, class_names, stuff, texts[0] if texts else None, size, min_area)
            if scene is None:
                skipped[task["id"]] = "no region of a known label"
                continue
            scenes.append(scene)
            used.append({"task": task["id"], "annotation": annotation.get("id"), "result": annotation["result"]})
    digest = hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()
    return LabelledData(scenes, class_names, stuff, skipped, digest)


def _scene(image: np.ndarray, regions: list[tuple[np.ndarray, str, str | None]], class_names: list[str],
           stuff: Sequence[str], caption: str | None, size: tuple[int, int], min_area: int) -> Scene | None:
    """(mask, label, phrase or None) regions in paint order -> a scene at the training size."""
    segment_map = np.zeros((size[1], size[0]), dtype=np.int32)
    labels: dict[int, tuple[str, str | None]] = {}
    for mask, label, phrase in regions:
        small = _resize(mask.astype(np.uint8), size, nearest=True).astype(bool)
        segment_map[small] = len(labels) + 1
        labels[len(labels) + 1] = (label, phrase)
    segments = []
    for segment_id, (label, _) in labels.items():
        area = int((segment_map == segment_id).sum())
        if area >= min_area:
            rows, cols = np.nonzero(segment_map == segment_id)
            segments.append(Segment(segment_id, class_names.index(label), label not in stuff,
                                    box=(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1),
                                    area=area))
    if not segments:
        return None
    counts = {label: sum(labels[s.id][0] == label for s in segments) for label, _ in labels.values()}
    phrases = {s.id: labels[s.id][1] or f"the {labels[s.id][0]}" for s in segments
               if labels[s.id][1] or counts[labels[s.id][0]] == 1}
    caption = caption or " and ".join(dict.fromkeys(labels[s.id][0] for s in segments))
    return Scene(_resize(image, size), segment_map, segments, phrases, caption)


def scenes_from_coco(instances: Path, size: tuple[int, int] = (160, 128), image_root: Path | None = None,
                     captions: Path | None = None, min_area: int = 4,
                     read_image: Callable[[dict[str, Any]], np.ndarray] | None = None) -> LabelledData:
    """A COCO instances file (masks as polygons or RLE, via pycocotools; categories with
    ``isthing: 0`` are stuff) with captions from a COCO captions file or the file's own
    ``captions`` list (as ``xdlabel export`` writes it), and referring phrases from annotations'
    ``sentences`` (RefCOCO style) or ``phrase``. Images are read from ``image_root`` (default: beside
    the file) unless ``read_image`` is given."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(instances))
    categories = coco.loadCats(coco.getCatIds())
    class_names = [c["name"] for c in categories]
    name_of = {c["id"]: c["name"] for c in categories}
    stuff = [c["name"] for c in categories if c.get("isthing", 1) == 0]
    texts: dict[Any, list[str]] = {}
    caption_entries = coco.dataset.get("captions", [])
    if captions is not None:
        caption_entries = json.loads(Path(captions).read_text())["annotations"]
    for entry in caption_entries:
        texts.setdefault(entry["image_id"], []).append(entry["caption"])
    root = image_root or Path(instances).parent

    def default_read(entry: dict[str, Any]) -> np.ndarray:
        return decode_image((root / entry["file_name"]).read_bytes())[0]

    read = read_image or default_read
    scenes: list[Scene] = []
    skipped: dict[int, str] = {}
    for entry in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[entry["id"]], iscrowd=False))
        if not anns:
            skipped[entry["id"]] = "no annotation"
            continue
        image = _read_or_skip(read, entry, entry["id"], skipped)
        if image is None:
            continue
        if image.shape[:2] != (entry.get("height"), entry.get("width")):
            skipped[entry["id"]] = f"image is {image.shape[1]}x{image.shape[0]}, the file says " \
                                   f"{entry.get('width')}x{entry.get('height')}"
            continue
        regions = []
        for ann in sorted(anns, key=lambda a: -a.get("area", 0)):  # small ones painted last stay visible
            sentences = ann.get("sentences") or []
            phrase = sentences[0]["sent"] if sentences else ann.get("phrase")
            regions.append((coco.annToMask(ann).astype(bool), name_of[ann["category_id"]], phrase))
        caption = texts[entry["id"]][0] if texts.get(entry["id"]) else None
        scene = _scene(image, regions, class_names, stuff, caption, size, min_area)
        if scene is None:
            skipped[entry["id"]] = "no region left at the training size"
        else:
            scenes.append(scene)
    digest = hashlib.sha256(Path(instances).read_bytes() + (Path(captions).read_bytes() if captions else b""))
    return LabelledData(scenes, class_names, stuff, skipped, digest.hexdigest())

"""Label Studio annotations as training scenes for ``xdecoder.training``.

Each annotated task becomes one scene: its image resized to the training size, a segment per
brush / polygon / rectangle region (later regions win where they overlap), the label as the
class and as a referring phrase ("the <label>") when the label occurs once in the image, and the
TextArea text as the caption (else the labels listed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from annotator.convert import result_label, result_to_mask
from annotator.labeling import LabelingConfig
from xdecoder.training.synthetic import Scene, Segment

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


def scenes_from_tasks(tasks: Sequence[Task], read_image: Callable[[Task], np.ndarray],
                      config: LabelingConfig | None = None, size: tuple[int, int] = (160, 128),
                      min_area: int = 4) -> LabelledData:
    """``read_image(task)`` gives the task's RGB image; ``size`` is the training (width, height).
    Class names are the config's labels (in order), else the labels found."""
    if config is not None:
        class_names = list(dict.fromkeys(label for t in config.targets for label in t.labels))
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
        try:
            image = read_image(task)
        except Exception as err:  # noqa: BLE001 - one unreadable image is skipped, the rest train
            skipped[task["id"]] = f"image not readable: {err}"
            continue
        segment_map = np.zeros((size[1], size[0]), dtype=np.int32)
        labels: dict[int, str] = {}
        for result in annotation["result"]:
            mask, label = result_to_mask(result), result_label(result)
            if mask is None or label not in class_names:
                continue
            if mask.shape != image.shape[:2]:
                skipped[task["id"]] = (f"a {mask.shape[1]}x{mask.shape[0]} mask on a "
                                       f"{image.shape[1]}x{image.shape[0]} image")
                break
            small = _resize(mask.astype(np.uint8), size, nearest=True).astype(bool)
            segment_id = len(labels) + 1
            segment_map[small] = segment_id
            labels[segment_id] = label
        else:
            segments = []
            for segment_id, label in labels.items():
                area = int((segment_map == segment_id).sum())
                if area >= min_area:
                    rows, cols = np.nonzero(segment_map == segment_id)
                    segments.append(Segment(segment_id, class_names.index(label), label not in stuff,
                                            box=(int(cols.min()), int(rows.min()), int(cols.max()) + 1,
                                                 int(rows.max()) + 1), area=area))
            if not segments:
                skipped[task["id"]] = "no region of a known label"
                continue
            counts = {label: sum(labels[s.id] == label for s in segments) for label in labels.values()}
            phrases = {s.id: f"the {labels[s.id]}" for s in segments if counts[labels[s.id]] == 1}
            texts = [t for r in annotation["result"] if r.get("type") == "textarea"
                     for t in r.get("value", {}).get("text", [])]
            caption = texts[0] if texts else " and ".join(dict.fromkeys(labels[s.id] for s in segments))
            scenes.append(Scene(_resize(image, size), segment_map, segments, phrases, caption))
            used.append({"task": task["id"], "annotation": annotation.get("id"), "result": annotation["result"]})
    digest = hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()
    return LabelledData(scenes, class_names, stuff, skipped, digest)

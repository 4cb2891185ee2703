"""Interactive prompts in the editor (a typed phrase, a click, a box): the image is encoded once
and its features kept, keyed by the file's content hash, so every later prompt on that image only
runs the decoder's cheap heads. The cache drops the least recently used images first and holds at
most ``XDLABEL_ML_FEATURE_CACHE_MB`` of tensors.

Clicks and boxes of one interaction session (Label Studio sends them all in ``context.result``)
make one region: each positive click adds the best candidate mask under it, a box adds the
candidate overlapping it most (cut to the box), and each negative click subtracts the best
candidate under it that holds no positive click; what is then still nearer to a negative click
than to every positive one is cut as well. Typed phrases go to ``annotator.prelabel.interactive``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from annotator.client import LabelStudioClient
from annotator.convert import Result
from annotator.labeling import LabelingConfig, Target
from annotator.prelabel import LabelledRegion, PrelabelSettings, interactive, region_results, regions
from annotator.project import task_image_url
from annotator.vocabulary import match_phrase, model_text_encoder
from xdecoder.predictor import Predictor
from xdecoder.transforms import read_image
from xdlabel.services import Services

if TYPE_CHECKING:
    from xdecoder.predictor import EncodedImage, Features
    from xdlabel.api.ml_setup import Connections

log = logging.getLogger(__name__)


def features_bytes(image: EncodedImage) -> int:
    tensors: list[Tensor] = [image.mask_features, image.res5, image.embeddings, image.mask_logits,
                             *image.multi_scale, *image.latents]
    return sum(t.element_size() * t.nelement() for t in tensors)


class FeatureCache:
    """Encoded images by content hash, least recently used dropped first, at most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Features, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def size(self) -> int:
        with self._lock:
            return sum(n for _, n in self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: str) -> Features | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, features: Features) -> None:
        size = sum(features_bytes(image) for image in features)
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = (features, size)
            total = sum(n for _, n in self._items.values())
            while total > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                total -= dropped


def encoded(services: Services, cache: FeatureCache, client: LabelStudioClient, task: dict[str, Any],
            config: LabelingConfig, predictor: Predictor, version: str) -> Features:
    """The task's image, encoded (from the cache when its bytes were seen by this model version)."""
    s = services.settings
    data = client.read_file(task_image_url(task, config), s.max_image_bytes)
    key = f"{version}:{hashlib.sha256(data).hexdigest()}"
    features = cache.get(key)
    if features is None:
        image = read_image(data, s.max_image_pixels)[0]
        with services.model_lock:
            features = predictor.encode([image])
        cache.put(key, features)
    return features


SPATIAL = ("keypointlabels", "rectanglelabels")


def interactive_answer(services: Services, connections: Connections, client: LabelStudioClient,
                       config: LabelingConfig, tasks: list[dict[str, Any]], context: dict[str, Any],
                       version: str, mapping: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The answer to the editor's prompts on the first task (an empty result if its image cannot
    be read: the editor shows nothing rather than an error)."""
    empty: dict[str, Any] = {"result": [], "score": 0.0, "model_version": version}
    if not tasks:
        return empty
    try:
        cache = connections.features(services.settings.ml_feature_cache_mb << 20)
        predictor = connections.predictor(services)
        features = encoded(services, cache, client, tasks[0], config, predictor, version)
    except Exception as err:  # noqa: BLE001 - reported; the editor gets no suggestion
        log.warning("task %s: %s", tasks[0].get("id"), err)
        return empty
    settings = PrelabelSettings(polygon_tolerance=services.settings.ls_polygon_tolerance)
    prompts = [p for p in context.get("result", []) if isinstance(p, dict)]
    spatial = [p for p in prompts if p.get("type") in SPATIAL]
    others = [p for p in prompts if p.get("type") not in SPATIAL]
    with services.model_lock:
        answer = interactive(predictor, features, config, {"result": others}, version, settings, mapping=mapping) \
            if others else dict(empty)
        if spatial:
            answer["result"] = [*answer["result"], *session_region(predictor, features, config, spatial,
                                                                   settings, mapping)]
    answer["result"] = [dict(r, id=f"xd{i}") for i, r in enumerate(answer["result"])]
    answer["score"] = max((r.get("score", 0.0) for r in answer["result"]), default=0.0)
    return answer


def _point(value: Mapping[str, Any], height: int, width: int) -> tuple[int, int]:
    return (min(max(int(float(value["y"]) * height / 100.0), 0), height - 1),
            min(max(int(float(value["x"]) * width / 100.0), 0), width - 1))


def _box(value: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    box = np.zeros((height, width), dtype=bool)
    x0, y0 = int(float(value["x"]) * width / 100.0), int(float(value["y"]) * height / 100.0)
    x1 = int(np.ceil((float(value["x"]) + float(value["width"])) * width / 100.0))
    y1 = int(np.ceil((float(value["y"]) + float(value["height"])) * height / 100.0))
    box[max(y0, 0):y1, max(x0, 0):x1] = True
    return box


def combine(candidates: Sequence[LabelledRegion], prompts: Sequence[Mapping[str, Any]], height: int, width: int
            ) -> tuple[np.ndarray, list[LabelledRegion]]:
    """One mask from a session's clicks and boxes over the candidate masks; returns it with the
    candidates it was built from."""
    mask = np.zeros((height, width), dtype=bool)
    used: list[LabelledRegion] = []
    positives: list[tuple[int, int]] = []
    negatives: list[tuple[int, int]] = []
    for prompt in prompts:
        value = prompt.get("value") or {}
        if prompt.get("type") == "keypointlabels":
            point = _point(value, height, width)
            (positives if prompt.get("is_positive", True) is not False else negatives).append(point)
            if prompt.get("is_positive", True) is False:
                continue
            best = max((c for c in candidates if c.mask[point]), key=lambda c: c.score, default=None)
            if best is not None:
                mask |= best.mask
                used.append(best)
        else:
            box = _box(value, height, width)
            ious = [(c.mask & box).sum() / max((c.mask | box).sum(), 1) for c in candidates]
            if ious and max(ious) > 0:
                best = candidates[int(np.argmax(ious))]
                mask |= best.mask & box
                used.append(best)
    for point in negatives:
        if not mask[point]:
            continue
        free = [c for c in candidates if c.mask[point] and not any(c.mask[p] for p in positives)]
        cut = max(free, key=lambda c: c.score, default=None)
        if cut is not None:
            mask &= ~cut.mask
    if negatives and mask.any():
        # What is still nearer to a negative click than to every positive one is not the object.
        ys, xs = np.mgrid[0:height, 0:width]

        def nearest(points: list[tuple[int, int]]) -> np.ndarray:
            return np.min([(ys - r) ** 2 + (xs - c) ** 2 for r, c in points], axis=0)

        if positives:
            mask &= ~(nearest(negatives) < nearest(positives))
        else:
            for point in negatives:
                mask[point] = False
    return mask, used


def session_region(predictor: Predictor, features: Features, config: LabelingConfig,
                   prompts: Sequence[Mapping[str, Any]], settings: PrelabelSettings,
                   mapping: Mapping[str, str] | None) -> list[Result]:
    """The session's one region, in the project's tool for its label."""
    (height, width) = features.images[0].geometry.original
    candidates = regions(predictor, features, replace(config, task="instance", stuff=frozenset()))[0]
    mask, used = combine(candidates, prompts, height, width)
    if not mask.any() or int(mask.sum()) < settings.min_area:
        return []
    named = next((p["value"][p["type"]][0] for p in prompts
                  if isinstance(p.get("value"), dict) and p["value"].get(p.get("type"))), None)
    target = config.mask_target(named)
    if target is None:
        return []
    label = _label(config, target, named, used, predictor, mapping)
    if label is None:
        log.warning("no label of %r for the region of %d prompts", target.from_name, len(prompts))
        return []
    score = float(np.mean([c.score for c in used])) if used else 0.0
    return region_results(LabelledRegion(label, mask, score), [target], settings)


def _label(config: LabelingConfig, target: Target, named: str | None, used: Sequence[LabelledRegion],
           predictor: Predictor, mapping: Mapping[str, str] | None) -> str | None:
    """The prompt's own label (by name, else by meaning), else the best candidate's class."""
    if named:
        found = target.label_named(named) or match_phrase(named, target.vocabulary, model_text_encoder(predictor),
                                                          mapping=mapping).label
        if found:
            return found
    for candidate in sorted(used, key=lambda c: -c.score):
        routed = next((label for t, label in config.routes.get(candidate.label, ()) if t == target), None)
        if routed or target.vocabulary.exact(candidate.label):
            return routed or target.vocabulary.exact(candidate.label)
    return None

"""Interactive prompts in the editor (a typed phrase, a click, a box): the image is encoded once
and its features kept, keyed by the file's content hash, so every later prompt on that image only
runs the decoder's cheap heads; the image's candidate masks (what a click or a box picks from)
are kept beside them, bit-packed, since at full resolution they are the slow part of a click. The
cache drops the least recently used first and holds at most ``XDLABEL_ML_FEATURE_CACHE_MB`` in all.

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
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
from torch import Tensor

from annotator.client import LabelStudioClient
from annotator.convert import Result
from annotator.labeling import LabelingConfig, Target
from annotator.prelabel import LabelledRegion, PrelabelSettings, interactive, region_results, regions
from annotator.project import task_image_url
from annotator.vocabulary import match_phrase, model_text_encoder
from xdecoder.predictor import Features, Predictor
from xdecoder.transforms import read_image
from xdlabel.services import Services

if TYPE_CHECKING:
    from xdecoder.predictor import EncodedImage
    from xdlabel.api.ml_setup import Connections

log = logging.getLogger(__name__)


URL_SECONDS = 600.0  # an image URL is taken to keep its bytes this long (a session's prompts)
URLS_KEPT = 4096  # image URLs remembered (a few hundred bytes each)
# Candidate masks are made on a grid of at most this many pixels, and a click's region is brought
# to the image's size from it: the model's masks come from a quarter of its input (16 x 21 logits at
# the bundled model's 64-pixel short side, 128 x 171 at 512), so a finer grid adds seconds, no detail.
CANDIDATE_PIXELS = 1 << 19


def features_bytes(image: EncodedImage) -> int:
    tensors: list[Tensor] = [image.mask_features, image.res5, image.embeddings, image.mask_logits,
                             *image.multi_scale, *image.latents]
    return sum(t.element_size() * t.nelement() for t in tensors)


def _features_size(features: Features) -> int:
    return sum(features_bytes(image) for image in features)


T = TypeVar("T")


class FeatureCache:
    """Per-image state (encoded features, candidate masks) by key, least recently used dropped
    first, at most ``max_bytes`` in all; one maker per key at a time, so prompts racing on one new
    image encode it once. Also which content an image URL served (for URL_SECONDS), so a later
    prompt on it downloads nothing."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._making: dict[str, tuple[threading.Lock, int]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def size(self) -> int:
        with self._lock:
            return sum(n for _, n in self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: Any, nbytes: int | None = None) -> None:
        size = _features_size(value) if nbytes is None else nbytes
        with self._lock:
            self._items.pop(key, None)
            if size > self.max_bytes:
                return  # larger than the whole cache: not kept
            self._items[key] = (value, size)
            total = sum(n for _, n in self._items.values())
            while total > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                total -= dropped
                self.evictions += 1

    def get_or_make(self, key: str, make: Callable[[], T], nbytes: Callable[[T], int]) -> T:
        """The value under ``key``, made (once, however many callers race) when missing."""
        found = self.get(key)
        if found is not None:
            return cast(T, found)
        with self._lock:
            lock, waiting = self._making.get(key, (threading.Lock(), 0))
            self._making[key] = (lock, waiting + 1)
        try:
            with lock:
                with self._lock:  # made by the caller this one waited for?
                    item = self._items.get(key)
                if item is not None:
                    return cast(T, item[0])
                value = make()
                self.put(key, value, nbytes(value))
                return value
        finally:
            with self._lock:
                lock, waiting = self._making[key]
                if waiting == 1:
                    del self._making[key]
                else:
                    self._making[key] = (lock, waiting - 1)

    def content_of(self, url: str) -> str | None:
        """The content key ``url`` served within URL_SECONDS, if any."""
        with self._lock:
            seen = self._urls.get(url)
            if seen is None or time.monotonic() - seen[1] > URL_SECONDS:
                return None
            return seen[0]

    def served(self, url: str, key: str) -> None:
        with self._lock:
            self._urls.pop(url, None)
            self._urls[url] = (key, time.monotonic())
            while len(self._urls) > URLS_KEPT:
                self._urls.popitem(last=False)


def encoded(services: Services, cache: FeatureCache, client: LabelStudioClient, task: dict[str, Any],
            config: LabelingConfig, predictor: Predictor, version: str) -> tuple[str, Features]:
    """The task's image encoded, with its cache key: from the cache when this model version saw
    the bytes (downloaded only when its URL is not known to have served them lately)."""
    s = services.settings
    url = task_image_url(task, config)
    where = f"{version}:{client.url}:{url}"
    key = cache.content_of(where)
    features = cache.get(key) if key else None
    if key is None or features is None:
        data = client.read_file(url, s.max_image_bytes)
        key = f"{version}:{hashlib.sha256(data).hexdigest()}"
        cache.served(where, key)

        def encode() -> Features:
            image = read_image(data, s.max_image_pixels)[0]
            with services.model_lock:
                return predictor.encode([image])

        features = cache.get_or_make(key, encode, _features_size)
    return key, features


def candidates(services: Services, cache: FeatureCache, key: str, predictor: Predictor, features: Features,
               config: LabelingConfig) -> list[LabelledRegion]:
    """Every instance candidate of the image for the config's classes, on a grid of at most
    CANDIDATE_PIXELS, kept bit-packed beside its features: they are the slow part of a click."""
    names = hashlib.sha256("\n".join(config.class_names).encode()).hexdigest()[:16]
    image = features.images[0]
    shape = candidate_grid(image.geometry.original)
    on_grid = Features([replace(image, geometry=replace(image.geometry, original=shape))])

    def make() -> list[tuple[str, np.ndarray, float]]:
        with services.model_lock:
            made = regions(predictor, on_grid, replace(config, task="instance", stuff=frozenset()))[0]
        return [(c.label, np.packbits(c.mask, axis=None), c.score) for c in made]

    packed = cache.get_or_make(f"{key}:candidates:{names}", make, lambda v: sum(p.nbytes for _, p, _ in v) + 1)
    size = shape[0] * shape[1]
    return [LabelledRegion(label, np.unpackbits(bits, count=size).astype(bool).reshape(shape), score)
            for label, bits, score in packed]


def candidate_grid(original: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) candidates are made at: the image's own, scaled down to CANDIDATE_PIXELS."""
    (height, width) = original
    scale = min(1.0, (CANDIDATE_PIXELS / max(height * width, 1)) ** 0.5)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_size(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """``mask`` resized to (height, width), nearest pixel."""
    if mask.shape == (height, width):
        return mask
    rows = np.arange(height) * mask.shape[0] // height
    cols = np.arange(width) * mask.shape[1] // width
    return mask[rows[:, None], cols[None, :]]


SPATIAL = ("keypointlabels", "rectanglelabels")


def interactive_answer(services: Services, connections: Connections, client: LabelStudioClient,
                       config: LabelingConfig, tasks: list[dict[str, Any]], context: dict[str, Any],
                       version: str, mapping: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The answer to the editor's prompts on the first task (an empty result if its image cannot
    be read: the editor shows nothing rather than an error)."""
    empty: dict[str, Any] = {"result": [], "score": 0.0, "model_version": version}
    if not tasks:
        return empty
    prompts = [p for p in context.get("result", []) if isinstance(p, dict)]
    spatial = [p for p in prompts if p.get("type") in SPATIAL]
    others = [_latest_text(p) for p in prompts if p.get("type") not in SPATIAL]
    try:
        cache = connections.features(services.settings.ml_feature_cache_mb << 20)
        predictor = connections.predictor(services)
        key, features = encoded(services, cache, client, tasks[0], config, predictor, version)
        found = candidates(services, cache, key, predictor, features, config) if spatial else []
    except Exception as err:  # noqa: BLE001 - reported; the editor gets no suggestion
        log.warning("task %s: %s", tasks[0].get("id"), err)
        return empty
    settings = PrelabelSettings(polygon_tolerance=services.settings.ls_polygon_tolerance)
    with services.model_lock:
        answer = interactive(predictor, features, config, {"result": others}, version, settings, mapping=mapping) \
            if others else dict(empty)
        if spatial:
            answer["result"] = [*answer["result"], *session_region(predictor, features, found, config, spatial,
                                                                   settings, mapping)]
    answer["result"] = [dict(r, id=f"xd{i}") for i, r in enumerate(answer["result"])]
    answer["score"] = max((r.get("score", 0.0) for r in answer["result"]), default=0.0)
    return answer


def _latest_text(prompt: dict[str, Any]) -> dict[str, Any]:
    """A TextArea prompt with its last submission only: the editor sends every phrase typed so far
    in the annotation, and only the newest is the prompt."""
    value = prompt.get("value")
    if prompt.get("type") != "textarea" or not isinstance(value, dict):
        return prompt
    texts = value.get("text")
    if not isinstance(texts, list) or len(texts) < 2:
        return prompt
    latest = next((t for t in reversed(texts) if isinstance(t, str) and t.strip()), texts[-1])
    return dict(prompt, value=dict(value, text=[latest]))


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


def session_region(predictor: Predictor, features: Features, found: Sequence[LabelledRegion],
                   config: LabelingConfig, prompts: Sequence[Mapping[str, Any]], settings: PrelabelSettings,
                   mapping: Mapping[str, str] | None) -> list[Result]:
    """The session's one region over the image's candidates ``found`` (combined on their grid,
    then brought to the image's size), in the project's tool for its label."""
    (height, width) = features.images[0].geometry.original
    grid = found[0].mask.shape if found else (height, width)
    mask, used = combine(found, prompts, *grid)
    mask = to_size(mask, height, width)
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

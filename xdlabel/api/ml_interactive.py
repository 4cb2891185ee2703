"""Interactive prompts in the editor (a typed phrase, a click, a box): the image is encoded once
and its features kept, keyed by the file's content hash, so every later prompt on that image only
runs the decoder's cheap heads. The cache drops the least recently used images first and holds at
most ``XDLABEL_ML_FEATURE_CACHE_MB`` of tensors."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from torch import Tensor

from annotator.client import LabelStudioClient
from annotator.labeling import LabelingConfig
from annotator.prelabel import PrelabelSettings, interactive
from annotator.project import task_image_url
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
            config: LabelingConfig) -> Features:
    """The task's image, encoded (from the cache when its bytes were seen before)."""
    s = services.settings
    data = client.read_file(task_image_url(task, config), s.max_image_bytes)
    key = hashlib.sha256(data).hexdigest()
    features = cache.get(key)
    if features is None:
        image = read_image(data, s.max_image_pixels)[0]
        with services.model_lock:
            features = services.predictor.encode([image])
        cache.put(key, features)
    return features


def interactive_answer(services: Services, connections: Connections, client: LabelStudioClient,
                       config: LabelingConfig, tasks: list[dict[str, Any]], context: dict[str, Any],
                       version: str) -> dict[str, Any]:
    """The answer to the editor's prompts on the first task (an empty result if its image cannot
    be read: the editor shows nothing rather than an error)."""
    empty: dict[str, Any] = {"result": [], "score": 0.0, "model_version": version}
    if not tasks:
        return empty
    try:
        cache = connections.features(services.settings.ml_feature_cache_mb << 20)
        features = encoded(services, cache, client, tasks[0], config)
    except Exception as err:  # noqa: BLE001 - reported; the editor gets no suggestion
        log.warning("task %s: %s", tasks[0].get("id"), err)
        return empty
    settings = PrelabelSettings(polygon_tolerance=services.settings.ls_polygon_tolerance)
    with services.model_lock:
        return interactive(services.predictor, features, config, context, version, settings)

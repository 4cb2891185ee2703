"""Interactive prompts: a session's clicks and boxes make one region (add/subtract over candidate
masks, checked as properties over random scenes), encoded images are cached by content hash under
a memory bound, and a real Label Studio's interactive request is answered from the cache the second
time with the same region as a fresh encode."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from annotator.client import LabelStudioClient
from annotator.convert import result_to_mask
from annotator.localserver import LocalLabelStudio
from annotator.prelabel import LabelledRegion
from index.db import upgrade
from tests.conftest import Server, make_images
from xdecoder.predictor import EncodedImage, Features
from xdecoder.transforms import ImageGeometry
from xdlabel.api.ml_interactive import FeatureCache, combine, features_bytes
from xdlabel.services import Services
from xdlabel.settings import Settings

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle,ball"/>
    <Label value="background" stuff="true"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Ball"/></KeyPointLabels>
</View>"""


def _click(row: int, col: int, height: int, width: int, positive: bool = True) -> dict[str, Any]:
    return {"type": "keypointlabels", "is_positive": positive,
            "value": {"x": (col + 0.5) * 100.0 / width, "y": (row + 0.5) * 100.0 / height, "width": 0.5}}


def _scene(rng: np.random.Generator, height: int = 60, width: int = 80) -> list[LabelledRegion]:
    candidates = []
    for k in range(int(rng.integers(2, 7))):
        mask = np.zeros((height, width), bool)
        y0, x0 = int(rng.integers(0, height - 10)), int(rng.integers(0, width - 10))
        mask[y0:y0 + int(rng.integers(5, 30)), x0:x0 + int(rng.integers(5, 30))] = True
        candidates.append(LabelledRegion(f"c{k}", mask, float(rng.uniform(0.1, 1.0))))
    return candidates


def test_a_session_of_clicks_makes_one_region_that_keeps_positives_and_drops_negatives() -> None:
    """300 random scenes of overlapping candidate boxes, 1-3 positive and 0-2 negative clicks each."""
    rng = np.random.default_rng(12)
    height, width = 60, 80
    checked = 0
    for _ in range(300):
        candidates = _scene(rng, height, width)
        union = np.logical_or.reduce([c.mask for c in candidates])
        ys, xs = np.nonzero(union)
        picks = rng.choice(len(ys), size=int(rng.integers(1, 4)), replace=False)
        positives = [(int(ys[i]), int(xs[i])) for i in picks]
        negatives = [(int(r), int(c)) for r, c in zip(rng.integers(0, height, 2), rng.integers(0, width, 2),
                                                       strict=True)][: int(rng.integers(0, 3))]
        negatives = [n for n in negatives if n not in positives]
        prompts = [_click(r, c, height, width) for r, c in positives] + \
                  [_click(r, c, height, width, positive=False) for r, c in negatives]
        mask, used = combine(candidates, prompts, height, width)
        assert all(mask[p] for p in positives)  # each positive click is in the region
        assert not any(mask[n] for n in negatives)  # no negative click is
        assert not (mask & ~np.logical_or.reduce([c.mask for c in used])).any()  # only candidates' pixels
        if not negatives:  # each positive click brings its best candidate whole
            for r, c in positives:
                best = max((k for k in candidates if k.mask[r, c]), key=lambda k: k.score)
                assert mask[best.mask].all()
        checked += 1
    assert checked == 300


def test_a_box_adds_the_candidate_it_overlaps_most_cut_to_the_box() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        candidates = _scene(rng)
        target = candidates[int(rng.integers(len(candidates)))]
        ys, xs = np.nonzero(target.mask)
        box = {"type": "rectanglelabels", "value": {"x": xs.min() * 100 / 80, "y": ys.min() * 100 / 60,
                                                    "width": (xs.max() + 1 - xs.min()) * 100 / 80,
                                                    "height": (ys.max() + 1 - ys.min()) * 100 / 60}}
        mask, used = combine(candidates, [box], 60, 80)
        inside = np.zeros((60, 80), bool)
        inside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        assert len(used) == 1 and mask.any() and not (mask & ~inside).any()
        iou = [(c.mask & inside).sum() / (c.mask | inside).sum() for c in candidates]
        assert (used[0].mask & inside).sum() / (used[0].mask | inside).sum() == max(iou)


def _features(nbytes: int) -> Features:
    t = torch.zeros(nbytes // 4, dtype=torch.float32)
    return Features([EncodedImage(ImageGeometry((1, 1), (1, 1)), (1, 1), t, [], t[:0], t[:0], t[:0], [])])


def test_feature_cache_is_lru_and_never_over_its_bound() -> None:
    rng = np.random.default_rng(5)
    bound = 1000 * 4
    cache = FeatureCache(bound)
    recent: list[str] = []
    for step in range(500):
        key = f"k{int(rng.integers(0, 30))}"
        if cache.get(key) is None:
            cache.put(key, _features(int(rng.integers(1, 400)) * 4))
        recent = [k for k in recent if k != key] + [key]
        assert cache.size <= bound, step
        # the most recently used image is always kept (no single one exceeds the bound)
        assert cache.get(recent[-1]) is not None
    assert cache.hits > 0 and cache.misses > 0
    cache.put("huge", _features(bound + 4))  # larger than the cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and cache.size <= bound
    assert features_bytes(_features(400).images[0]) == 400


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = Settings(data_dir=tmp_path / "data", short_side=64, caption_steps=2, ml_backend_password="s3cret")
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    server = Server(services)
    with server as url:
        yield {"url": url + "/ml", "services": services, "app": server.server.config.app}
    services.engine.dispose()


def test_interactive_prompts_reuse_the_encoded_image(backend: dict[str, Any], label_studio: LocalLabelStudio,
                                                     tmp_path: Path) -> None:
    client = LabelStudioClient(label_studio.url, label_studio.token)
    project = client.sdk.projects.create(title="interactive-cache", label_config=CONFIG)
    folder = label_studio.files_root / "interactive-cache"
    folder.mkdir(parents=True)
    for path in make_images(tmp_path / "imgs", 1):
        (folder / path.name).write_bytes(path.read_bytes())
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    (task,) = client.sdk.projects.import_tasks(id=project.id, request=[
        {"data": {"image": "/data/local-files/?d=interactive-cache/img0.png"}}], return_task_ids=True).task_ids
    backend_id = client.register_ml_backend(project.id, backend["url"], "xdlabel", "s3cret")
    connections = backend["app"].state.ls_connections

    def ask(prompts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
        started = time.monotonic()
        raw = client.sdk.ml.with_raw_response.predict_interactive(id=backend_id, task=task, context={
            "result": [dict(p, from_name="kp", to_name="image", original_width=160, original_height=120)
                       for p in prompts]})
        return raw.response.json()["data"]["result"], time.monotonic() - started

    clicks = [_click(r, c, 120, 160) for r, c in ((40, 40), (60, 100))] + [_click(5, 5, 120, 160, False)]
    first, first_seconds = ask(clicks)
    cache = connections.features(1)
    assert (cache.misses, cache.hits, len(cache)) == (1, 0, 1)
    second, second_seconds = ask(clicks)
    assert (cache.misses, cache.hits) == (1, 1)  # the second prompt did not encode the image again
    assert len({r["id"] for r in first}) <= 1 and len(first) == len(second)
    if first:  # one brush region: the session's clicks combined
        assert [r["type"] for r in first] == ["brushlabels"]
        assert np.array_equal(result_to_mask(first[0]), result_to_mask(second[0]))
    print(f"interactive prompt: first {first_seconds:.2f} s, cached {second_seconds:.2f} s")

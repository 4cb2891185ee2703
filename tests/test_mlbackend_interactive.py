"""Interactive prompts: a session's clicks and boxes make one region (add/subtract over candidate
masks, checked as properties over random scenes); encoded images and their candidate masks are
cached by content hash under a memory bound, so through a real Label Studio a later prompt on an
image neither downloads nor encodes it and answers in under a second; concurrent prompts under a
small cache equal uncached answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from annotator.client import LabelStudioClient
from annotator.convert import result_to_mask
from annotator.labeling import parse_labeling_config
from annotator.localserver import LocalLabelStudio
from annotator.prelabel import LabelledRegion, PrelabelSettings
from index.db import upgrade
from tests.conftest import Server
from xdecoder.predictor import EncodedImage, Features
from xdecoder.transforms import ImageGeometry, read_image
from xdlabel.api import ml_interactive
from xdlabel.api.ml_interactive import (
    CANDIDATE_PIXELS,
    URL_SECONDS,
    FeatureCache,
    _latest_text,
    candidate_grid,
    candidates,
    combine,
    features_bytes,
    interactive_answer,
    session_region,
    to_size,
)
from xdlabel.api.ml_predict import PREDICT_CHUNK
from xdlabel.api.ml_setup import Connections, labeling_config
from xdlabel.services import Services
from xdlabel.settings import Settings

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle,ball"/>
    <Label value="background" stuff="true"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Ball"/></KeyPointLabels>
  <TextArea name="prompt" toName="image" editable="true"/>
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


def test_a_textarea_prompt_is_its_latest_submission() -> None:
    """The editor sends every phrase typed so far in the annotation; the newest is the prompt."""
    sent = {"type": "textarea", "value": {"text": ["ball", "the sky", "  "]}, "from_name": "prompt"}
    assert _latest_text(sent) == dict(sent, value={"text": ["the sky"]})
    assert _latest_text({"type": "textarea", "value": {"text": ["ball"]}})["value"]["text"] == ["ball"]
    click = {"type": "keypointlabels", "value": {"x": 1, "y": 2}}
    assert _latest_text(click) is click


def test_the_ml_backend_defaults_the_readme_states() -> None:
    """README's ML backend section quotes these: Label Studio's ML_TIMEOUT_PREDICT default (100 s),
    the predict budget (60 s), chunks of 4, a 512 MB feature cache, image URLs trusted 10 minutes,
    candidates on a grid of at most 2^19 pixels."""
    fields = Settings.model_fields
    assert (fields["ml_timeout_predict"].default, fields["ml_predict_budget"].default) == (100.0, 60.0)
    assert fields["ml_feature_cache_mb"].default == 512
    assert (PREDICT_CHUNK, URL_SECONDS, CANDIDATE_PIXELS) == (4, 600.0, 2 ** 19)


def test_to_size_is_nearest_pixel_and_the_grid_keeps_the_aspect() -> None:
    rng = np.random.default_rng(8)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        k = int(rng.integers(1, 5))
        mask = rng.random((h, w)) < 0.5
        assert np.array_equal(to_size(mask, h * k, w * k), np.kron(mask, np.ones((k, k), bool)))
        big = (int(rng.integers(1, 5000)), int(rng.integers(1, 5000)))
        grid = candidate_grid(big)
        assert grid[0] * grid[1] <= CANDIDATE_PIXELS + grid[0] + grid[1] and grid[0] <= big[0] and grid[1] <= big[1]
        assert abs(grid[0] / grid[1] - big[0] / big[1]) <= big[0] / big[1] * (1 / grid[0] + 1 / grid[1])


def test_a_click_on_a_large_image_is_made_on_the_grid_and_sized_to_the_image(tmp_path: Path) -> None:
    """1600x1200 (past CANDIDATE_PIXELS): candidates on the smaller grid, the region at full size,
    equal to the grid's combination brought up nearest-pixel."""
    _scene_image(tmp_path / "big.png", 3, 1600, 1200)
    services = Services(Settings(data_dir=tmp_path / "data"))
    predictor = services.predictor
    features = predictor.encode([read_image((tmp_path / "big.png").read_bytes(), 10 ** 8)[0]])
    config = parse_labeling_config(CONFIG)
    found = candidates(services, FeatureCache(64 << 20), "big", predictor, features, config)
    grid = candidate_grid((1200, 1600))
    assert found and all(c.mask.shape == grid for c in found) and grid[0] * grid[1] < 1200 * 1600
    clicks = _clicks([(25.0, 45.0, True), (90.0, 10.0, False)])
    (region,) = session_region(predictor, features, found, config, clicks, PrelabelSettings(), None)
    assert (region["original_width"], region["original_height"]) == (1600, 1200)
    expected = to_size(combine(found, clicks, *grid)[0], 1200, 1600)
    assert np.array_equal(result_to_mask(region), expected)


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


def _scene_image(path: Path, seed: int, width: int = 640, height: int = 480) -> None:
    """A photo-sized shape scene: a ball and a square on grass under sky."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (60, 170, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width, height // 3], fill=(120, 180, 240))
    x, y = int(rng.integers(20, width // 2)), int(rng.integers(height // 3, height // 2))
    draw.ellipse([x, y, x + width // 4, y + width // 4], fill=(220, 40, 30))
    draw.rectangle([width * 3 // 5, height // 2, width * 4 // 5, height * 3 // 4], fill=(40, 60, 200))
    image.save(path)


@dataclass
class Backend:
    url: str
    services: Services
    connections: Any


@pytest.fixture
def backend(tmp_path: Path, label_studio: LocalLabelStudio) -> Iterator[Backend]:
    """The ML backend under uvicorn with the bundled model at its default size."""
    settings = Settings(data_dir=tmp_path / "data", ml_backend_password="s3cret",
                        ls_url=label_studio.url, ls_token=label_studio.token)
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    server = Server(services)
    with server as url:
        yield Backend(url + "/ml", services, server.server.config.app.state.ls_connections)
    services.engine.dispose()


class Counts:
    """Downloads, encodes and candidate computations done by the backend, counted where they happen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, services: Services) -> None:
        self.reads = self.encodes = self.candidates = 0
        self._lock = threading.Lock()
        predictor = services.predictor
        encode, read, regions = predictor.encode, LabelStudioClient.read_file, ml_interactive.regions

        def counting_encode(*args: Any, **kwargs: Any) -> Any:
            self._add("encodes")
            return encode(*args, **kwargs)

        def counting_read(client: LabelStudioClient, *args: Any, **kwargs: Any) -> bytes:
            self._add("reads")
            return read(client, *args, **kwargs)

        def counting_regions(*args: Any, **kwargs: Any) -> Any:
            self._add("candidates")
            return regions(*args, **kwargs)

        monkeypatch.setattr(predictor, "encode", counting_encode)
        monkeypatch.setattr(LabelStudioClient, "read_file", counting_read)
        monkeypatch.setattr(ml_interactive, "regions", counting_regions)

    def _add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def now(self) -> tuple[int, int, int]:
        return self.reads, self.encodes, self.candidates


def _project(client: LabelStudioClient, label_studio: LocalLabelStudio, title: str, n: int,
             size: tuple[int, int] = (640, 480)) -> tuple[int, list[int]]:
    project = client.sdk.projects.create(title=title, label_config=CONFIG)
    folder = label_studio.files_root / title
    folder.mkdir(parents=True)
    for i in range(n):
        _scene_image(folder / f"img{i}.png", i, *size)
    client.sdk.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    tasks = [{"data": {"image": f"/data/local-files/?d={title}/img{i}.png"}} for i in range(n)]
    return project.id, list(client.sdk.projects.import_tasks(id=project.id, request=tasks,
                                                             return_task_ids=True).task_ids)


PHRASE = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["the red circle"]}}


def ball_iou(mask: np.ndarray, image: Path) -> float:
    """IoU of a mask with the red ball of a `_scene_image`."""
    pixels = np.asarray(Image.open(image).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80)
    return float((mask & red).sum() / max((mask | red).sum(), 1))


def red_iou(result: dict[str, Any], image: Path) -> float:
    """IoU of a result's mask with the scene's red ball."""
    mask = result_to_mask(result)
    assert mask is not None
    return ball_iou(mask, image)


def _clicks(points: list[tuple[float, float, bool]]) -> list[dict[str, Any]]:
    return [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": positive,
             "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Ball"]}} for x, y, positive in points]


def test_a_second_prompt_on_an_image_neither_downloads_nor_encodes_it_and_answers_in_under_a_second(
        backend: Backend, label_studio: LocalLabelStudio, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through Label Studio's own interactive call (the editor's request) to the backend over HTTP,
    on a 640x480 scene with the bundled model at its default size: the first prompt downloads and
    encodes the image, the first click computes its candidate masks; every later prompt, phrase or
    click, does none of that and is answered in under a second (the median of six; each under two),
    with the same regions."""
    client = LabelStudioClient(label_studio.url, label_studio.token)
    project, (task, _) = _project(client, label_studio, "interactive-cache", 2)
    backend_id = client.register_ml_backend(project, backend.url, "xdlabel", "s3cret")
    counts = Counts(monkeypatch, backend.services)

    def ask(prompts: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], float]:
        started = time.monotonic()
        raw = client.sdk.ml.with_raw_response.predict_interactive(id=backend_id, task=task,
                                                                   context={"result": prompts})
        return raw.response.json()["data"]["result"], time.monotonic() - started

    clicks = _clicks([(25.0, 45.0, True), (90.0, 10.0, False)])
    phrase, phrase_first = ask([PHRASE])
    assert counts.now() == (1, 1, 0)  # downloaded and encoded once
    click, click_first = ask(clicks)
    assert counts.now() == (1, 1, 1)  # no download, no encode; candidates computed once
    timings = []
    for _ in range(3):
        again, seconds = ask([PHRASE])
        assert again == phrase
        timings.append(seconds)
        again, seconds = ask(clicks)
        assert again == click
        timings.append(seconds)
    assert counts.now() == (1, 1, 1)  # nothing downloaded, encoded or computed again
    assert [r["value"]["brushlabels"] for r in phrase] == [["Ball"]]  # the phrase's suggestion, on the ball
    assert red_iou(phrase[0], label_studio.files_root / "interactive-cache" / "img0.png") > 0.5
    assert [r["type"] for r in click] == ["brushlabels"]  # the session's one region
    print(f"640x480 interactive: first phrase {phrase_first:.2f} s, first click {click_first:.2f} s, "
          f"later prompts {', '.join(f'{t:.2f}' for t in timings)} s")
    # Under a second as a rule (the median); on a loaded 2-core machine one may be slower now and then.
    assert float(np.median(timings)) < 1.0 and max(timings) < 2.0, timings


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(url + "/predict", json=body, auth=("xdlabel", "s3cret"), timeout=120)
    response.raise_for_status()
    return response.json()["results"][0]  # type: ignore[no-any-return]


def test_concurrent_prompts_on_several_images_under_a_small_cache_equal_uncached_answers(
        backend: Backend, label_studio: LocalLabelStudio, monkeypatch: pytest.MonkeyPatch) -> None:
    """6 threads send 30 seeded random prompts (a phrase, or 1-3 clicks with negatives) on 4
    320x240 images straight to /ml/predict, with a cache bound that holds about two images: evictions
    happen, fewer encodes than prompts are made, and every answer equals the one computed
    with no cache at all (fresh download and encode for each prompt)."""
    client = LabelStudioClient(label_studio.url, label_studio.token)
    project, task_ids = _project(client, label_studio, "interactive-concurrent", 4, (320, 240))
    tasks = [{"id": t, "data": {"image": f"/data/local-files/?d=interactive-concurrent/img{i}.png"}}
             for i, t in enumerate(task_ids)]
    rng = np.random.default_rng(1212)
    prompts = []
    for _ in range(30):
        if rng.random() < 0.3:
            context = [PHRASE]
        else:
            n = int(rng.integers(1, 4))
            context = _clicks([(float(rng.uniform(5, 95)), float(rng.uniform(5, 95)),
                                bool(k == 0 or rng.random() < 0.6)) for k in range(n)])
        prompts.append((int(rng.integers(0, 4)), context))
    bound = 2 << 20  # two images: each ~0.4 MB of features and ~0.5 MB of packed candidates at 320x240
    cache = backend.connections.features(bound)
    counts = Counts(monkeypatch, backend.services)

    def body(k: int) -> dict[str, Any]:
        image, context = prompts[k]
        return {"tasks": [tasks[image]], "project": f"{project}.0", "label_config": CONFIG,
                "params": {"context": {"result": context}}}

    with ThreadPoolExecutor(6) as pool:
        cached = list(pool.map(lambda k: _post(backend.url, body(k)), range(len(prompts))))
    assert cache.evictions > 0 and cache.size <= bound
    assert counts.encodes <= counts.reads and counts.encodes < len(prompts)
    print(f"{len(prompts)} prompts: {counts.reads} downloads, {counts.encodes} encodes, "
          f"{counts.candidates} candidate runs, {cache.evictions} evictions")

    encodes = counts.encodes
    fresh = Connections()
    fresh.features(0)  # holds nothing: every prompt downloads and encodes its image again
    config = labeling_config(backend.services, CONFIG)
    version = backend.connections.version(backend.services)
    for k, (image, context) in enumerate(prompts):
        reference = interactive_answer(backend.services, fresh, client, config, [tasks[image]],
                                       {"result": context}, version)
        assert cached[k]["result"] == reference["result"], k
    assert counts.encodes - encodes == len(prompts)  # the reference really encoded every time

"""Fine-tuning from Label Studio annotations: tasks -> scenes, and a new class name learned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from annotator.convert import brush_result, caption_result
from annotator.dataset import scenes_from_tasks
from index.db import make_engine, make_session_factory, upgrade
from index.models import ModelVersion
from xdecoder.training.synthetic import CLASSES, STUFF, make_scenes
from xdlabel.finetune import FinetuneOptions, decide, finetune, split
from xdlabel.settings import BUNDLED_CHECKPOINT


def synthetic_tasks(count: int, seed: int, size: tuple[int, int], names: dict[str, str]) -> tuple[list, dict]:
    """Label Studio JSON of synthetic scenes (as annotators would have labelled them), class names
    renamed by ``names``, and the images by task id."""
    tasks, images = [], {}
    for i, scene in enumerate(make_scenes(count, seed=seed, size=size)):
        rename = {c: names.get(c, c) for c in CLASSES}
        caption = scene.caption
        for old, new in names.items():
            caption = caption.replace(old, new)
        results = [brush_result(scene.mask(s.id), rename[CLASSES[s.category_id]], "mask", "image")
                   for s in scene.segments]
        results.append(caption_result(caption, "caption", "image"))
        tasks.append({"id": i + 1, "data": {"image": f"/data/{i}.png"},
                      "annotations": [{"id": 100 + i, "result": results, "was_cancelled": False}]})
        images[i + 1] = scene.image
    return tasks, images


def test_tasks_become_the_same_scenes() -> None:
    size = (96, 64)
    tasks, images = synthetic_tasks(4, seed=3, size=size, names={})
    tasks.append({"id": 50, "data": {"image": "/data/none.png"}, "annotations": []})
    tasks.append({"id": 51, "data": {"image": "/data/gone.png"}, "annotations": tasks[0]["annotations"]})

    def read(task: dict) -> np.ndarray:
        return images[task["id"]]

    data = scenes_from_tasks(tasks, read, size=size)
    assert data.skipped.keys() == {50, 51} and "annotation" in data.skipped[50] and "readable" in data.skipped[51]
    assert sorted(data.class_names) == sorted({CLASSES[s.category_id] for sc in make_scenes(4, 3, size)
                                               for s in sc.segments})
    for scene, original in zip(data.scenes, make_scenes(4, seed=3, size=size), strict=True):
        assert np.array_equal(scene.image, original.image)
        for segment in original.segments:
            (match,) = [s for s in scene.segments if data.class_names[s.category_id] == CLASSES[segment.category_id]
                        and np.array_equal(scene.mask(s.id), original.mask(segment.id))]
            assert match.area == segment.area
        assert scene.caption == original.caption
    assert len(data.digest) == 64


def test_better_is_decided_on_enough_images_with_an_interval() -> None:
    """Random per-image changes: decided only from 10 images, better only when the interval of the
    mean lies above zero (and then the mean is above zero too); 200 seeded draws."""
    rng = np.random.default_rng(4)
    options = FinetuneOptions(min_heldout=10)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        changes = rng.normal(float(rng.uniform(-0.05, 0.1)), float(rng.uniform(0.001, 0.1)), n)
        better, interval, decision = decide(changes, options)
        assert interval is not None and interval[0] <= float(changes.mean()) <= interval[1]
        if n < 10:
            assert not better and decision.startswith("not decided")
        else:
            assert better == (interval[0] > 0) and (not better or changes.mean() > 0)
    assert decide(np.full(12, 0.02), options)[0] and not decide(np.full(12, -0.02), options)[0]


def test_split_holds_out_every_fourth() -> None:
    scenes = make_scenes(8, seed=0, size=(32, 32))
    train, held = split(scenes, 4)
    assert len(train) == 6 and held == [scenes[3], scenes[7]]
    with pytest.raises(ValueError, match="at least 2"):
        split(scenes[:1], 4)


def test_finetuning_the_bundled_model_learns_a_new_class_name(tmp_path: Path) -> None:
    """Water is called "lake" here, a name the bundled model never saw: its held-out IoU must rise, and
    the checkpoint is registered as a model version exactly when decided better."""
    size = (96, 64)
    tasks, images = synthetic_tasks(16, seed=777, size=size, names={"water": "lake"})
    data = scenes_from_tasks(tasks, lambda task: images[task["id"]], size=size)
    assert "lake" in data.class_names and "water" not in data.class_names
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    stuff = [c for c in data.class_names if c in STUFF]
    report = finetune("parity", str(BUNDLED_CHECKPOINT), data.scenes, data.class_names, stuff, tmp_path / "ft",
                      FinetuneOptions(steps=40, lr=3e-4, min_heldout=4), data_digest=data.digest, sessions=sessions)
    print(f"\nnew class 'lake' IoU before {report.before['iou/lake']:.3f} after {report.after['iou/lake']:.3f}; "
          f"mIoU {report.before['miou']:.3f} -> {report.after['miou']:.3f}; {report.decision}")
    assert report.after["iou/lake"] > report.before["iou/lake"] + 0.3
    # "Better" is decided on the per-image change over the held-out images (4 here; 10 by default, see
    # the test above): registered exactly when the interval of the mean change lies above zero.
    assert report.heldout_scenes == 4 and report.interval is not None and report.checkpoint.is_file()
    assert report.improved == (report.interval[0] > 0)
    with sessions() as session:
        registered = session.scalar(select(ModelVersion.name).where(ModelVersion.name == report.model_version))
    assert (registered is not None) == report.improved
    engine.dispose()


def test_coco_files_become_scenes(tmp_path: Path) -> None:
    """Polygons and RLE, captions from a captions file, RefCOCO-style sentences, stuff categories."""
    import json

    from PIL import Image

    from annotator.convert import mask_to_coco_rle, mask_to_outlines
    from annotator.dataset import scenes_from_coco

    size = (96, 64)
    originals = make_scenes(3, seed=11, size=size)
    images, anns, captions = [], [], []
    for i, scene in enumerate(originals):
        Image.fromarray(scene.image).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]})
        captions.append({"id": i, "image_id": i, "caption": scene.caption})
        for s in scene.segments:
            mask = scene.mask(s.id)
            if s.isthing and not (mask_to_outlines(mask, 0)[0].holes or len(mask_to_outlines(mask, 0)) > 1):
                ring = mask_to_outlines(mask, 0)[0].exterior  # a polygon, in COCO's pixel-edge coordinates
                segmentation: object = [ring.ravel().tolist()]
            else:
                segmentation = mask_to_coco_rle(mask)
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": s.category_id + 1, "iscrowd": 0,
                   "segmentation": segmentation, "area": int(mask.sum()), "bbox": list(s.box)}
            if s.id in scene.phrases:
                ann["sentences"] = [{"sent": scene.phrases[s.id]}]
            anns.append(ann)
    categories = [{"id": k + 1, "name": c, "isthing": int(c not in STUFF)} for k, c in enumerate(CLASSES)]
    (tmp_path / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                         "categories": categories}))
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    data = scenes_from_coco(tmp_path / "instances.json", size, captions=tmp_path / "captions.json")
    assert data.class_names == list(CLASSES) and data.stuff == list(STUFF) and not data.skipped
    for scene, original in zip(data.scenes, originals, strict=True):
        assert scene.caption == original.caption
        assert set(original.phrases.values()) <= set(scene.phrases.values())  # plus "the <label>" for unique ones
        for segment in original.segments:
            matches = [s for s in scene.segments if s.category_id == segment.category_id and
                       (scene.mask(s.id) == original.mask(segment.id)).mean() > 0.995]
            assert matches, f"{CLASSES[segment.category_id]} lost"

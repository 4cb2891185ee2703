"""The synthetic scene generator: seeded, consistent ground truth."""

from __future__ import annotations

import numpy as np

from xdecoder.training.synthetic import CLASSES, STUFF, THINGS, make_scene, make_scenes


def test_same_seed_same_scene_and_different_seeds_differ() -> None:
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.segment_map, b.segment_map)
    assert a.caption == b.caption and a.phrases == b.phrases
    assert not np.array_equal(a.image, c.image)


def test_ground_truth_is_consistent() -> None:
    for scene in make_scenes(40, seed=3):
        ids = set(np.unique(scene.segment_map)) - {0}
        assert ids == {s.id for s in scene.segments}
        assert (scene.segment_map > 0).all()  # every pixel belongs to a segment
        for seg in scene.segments:
            mask = scene.mask(seg.id)
            ys, xs = np.nonzero(mask)
            assert seg.area == mask.sum() and seg.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert seg.isthing == (CLASSES[seg.category_id] in THINGS)
        things = [s for s in scene.segments if s.isthing]
        assert set(scene.phrases) == {s.id for s in things}
        for seg in things:
            assert scene.phrases[seg.id].startswith(f"the {seg.size} {seg.color} {CLASSES[seg.category_id]}")
        stuff = [CLASSES[s.category_id] for s in scene.segments if not s.isthing]
        assert "sky" in stuff and scene.caption.endswith(f" on {next(n for n in stuff if n != 'sky')}")
        for seg in things:
            assert f"{seg.color} {CLASSES[seg.category_id]}" in scene.caption
    assert set(STUFF) >= {"sky", "grass"}

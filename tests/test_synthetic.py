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


def _parse(caption: str) -> tuple[dict[tuple[str, str], int], str]:
    """'a red circle and two blue squares on grass' -> ({('red', 'circle'): 1, ('blue', 'square'): 2}, 'grass')."""
    numbers = {"a": 1, "two": 2, "three": 3, "four": 4}
    things, ground = caption.rsplit(" on ", 1)
    groups = {}
    for part in things.replace(" and ", ", ").split(", "):
        number, color, kind = part.split(" ")
        groups[(color, kind.removesuffix("s"))] = numbers[number]
    return groups, ground


def test_near_miss_captions_are_wrong_in_exactly_one_detail() -> None:
    import random

    from xdecoder.training.synthetic import near_misses

    # 300 seeded scenes, up to 6 near misses each: every one parses, differs from the true caption, and
    # changes the ground alone or the things alone (one group's colour, shape or count).
    rng = random.Random(0)
    checked = 0
    for scene in make_scenes(300, seed=11):
        truth, ground = _parse(scene.caption)
        misses = near_misses(scene, 6, rng)
        assert len(misses) == len(set(misses)) == 6, (scene.caption, misses)
        for miss in misses:
            groups, miss_ground = _parse(miss)
            assert miss != scene.caption
            assert (groups == truth) != (miss_ground == ground), (scene.caption, miss)
            if groups != truth:
                changed = set(groups.items()) ^ set(truth.items())
                assert 1 <= len(changed) <= 3, (scene.caption, miss)  # a count, or a swap (possibly merging)
                assert abs(sum(groups.values()) - sum(truth.values())) <= 1
            checked += 1
    assert checked == 1800

"""The task API: one pass serves every task, batching changes nothing, any input becomes RGB."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from tests.conftest import PARITY
from xdecoder import Predictor
from xdecoder.modeling.xdecoder import XDecoder
from xdecoder.predictor import Features, PredictorSettings
from xdecoder.transforms import ImageInputError, to_rgb

CLASSES = ["person", "dog", "car", "sky", "grass"]


@pytest.fixture(scope="module")
def predictor(parity_model: XDecoder) -> Predictor:
    return Predictor(parity_model, device="cpu", settings=PredictorSettings(short_side=160))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(PARITY / "imageA_320x480.png").convert("RGB")


@pytest.fixture(scope="module")
def other() -> Image.Image:
    return Image.open(PARITY / "imageB_240x320.png").convert("RGB")


def test_batch_gives_the_same_results_as_one_at_a_time(predictor: Predictor, photo: Image.Image,
                                                        other: Image.Image) -> None:
    # Two size groups of two images each, so every image shares its forward with another.
    flipped = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    other_flipped = other.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    images = [photo, other, flipped, other_flipped]
    batch = predictor.encode(images)
    assert len({image.padded for image in batch}) == 2
    singles = [predictor.encode(img) for img in images]
    for k, single in enumerate(singles):
        a = predictor.semantic(batch, CLASSES, return_scores=True)[k]
        b = predictor.semantic(single, CLASSES, return_scores=True)[0]
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-4 * np.abs(b.scores).max())
        np.testing.assert_allclose(predictor.image_embeddings(batch)[k], predictor.image_embeddings(single)[0],
                                   atol=1e-5)
        assert predictor.caption(batch)[k] == predictor.caption(single)[0]
        assert predictor.ground(batch, ["the dog"])[k][0].query == predictor.ground(single, ["the dog"])[0][0].query


def test_outputs_are_in_original_coordinates(predictor: Predictor, other: Image.Image) -> None:
    features = predictor.encode(other)
    h, w = 240, 320
    assert predictor.semantic(features, CLASSES)[0].label_map.shape == (h, w)
    assert predictor.panoptic(features, CLASSES, stuff=["sky"])[0].segment_map.shape == (h, w)
    inst = predictor.instance(features, CLASSES)[0]
    assert inst.masks.shape[1:] == (h, w) and len(inst.masks) == 100  # 101 queries x 5 classes -> top 100
    assert np.all(np.diff(inst.scores) <= 0)
    assert predictor.ground(features, ["a dog", "the sky"])[0][1].mask.shape == (h, w)
    for region in predictor.region_embeddings(features)[0]:
        ys, xs = np.nonzero(region.mask)
        assert region.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert abs(np.linalg.norm(region.embedding) - 1) < 1e-5


def test_exif_orientation_is_applied(predictor: Predictor, other: Image.Image) -> None:
    upright = other
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    tagged = Image.open(io.BytesIO(buf.getvalue()))
    assert np.array_equal(to_rgb(tagged), np.asarray(upright))
    a = predictor.semantic(predictor.encode(tagged), CLASSES, return_scores=True)[0]
    b = predictor.semantic(predictor.encode(upright), CLASSES, return_scores=True)[0]
    assert a.label_map.shape == (240, 320)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4 * np.abs(b.scores).max())


@pytest.mark.parametrize("make", [
    lambda rgb: Image.fromarray(rgb).convert("L"),
    lambda rgb: Image.fromarray(rgb).convert("CMYK"),
    lambda rgb: Image.fromarray(rgb).convert("RGBA"),
    lambda rgb: Image.fromarray(rgb).convert("P"),
    lambda rgb: Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).convert("I;16"),
    lambda rgb: rgb[:, :, 0],
    lambda rgb: rgb.astype(np.float32) / 255.0,
    lambda rgb: rgb.astype(np.uint16) * 257,
    lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
], ids=["L", "CMYK", "RGBA", "P", "I;16", "gray-array", "float-array", "uint16-array", "rgba-array"])
def test_any_mode_becomes_rgb(make, other: Image.Image) -> None:  # type: ignore[no-untyped-def]
    rgb = np.asarray(other)
    out = to_rgb(make(rgb))
    assert out.dtype == np.uint8 and out.shape == (240, 320, 3)
    assert np.abs(out.astype(int).mean() - rgb.mean()) < 20  # same picture, not blank


def test_transparent_palette_composites_on_white() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    img.info["transparency"] = 0
    assert (to_rgb(img) == 255).all()


@pytest.mark.parametrize("bad", [np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 2), np.uint8),
                                 np.full((4, 4), np.nan), "not an image"])
def test_bad_inputs_say_what_is_wrong(bad: object) -> None:
    with pytest.raises(ImageInputError):
        to_rgb(bad)  # type: ignore[arg-type]


def test_class_embeddings_are_cached(parity_model: XDecoder, other: Image.Image) -> None:
    predictor = Predictor(parity_model, device="cpu", settings=PredictorSettings(short_side=128))
    calls = []
    hook = parity_model.language.register_forward_hook(lambda *_: calls.append(1))
    try:
        features = predictor.encode(other)
        predictor.semantic(features, CLASSES)
        first = len(calls)
        predictor.panoptic(features, CLASSES)
        predictor.instance(features, list(reversed(CLASSES)))
        assert len(calls) == first  # repeated (or reordered) class lists cost no text pass
        predictor.semantic(features, CLASSES + ["tree"])
        assert len(calls) == first + 1  # only the new name is embedded
    finally:
        hook.remove()


def test_class_embedding_cache_is_bounded(parity_model: XDecoder, other: Image.Image) -> None:
    """12 random class lists over 10 names with room for 5: the cache never holds more, keeps the most recently
    used, and a name embedded again after eviction gets the same vector."""
    predictor = Predictor(parity_model, device="cpu", settings=PredictorSettings(short_side=128, class_cache_size=5))
    rng = np.random.default_rng(7)
    names = [f"thing {i}" for i in range(10)]
    first = predictor.class_embeddings([names[0]])[0].clone()
    for _ in range(12):
        chosen = [names[i] for i in rng.choice(10, size=2, replace=False)]
        predictor.class_embeddings(chosen)
        cache = [name for _, name in predictor._class_embeddings]
        assert len(cache) <= 5 and set(chosen + ["background"]) <= set(cache[-3:])
    assert torch.allclose(predictor.class_embeddings([names[0]])[0], first)


def test_class_embeddings_are_cached_per_model_version(parity_model: XDecoder) -> None:
    """Weights loaded into the same model under a new version: the cached names are embedded again with the new
    weights (the text encoder's projection scaled by 1.5 and rotated: the cached vector would be stale)."""
    predictor = Predictor(parity_model, device="cpu", settings=PredictorSettings(short_side=128))
    predictor.version = "v1"
    before = predictor.class_embeddings(["dog"])
    projection = parity_model.language.lang_proj
    saved = projection.detach().clone()
    try:
        with torch.no_grad():
            projection.copy_(1.5 * projection.roll(1, dims=-1))
        assert torch.equal(predictor.class_embeddings(["dog"]), before)  # same version: the cache answers
        predictor.version = "v2"
        after = predictor.class_embeddings(["dog"])
        assert not torch.allclose(after, before, atol=1e-3)
        assert {v for v, _ in predictor._class_embeddings} == {"v1", "v2"}
    finally:
        with torch.no_grad():
            projection.copy_(saved)


def test_empty_inputs_are_rejected(predictor: Predictor, other: Image.Image) -> None:
    features = predictor.encode(other)
    with pytest.raises(ValueError, match="class_names"):
        predictor.semantic(features, [])
    with pytest.raises(ValueError, match="phrases"):
        predictor.ground(features, [])


def test_region_captioning(predictor: Predictor, other: Image.Image) -> None:
    features = predictor.encode(other)
    full = np.ones((240, 320), dtype=bool)
    # A region covering everything blocks nothing: the plain caption.
    assert predictor.caption_ids(features, [full]) == predictor.caption_ids(features)
    corner = np.zeros((240, 320), dtype=bool)
    corner[:60, :80] = True
    assert isinstance(predictor.caption(features, [corner])[0], str)
    # In a batch, each image keeps its own region (or none).
    pair = predictor.encode([other, other.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    flipped = predictor.encode(other.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert predictor.caption_ids(pair, [corner, None]) == \
        predictor.caption_ids(features, [corner]) + predictor.caption_ids(flipped)
    with pytest.raises(ValueError, match="shape"):
        predictor.caption(features, [np.ones((10, 10), dtype=bool)])


def test_retrieval_embeddings_score_like_the_official_ensemble(predictor: Predictor, photo: Image.Image) -> None:
    features = predictor.encode(photo)
    image = predictor.image_embeddings(features)
    assert image.shape == (1, 128) and abs(np.linalg.norm(image[0]) - 1) < 1e-5
    texts = ["a car", "a dog on grass"]
    t = predictor.text_embeddings(texts)
    a = features.images[0].embeddings[-1].numpy()
    with torch.inference_mode():
        b = predictor.model.backbone_embedding(features.images[0].res5)[0].numpy()
    expected = 0.5 * (t @ a / np.linalg.norm(a)) + 0.5 * (t @ b / np.linalg.norm(b))
    np.testing.assert_allclose(image @ predictor.text_query_embeddings(texts).T, expected[None], atol=1e-6)


def test_the_decoder_weight_moves_the_score_between_the_two_cosines(parity_model: XDecoder,
                                                                     photo: Image.Image) -> None:
    """12 seeded weights in [0, 1] (the ends included), 3 texts each: a query scores
    w*cos(decoder) + (1-w)*cos(backbone) against the stored vectors, which do not depend on w."""
    rng = np.random.default_rng(7)
    texts = ["a car", "a dog on grass", "two people"]
    stored = None
    for w in [0.0, 1.0, *rng.uniform(0, 1, 10)]:
        predictor = Predictor(parity_model, device="cpu",
                              settings=PredictorSettings(short_side=160, retrieval_decoder_weight=float(w)))
        features = predictor.encode(photo)
        image = predictor.image_embeddings(features)
        stored = image if stored is None else stored
        np.testing.assert_array_equal(image, stored)
        t = predictor.text_embeddings(texts)
        a = features.images[0].embeddings[-1].numpy()
        with torch.inference_mode():
            b = predictor.model.backbone_embedding(features.images[0].res5)[0].numpy()
        expected = w * (t @ a / np.linalg.norm(a)) + (1 - w) * (t @ b / np.linalg.norm(b))
        np.testing.assert_allclose(image @ predictor.text_query_embeddings(texts).T, expected[None], atol=1e-6)
    for bad in (-0.1, 1.5, float("nan")):
        predictor = Predictor(parity_model, device="cpu", settings=PredictorSettings(retrieval_decoder_weight=bad))
        with pytest.raises(ValueError, match="retrieval_decoder_weight"):
            predictor.text_query_embeddings(["a car"])


def test_autocast_path_runs_and_stays_close(parity_model: XDecoder, other: Image.Image) -> None:
    """The CUDA fp16/bf16 path, exercised on the CPU in bfloat16 (no GPU here)."""
    exact = Predictor(parity_model, device="cpu", settings=PredictorSettings(short_side=128))
    mixed = Predictor(parity_model, device="cpu", settings=PredictorSettings(short_side=128), autocast=True)
    images = [other, other.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    fa, fb = exact.encode(images), mixed.encode(images)
    a, b = exact.image_embeddings(fa), mixed.image_embeddings(fb)
    cosines = (a * b).sum(1)
    agreement = [float((x.label_map == y.label_map).mean())
                 for x, y in zip(exact.semantic(fa, CLASSES), mixed.semantic(fb, CLASSES), strict=True)]
    print(f"\nbf16 autocast vs fp32: embedding cosines {cosines.round(4)}, label-map agreement {agreement}")
    assert cosines.min() > 0.99 and min(agreement) > 0.9
    # Every task returns float32/bool numpy outputs under autocast too.
    assert mixed.instance(fb, CLASSES)[0].scores.dtype == np.float32
    assert mixed.panoptic(fb, CLASSES, stuff=["sky"])[0].segment_map.shape == (240, 320)
    assert mixed.ground(fb, ["a dog"])[0][0].logits.dtype == np.float32
    assert isinstance(mixed.region_embeddings(fb)[0], list) and isinstance(mixed.caption(fb)[0], str)


def test_uncertainty_ranks_ambiguous_outputs_higher(predictor: Predictor, other: Image.Image) -> None:
    from xdecoder.postprocess import uncertainty

    q, k = 11, 3
    confident_logits = torch.full((q, k + 1), -10.0)
    confident_logits[:, 0] = 10.0
    confident_masks = torch.full((q, 8, 8), 10.0)
    unsure_logits = torch.zeros((q, k + 1))
    unsure_masks = torch.zeros((q, 8, 8))
    low, high = uncertainty(confident_logits, confident_masks), uncertainty(unsure_logits, unsure_masks)
    assert 0 <= low < 0.05 and high > 0.9
    scores = predictor.uncertainty(predictor.encode([other, other]), CLASSES)
    assert scores.shape == (2,) and 0 <= scores.min() <= scores.max() <= 1 and scores[0] == pytest.approx(scores[1])


@pytest.mark.parametrize(("text", "expected"), [
    # Expected strings follow transformers 4.34's clean_up_tokenization (the official decode): the space goes
    # before . ? ! , and before 's 're 've 'm n't, and " ' " becomes "'"; nothing else changes.
    ("a man 's dog , running on the grass", "a man's dog, running on the grass"),
    ("is it a cat ?", "is it a cat?"),
    ("they 're here ! we 've seen it , i 'm sure", "they're here! we've seen it, i'm sure"),
    ("he does n't know", "he does n 't know"),  # CLIP's BPE splits "n't" as "n 't": the " n't" rule never fires
    ("he isn't here", "he isn 't here"),  # BPE splits "isn 't": no rule joins " 't"
    ("rock ' n ' roll , a band", "rock'n'roll, a band"),
    ("a dog running on the grass", "a dog running on the grass"),
])
def test_caption_text_is_cleaned_up_like_the_official_decode(predictor: Predictor, text: str,
                                                             expected: str) -> None:
    ids, mask = predictor.tokenizer([text])
    row = ids[0, : int(mask[0].sum())].tolist()
    # As greedy decoding leaves it: start token, caption, end token, start-token filler.
    assert predictor.tokenizer.decode_caption(row + [49406] * 5) == expected


def _crafted(features: Features, masks: dict[int, Tensor], embeddings: dict[int, Tensor]) -> Features:
    """The image's features with every query's mask empty except ``masks``, and some embeddings replaced."""
    image = features.images[0]
    logits = torch.full_like(image.mask_logits, -10.0)
    emb = image.embeddings.clone()
    for q, m in masks.items():
        logits[q] = m
    for q, e in embeddings.items():
        emb[q] = e
    return Features([dataclasses.replace(image, mask_logits=logits, embeddings=emb)])


def test_weak_and_empty_region_queries_are_rejected(parity_model: XDecoder, other: Image.Image) -> None:
    """Crafted queries on a real image's features: a confident mask on an object-like embedding, a barely-positive
    mask on a typical query, a confident mask on a background-like embedding, and an empty mask. Only the
    first is a region at the default threshold."""
    predictor = Predictor(parity_model, device="cpu", settings=PredictorSettings(short_side=160))
    features = predictor.encode(other)
    h4, w4 = features.images[0].mask_logits.shape[1:]
    with torch.inference_mode():
        names = predictor.class_embeddings(predictor.settings.region_vocabulary)
    # Along the object - background direction: the most object-like and background-like embeddings.
    obj = (names[0] - names[-1]) / (names[0] - names[-1]).norm()
    background = -obj

    def box(k: int, value: float) -> Tensor:  # disjoint boxes, so de-duplication plays no part
        m = torch.full((h4, w4), -10.0)
        m[2:12, 2 + 14 * k: 12 + 14 * k] = value
        return m

    strong, background_like, empty = 3, 11, 20
    with torch.inference_mode():  # weak: the query of median objectness, given a barely-positive mask
        real = predictor.region_objectness(features.images[0])[:-1]
    weak = int(real.argsort()[len(real) // 2])
    assert 0.1 < real[weak] < 0.9 and weak not in (strong, background_like, empty)
    crafted = _crafted(features, {strong: box(0, 10.0), weak: box(1, 0.05), background_like: box(2, 10.0),
                                  empty: torch.full((h4, w4), -10.0)},
                       {strong: obj, background_like: background})
    with torch.inference_mode():
        objectness = predictor.region_objectness(crafted.images[0])
        scores, _ = predictor.region_scores(crafted.images[0])
    assert objectness[strong] > 0.9 and objectness[background_like] < 0.1  # the crafting did what it meant
    regions = predictor.region_embeddings(crafted)[0]
    assert [r.query for r in regions] == [strong]
    assert regions[0].score > 0.9 and regions[0].mask.any()
    # The old score (mean mask probability inside the mask) let all three non-empty ones through.
    assert scores[empty] == 0 and scores[weak] < 0.5 and scores[background_like] < 0.1


def test_region_count_follows_the_threshold(parity_model: XDecoder, photo: Image.Image) -> None:
    """Thresholds 0, 0.05, ..., 1 on one image: the regions kept at a higher threshold are a subset of those
    kept at a lower one, every kept score is above its threshold, and the count takes several values."""
    predictor = Predictor(parity_model, device="cpu",
                          settings=PredictorSettings(short_side=160, max_regions=101))
    features = predictor.encode(photo)
    previous: set[int] | None = None
    counts = []
    for threshold in np.linspace(0, 1, 21):
        predictor.settings = dataclasses.replace(predictor.settings, region_min_score=float(threshold))
        regions = predictor.region_embeddings(features)[0]
        kept = {r.query for r in regions}
        assert all(r.score >= threshold for r in regions)
        if previous is not None:
            assert kept <= previous
        previous = kept
        counts.append(len(kept))
    assert counts[0] > 0 and counts[-1] == 0 and len(set(counts)) >= 3, counts


def test_bit_depth_comes_from_the_dtype_not_the_values() -> None:
    """A dark 16-bit image (every value <= 255) stays dark; 8-bit and wide-integer 0-255 arrays keep their values;
    PIL's 32-bit 'I' mode (16-bit grayscale files) is 16-bit; wide integers past 255 are refused."""
    dark = np.full((4, 4), 200, dtype=np.uint16)
    assert (to_rgb(dark) == 0).all()  # 200/65535 of full scale
    assert (to_rgb(np.full((4, 4), 51400, dtype=np.uint16)) == 200).all()
    assert (to_rgb(np.full((4, 4), 200, dtype=np.uint8)) == 200).all()
    assert (to_rgb(np.full((4, 4), 200, dtype=np.int64)) == 200).all()
    assert (to_rgb(np.full((4, 4), -5, dtype=np.int16)) == 0).all()
    assert (to_rgb(Image.fromarray(np.full((4, 4), 51400, dtype=np.int32), mode="I")) == 200).all()
    with pytest.raises(ImageInputError, match="uint16"):
        to_rgb(np.full((4, 4), 1000, dtype=np.int32))


def test_packed_masks_round_trip_and_their_boxes_equal_numpys_extent() -> None:
    """300 seeded random masks (0-40 x 0-40, empty, full, single pixels, blobs): packing then unpacking
    gives the mask back; box and area equal np.nonzero's extent and count; a stack reads back in order."""
    from xdecoder.masks import MaskStack, PackedMask
    from xdecoder.postprocess import masks_to_boxes

    rng = np.random.default_rng(11)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 41, 2))
        mask = rng.random((h, w)) > rng.choice([0.0, 0.5, 0.97, 1.0])
        p = PackedMask.from_dense(torch.from_numpy(mask))
        assert np.array_equal(p.dense(), mask)
        ys, xs = np.nonzero(mask)
        assert p.box == ((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if ys.size else (0, 0, 0, 0))
        assert p.area == int(mask.sum()) and p.nbytes <= (h * (w + 7)) // 8
        assert masks_to_boxes(torch.from_numpy(mask)[None])[0].tolist() == list(p.box)
        rows = PackedMask.from_rows(np.packbits(mask, axis=1), (h, w))  # built without the dense mask
        assert np.array_equal(rows.dense(), mask) and (rows.box, rows.area) == (p.box, p.area)
    dense = rng.random((20, 7, 9)) > rng.choice([0.0, 0.5, 0.97, 1.0], (20, 1, 1))
    stack = MaskStack([PackedMask.from_dense(m) for m in dense], (7, 9))
    assert np.array_equal(np.asarray(stack), dense) and stack.shape == dense.shape
    assert all(np.array_equal(stack[i], m) for i, m in enumerate(dense))
    assert np.array_equal(stack[5:9][1], dense[6])


def test_pixel_budget_applies_only_past_it() -> None:
    """500 seeded random image sizes (1-40000 px a side, aspect ratios up to 400:1): within the budget the
    resized size is the official demo's Resize(short_side) arithmetic, no cap (the reference below is
    torchvision's, written out); past it, the area is at most the budget and the aspect ratio is kept."""
    from xdecoder.predictor import PredictorSettings
    from xdecoder.transforms import resized_shape

    budget = PredictorSettings().max_pixels
    assert budget is not None
    rng = np.random.default_rng(3)
    for _ in range(500):
        h, w = (int(v) for v in np.exp(rng.uniform(0, np.log(40000), 2)))
        short_side = int(rng.choice([160, 512, 800]))
        short, long = min(h, w), max(h, w)
        official = (short_side, int(short_side * long / short))
        official = official if h <= w else official[::-1]
        got = resized_shape(h, w, short_side, None, budget)
        if official[0] * official[1] <= budget:
            assert got == official, (h, w, short_side)
        else:
            assert got[0] * got[1] <= budget and got[0] * got[1] >= 0.99 * budget * (1 - 2 / min(got))
            assert abs(got[0] / got[1] - official[0] / official[1]) <= 2 / min(got) * official[0] / official[1]

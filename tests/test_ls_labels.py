"""Labels by meaning, one vocabulary per control, routing and scoped thresholds (no server needed).

The model is the bundled one (trained on the synthetic shape scenes it is tested on), so "the label a
person would pick" can be checked against the scenes' own ground truth; its text encoder is the one
matching by meaning uses. Random trials are seeded and say how many they run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from annotator.convert import result_label, result_to_mask
from annotator.labeling import parse_labeling_config
from annotator.prelabel import LabelTally, PrelabelSettings, predictions, regions
from annotator.project import PrelabelReport, label_summary
from annotator.vocabulary import DEFAULT_MARGIN, Vocabulary, match_phrase, model_text_encoder
from bench.ls_walkthrough import CONFIG, SCENES
from xdecoder import Predictor, build_model, load_checkpoint
from xdecoder.predictor import PredictorSettings
from xdecoder.training.synthetic import CLASSES, STUFF, make_scenes
from xdlabel.settings import BUNDLED_CHECKPOINT

README_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image" model_score_threshold="0.4">
    <Label value="Car" predicted_values="car,truck"/>
    <Label value="Road" stuff="true"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Car"/></PolygonLabels>
  <RectangleLabels name="box" toName="image"><Label value="Car" model_score_threshold="0.7"/></RectangleLabels>
  <TextArea name="caption" toName="image"/>
</View>"""

# Shapes: balls in a brush, boxes as polygons (also offered as rectangles), triangles as boxes only,
# the ground as brush stuff; "Circle" in the polygon control beside "circle" in the brush one.
SHAPES_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Ball" predicted_values="circle"/>
    <Label value="Sky" stuff="true"/><Label value="Grass" stuff="true"/>
    <Label value="Sand" stuff="true"/><Label value="Water" stuff="true"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Box" predicted_values="square"/>
    <Label value="Circle"/></PolygonLabels>
  <RectangleLabels name="rect" toName="image"><Label value="Box" predicted_values="square"/>
    <Label value="Triangle"/></RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def bundled() -> Predictor:
    meta = json.loads(BUNDLED_CHECKPOINT.with_suffix(".json").read_text())
    model = build_model(meta["config"])
    load_checkpoint(model, BUNDLED_CHECKPOINT)
    return Predictor(model, settings=PredictorSettings(short_side=meta["short_side"], caption_steps=2))


# -- vocabulary rules ------------------------------------------------------------------------------

def test_phrase_rules_in_order_explicit_mapping_exact_words() -> None:
    v = Vocabulary(("Circle", "Water", "Car"), {"Water": ("water", "lake"), "Car": ("car", "truck")})
    assert match_phrase("Water: the thing on the left", v) == match_phrase("water:the thing on the left", v)
    explicit = match_phrase("WATER:  the thing on the left", v)
    assert (explicit.label, explicit.phrase, explicit.how) == ("Water", "the thing on the left", "explicit")
    assert match_phrase("Dog: a dog", v).how == "ambiguous"  # not a label: the whole text is the phrase
    assert match_phrase("Dog: a dog", v).phrase == "Dog: a dog"
    assert match_phrase("the grass", v, mapping={"The  Grass": "circle"}).label == "Circle"  # mapping, folded
    assert match_phrase("the lake", v, mapping={"the lake": "Car"}).label == "Car"  # mapping beats words
    assert match_phrase("the lake", v, mapping={"the lake": "Nope"}).label == "Water"  # unknown target: next rule
    assert (match_phrase("  LAKE ", v).label, match_phrase("  LAKE ", v).how) == ("Water", "exact")
    assert match_phrase("two red trucks", v).label == "Car"  # plural, whole words
    assert match_phrase("the carpet", v).how == "ambiguous"  # "car" is not a word of it
    # a referring phrase names its object first
    assert match_phrase("the truck left of the circle", v).label == "Car"
    assert match_phrase("the circle left of the truck", v).label == "Circle"
    assert match_phrase("   ", v).how == "empty" and match_phrase("   ", v).label is None


def test_a_control_refuses_two_labels_that_differ_only_in_case() -> None:
    with pytest.raises(ValueError, match="names two labels"):
        Vocabulary(("Circle", "circle"))
    with pytest.raises(ValueError, match="names two labels"):
        Vocabulary(("Ball", "Disc"), {"Ball": ("circle",), "Disc": ("Circle",)})
    with pytest.raises(ValueError, match="names two labels"):  # through the labeling config as well
        parse_labeling_config('<View><Image name="i" value="$i"/><BrushLabels name="m" toName="i">'
                              '<Label value="Circle"/><Label value="circle"/></BrushLabels></View>')


def test_typed_phrases_get_the_label_a_person_would_pick(bundled: Predictor) -> None:
    """The issue's case: "the grass" and "the sky" came back as the first label (Circle)."""
    config = parse_labeling_config(SHAPES_CONFIG.replace('predicted_values="circle"', ""))
    brush = config.mask_target()
    assert brush is not None and brush.labels[0] == "Ball"
    encoder = model_text_encoder(bundled)
    expected = {"the grass": "Grass", "the sky": "Sky", "water": "Water", "sand at the bottom": "Sand",
                "Ball: the red one": "Ball", "the sky above the grass": "Sky"}
    for phrase, label in expected.items():
        assert match_phrase(phrase, brush.vocabulary, encoder).label == label, phrase


def test_meaning_picks_the_most_similar_label_only_by_the_margin(bundled: Predictor) -> None:
    """40 seeded trials: random label sets (names the model knows, in random case, prompts or not)
    and phrases that name no label, so rule 5 decides. Whatever it says agrees with the cosine
    similarities of the model's class embeddings computed here from the predictor itself: a label
    only when the best leads the next by the margin, else ambiguous with the gap under it."""
    words = ["the sea", "a lawn", "round thing", "cloud", "a car", "blue shape", "the ocean", "a field",
             "yellow", "small red", "a tree", "the beach", "big", "a dog", "something green"]
    encoder = model_text_encoder(bundled)
    decided = ambiguous = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        names = [str(n) for n in rng.choice(CLASSES, size=int(rng.integers(2, 6)), replace=False)]
        prompts: dict[str, tuple[str, ...]] = {}
        labels: list[str] = []
        for name in names:
            value = name.upper() if rng.random() < 0.3 else name.capitalize()
            if rng.random() < 0.5:  # an opaque value whose prompt is the known word
                value = f"L{seed}-{len(labels)}"
                prompts[value] = (name,)
            labels.append(value)
        vocabulary = Vocabulary(tuple(labels), prompts)
        phrase = str(rng.choice(words))
        if any(n in phrase.split() for n in names):
            continue
        match = match_phrase(phrase, vocabulary, encoder)
        texts = [prompts.get(label, (label,))[0] for label in labels]
        e = bundled.class_embeddings([phrase, *texts])[:-1].numpy().astype(np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        cosine = e[1:] @ e[0]
        order = np.argsort(-cosine)
        gap = cosine[order[0]] - cosine[order[1]]
        assert match.closest == labels[order[0]] and match.runner_up == labels[order[1]]
        assert match.similarity == pytest.approx(cosine[order[0]], abs=1e-5)
        if match.how == "meaning":
            decided += 1
            assert match.label == labels[order[0]] and gap >= DEFAULT_MARGIN - 1e-6
        else:
            ambiguous += 1
            assert match.how == "ambiguous" and match.label is None and gap < DEFAULT_MARGIN + 1e-6
    assert decided + ambiguous >= 30


# -- one vocabulary per control, scoped thresholds, routing ------------------------------------------

def test_the_readme_config_makes_no_duplicate_classes_and_scopes_its_thresholds() -> None:
    config = parse_labeling_config(README_CONFIG)
    # "Car" (polygon and rectangle labels without prompts) is the brush's "car", not a second class
    assert config.class_names == ("car", "truck", "Road") and config.stuff == {"Road"}
    mask, poly, box = config.targets
    assert dict(mask.thresholds) == {"Car": 0.4, "Road": 0.4}  # the control's threshold
    assert dict(poly.thresholds) == {"Car": 0.5}  # the default: box's 0.7 stays in box
    assert dict(box.thresholds) == {"Car": 0.7}
    routes = {name: [(t.from_name, label) for t, label in r] for name, r in config.routes.items()}
    assert routes == {"car": [("mask", "Car")], "truck": [("mask", "Car")], "Road": [("mask", "Road")]}
    every = parse_labeling_config(README_CONFIG, routing="every")
    assert [(t.from_name, label) for t, label in every.routes["truck"]] == [
        ("mask", "Car"), ("poly", "Car"), ("box", "Car")]
    # setting keys: plain for every control, "control:label" for one; --threshold over everything
    scoped = parse_labeling_config(README_CONFIG, thresholds={"Car": 0.6, "box:Car": 0.9, "Bus": 0.1,
                                                              "poly:Road": 0.2})
    assert [dict(t.thresholds) for t in scoped.targets] == [{"Car": 0.6, "Road": 0.4}, {"Car": 0.6}, {"Car": 0.9}]
    assert scoped.warnings == ("threshold for 'Bus': no control has that label",
                               "threshold for 'poly:Road': no control has that label")
    # the label's model_score_threshold over its control's
    boxed = parse_labeling_config(README_CONFIG.replace(
        '<RectangleLabels name="box" toName="image">',
        '<RectangleLabels name="box" toName="image" model_score_threshold="0.2"><Label value="Road"/>'))
    assert dict(boxed.targets[2].thresholds) == {"Car": 0.7, "Road": 0.2}
    forced = parse_labeling_config(README_CONFIG, thresholds={"box:Car": 0.9}, override=0.25)
    assert all(v == 0.25 for t in forced.targets for v in t.thresholds.values())
    mapped = parse_labeling_config(README_CONFIG, mapping={"lorry": "car", "zebra": "Horse"})
    assert "lorry" in mapped.class_names and mapped.routes["lorry"][0][1] == "Car"
    assert mapped.warnings == ("label mapping 'zebra' -> 'Horse': no control has that label",)


def test_routing_rule_holds_on_random_configs() -> None:
    """300 seeded random configs (1-4 controls of random kinds, labels from a pool in random case,
    some stuff): class names are unique case-insensitively; a class goes to a control only under a
    label of that control meaning it; each control at most once; with routing "tool" stuff never
    goes to boxes, and a region goes to the brush controls when one holds it, else the polygons, else
    the boxes."""
    pool = ["circle", "square", "triangle", "sky", "grass", "car", "road", "tree"]
    tags = {"brush": "BrushLabels", "polygon": "PolygonLabels", "rectangle": "RectangleLabels"}
    for seed in range(300):
        rng = np.random.default_rng(seed)
        stuff = {str(w) for w in rng.choice(pool, size=3, replace=False)}
        controls: list[tuple[str, str, list[str]]] = []
        xml = '<View><Image name="image" value="$image"/>'
        for c in range(int(rng.integers(1, 5))):
            kind = str(rng.choice(list(tags)))
            words = [str(w) for w in rng.choice(pool, size=int(rng.integers(1, 4)), replace=False)]
            controls.append((kind, f"c{c}", words))
            xml += f'<{tags[kind]} name="c{c}" toName="image">'
            for w in words:
                value = w.upper() if rng.random() < 0.4 else w
                xml += f'<Label value="{value}" stuff="true"/>' if w in stuff else f'<Label value="{value}"/>'
            xml += f"</{tags[kind]}>"
        xml += "</View>"
        config = parse_labeling_config(xml)
        assert len({n.casefold() for n in config.class_names}) == len(config.class_names)
        for name, routes in config.routes.items():
            word = name.casefold()
            holders = [c for c in controls if word in c[2]]
            names = [t.from_name for t, _ in routes]
            assert len(names) == len(set(names))
            for target, label in routes:
                assert label.casefold() == word and target.label_named(label) == label
            kinds = [c[0] for c in holders if not (word in stuff and c[0] == "rectangle")]
            best = min(kinds, key=["brush", "polygon", "rectangle"].index) if kinds else None
            assert sorted(names) == sorted(c[1] for c in holders if c[0] == best), (seed, name)


# -- the model's regions, routed --------------------------------------------------------------------

def test_each_object_is_one_region_per_control_and_each_mask_has_one_label(bundled: Predictor) -> None:
    """Shape scenes (4 seeded), panoptic and instance: every region sits in the control its label's tool
    is (balls and the ground in the brush, boxes as polygons only, triangles as rectangles, no
    "Circle" polygon from the duplicate spelling), no control shows one object twice (masks, or boxes,
    overlapping by IoU >= 0.8), and the tally counts what was made and what fell under the threshold,
    per control and label."""
    scenes = make_scenes(4, seed=3, size=(96, 64))
    features = bundled.encode([s.image for s in scenes])
    settings = PrelabelSettings(min_area=1, captions=False)
    allowed = {("mask", "Ball"), ("mask", "Sky"), ("mask", "Grass"), ("mask", "Sand"), ("mask", "Water"),
               ("poly", "Box"), ("rect", "Triangle")}
    for task in ("panoptic", "instance"):
        config = parse_labeling_config(SHAPES_CONFIG, task, default_threshold=0.3)
        assert "Circle" not in config.class_names and "circle" in config.class_names
        candidates = regions(bundled, features, config)
        tally = LabelTally()
        out = predictions(bundled, features, config, "v", settings, tally=tally)
        made = under = 0
        for image_regions, prediction in zip(candidates, out, strict=True):
            by_control: dict[str, list[np.ndarray]] = {}
            for result in prediction["result"]:
                key = (result["from_name"], result_label(result))
                assert key in allowed, (task, key)
                mask = result_to_mask(result)
                assert mask is not None
                for other in by_control.get(key[0], []):  # one object once per control
                    assert (mask & other).sum() < 0.8 * (mask | other).sum(), f"{task}: one object twice in {key[0]}"
                by_control.setdefault(key[0], []).append(mask)
            kept = [r for r in image_regions if r.mask.any()]  # min_area 1: only empty masks are dropped
            for region in kept:
                assert len(config.routes[region.label]) == 1  # this config has one tool per label
            under += sum(r.score < 0.3 for r in kept)
            made += len(prediction["result"])
            # every kept region over the threshold is shown, unless its control shows that object already
            assert len(prediction["result"]) <= sum(r.score >= 0.3 for r in kept)
        assert sum(tally.made.values()) == made and sum(tally.under.values()) == under
        summary = tally.summary(config)
        assert [(r["control"], r["label"]) for r in summary][:2] == [("mask", "Ball"), ("mask", "Sky")]
        assert all(r["found"] == bool(r["regions"] or r["under_threshold"]) for r in summary)
        assert not next(r for r in summary if r["control"] == "poly" and r["label"] == "Circle")["found"]
        assert [(r["control"], r["label"]) for r in summary if not r["routed"]] == [("poly", "Circle"), ("rect", "Box")]
    assert set(STUFF) <= set(CLASSES)


def test_label_map_and_routing_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """XDLABEL_LS_LABEL_MAP (JSON, phrase -> label) adds a prompt for that label, routed to it;
    XDLABEL_LS_ROUTING=every sends a region to every control holding its label."""
    from xdlabel.settings import Settings

    monkeypatch.setenv("XDLABEL_LS_LABEL_MAP", '{"lorry": "car"}')
    monkeypatch.setenv("XDLABEL_LS_ROUTING", "every")
    settings = Settings()
    assert settings.ls_label_map == {"lorry": "car"} and settings.ls_routing == "every"
    config = parse_labeling_config(README_CONFIG, mapping=settings.ls_label_map, routing=settings.ls_routing)
    assert [(t.from_name, label) for t, label in config.routes["lorry"]] == [
        ("mask", "Car"), ("poly", "Car"), ("box", "Car")]
    assert match_phrase("Lorry", config.targets[0].vocabulary).label == "Car"  # exact, case-insensitive


def test_the_readme_walkthrough_shows_the_config_and_summary_its_script_runs(bundled: Predictor) -> None:
    """README's "Label Studio for teams" shows bench/ls_walkthrough.py's config, and the per-label table
    `xdlabel prelabel` prints for its 20 scenes, computed here with the same model and settings."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert CONFIG in readme
    config = parse_labeling_config(CONFIG)
    scenes = make_scenes(**SCENES)
    tally = LabelTally()
    for start in range(0, len(scenes), 4):  # the command's batches
        features = bundled.encode([s.image for s in scenes[start:start + 4]])
        predictions(bundled, features, config, "v", PrelabelSettings(captions=False), tally=tally)
    table = label_summary(PrelabelReport(predicted=len(scenes), labels=tally.summary(config)))
    assert table in readme, table

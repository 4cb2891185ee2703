"""What a Label Studio project asks for, read from its labeling config (label-studio-sdk's parser).

Each ``BrushLabels`` / ``PolygonLabels`` / ``RectangleLabels`` control is one vocabulary: its labels,
each with the prompts X-Decoder sees (``predicted_values="car,truck"``, else the value), compared
case-insensitively. X-Decoder runs once over every control's prompts, deduplicated the same way, so
"Circle" in one control and "circle" in another are one class, not two splitting its probability.
``stuff="true"`` marks an amorphous label (one merged region in panoptic mode).

Routing, a region's controls (``routing="tool"``, the default): a stuff region goes to every
BrushLabels control that holds its class, else to the PolygonLabels ones, never to boxes; a thing
goes to every BrushLabels control that holds it, else to the PolygonLabels ones, else to the
RectangleLabels ones. So each object lands once per control, in the project's tool for that label.
``routing="every"`` sends a region to every control that holds its class.

Thresholds, most specific first: ``override`` (``prelabel --threshold``) for every label; the
``thresholds`` setting by ``"control:label"``, then by ``"label"``; the config's
``model_score_threshold`` on the label, then on its control; then ``default_threshold``. Each
applies only within its control. Setting keys and mapping targets naming no label are kept in
``warnings`` (the caller reports them) rather than ignored silently.

A ``TextArea`` receives the caption (one with ``smart="true"`` is an interactive prompt box instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface

from annotator.vocabulary import Vocabulary, fold

MASK_CONTROLS = {"BrushLabels": "brush", "PolygonLabels": "polygon", "RectangleLabels": "rectangle"}
TASKS = ("panoptic", "instance", "semantic")
ROUTINGS = ("tool", "every")
_TOOL_ORDER = {"brush": 0, "polygon": 1, "rectangle": 2}


@dataclass(frozen=True)
class Target:
    """One control tag that receives regions, with its own vocabulary and thresholds."""

    kind: str  # brush | polygon | rectangle
    from_name: str
    to_name: str
    vocabulary: Vocabulary
    thresholds: Mapping[str, float] = field(default_factory=dict)  # label value -> minimum score
    stuff: frozenset[str] = frozenset()  # label values

    @property
    def labels(self) -> tuple[str, ...]:
        return self.vocabulary.labels

    def label_named(self, name: str) -> str | None:
        """The control's label whose value is ``name``, compared case-insensitively."""
        return next((v for v in self.labels if fold(v) == fold(name)), None)


@dataclass(frozen=True)
class LabelingConfig:
    image: str  # name of the <Image> tag
    image_key: str  # key of the image URL in task data
    targets: tuple[Target, ...]
    caption: str | None  # from_name of the caption TextArea
    class_names: tuple[str, ...]  # X-Decoder's class list: every control's prompts, once each
    stuff: frozenset[str]  # class names of amorphous labels
    routes: Mapping[str, tuple[tuple[Target, str], ...]]  # class name -> (control, its label) to fill
    task: str
    warnings: tuple[str, ...] = ()

    @property
    def prompts(self) -> dict[str, str]:
        """Class name -> the label of the first control it is routed to (or that holds it)."""
        out = {}
        for name in self.class_names:
            routes = self.routes.get(name, ())
            label = routes[0][1] if routes else next(
                (found for t in self.targets if (found := t.vocabulary.exact(name)) is not None), None)
            if label is not None:
                out[name] = label
        return out

    @property
    def labels(self) -> list[str]:
        """The label values of every target, in config order, once each (case-insensitively)."""
        seen: dict[str, str] = {}
        for t in self.targets:
            for label in t.labels:
                seen.setdefault(fold(label), label)
        return list(seen.values())

    @property
    def stuff_labels(self) -> frozenset[str]:
        return frozenset(fold(label) for t in self.targets for label in t.stuff)

    def targets_for(self, label: str) -> list[Target]:
        return [t for t in self.targets if t.label_named(label) is not None]

    def mask_target(self, label: str | None = None) -> Target | None:
        """The control an interactive region goes to: the project's tool for ``label`` (brush,
        else polygon, else rectangle), or for any label when ``label`` is None or unknown."""
        pool = (self.targets_for(label) if label else []) or list(self.targets)
        return min(pool, key=lambda t: _TOOL_ORDER[t.kind]) if pool else None


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def _split(texts: str) -> list[str]:
    return [t.strip() for t in texts.split(",") if t.strip()]


def _route(candidates: list[tuple[Target, str]], is_stuff: bool, routing: str) -> tuple[tuple[Target, str], ...]:
    if routing == "every" or not candidates:
        return tuple(candidates)
    kinds = ("brush", "polygon") if is_stuff else ("brush", "polygon", "rectangle")
    for kind in kinds:
        chosen = [(t, label) for t, label in candidates if t.kind == kind]
        if chosen:
            return tuple(chosen)
    return ()


def parse_labeling_config(xml: str, task: str = "auto", default_threshold: float = 0.5,
                          thresholds: Mapping[str, float] | None = None, *,
                          mapping: Mapping[str, str] | None = None, routing: str = "tool",
                          override: float | None = None) -> LabelingConfig:
    """``task`` auto: panoptic when a BrushLabels tag is present (it can hold stuff and things),
    else instance. ``mapping`` (phrase -> label value) adds prompts to the controls holding that
    label. Threshold precedence and routing: see the module docstring."""
    if task not in ("auto", *TASKS):
        raise ValueError(f"unknown task {task!r}; choose auto or one of {TASKS}")
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; choose one of {ROUTINGS}")
    try:
        interface = LabelInterface(xml)
    except Exception as err:  # noqa: BLE001 - the SDK raises several kinds for malformed XML
        raise ValueError(f"the labeling config cannot be parsed: {err}") from err
    images = [o for o in interface.objects if o.tag == "Image"]
    if not images:
        raise ValueError("the labeling config has no <Image> tag")
    image = images[0]
    settings_limits = dict(thresholds or {})
    mapped: dict[str, list[str]] = {}  # folded label value -> extra prompts
    for phrase, label in (mapping or {}).items():
        mapped.setdefault(fold(label), []).append(phrase)
    targets: list[Target] = []
    caption = None
    used_keys: set[str] = set()
    for control in interface.controls:
        if image.name not in (control.to_name or []):
            continue
        if control.tag == "TextArea" and caption is None and not _truthy(control.attr.get("smart")):
            caption = control.name
        if control.tag not in MASK_CONTROLS:
            continue
        control_limit = control.attr.get("model_score_threshold")
        prompts: dict[str, tuple[str, ...]] = {}
        limits: dict[str, float] = {}
        stuff: set[str] = set()
        labels = list(control.labels)
        for value in labels:
            attrs = (control.labels_attrs or {}).get(value)
            own = _split((attrs.attr.get("predicted_values") if attrs else None) or value)
            prompts[value] = tuple(dict.fromkeys([*own, *mapped.get(fold(value), [])]))
            if attrs is not None and _truthy(attrs.attr.get("stuff")):
                stuff.add(value)
            limit: float | str | None = (attrs.attr.get("model_score_threshold") if attrs else None) or control_limit
            for key in (value, f"{control.name}:{value}"):  # the scoped key wins over the plain one
                if key in settings_limits:
                    limit = settings_limits[key]
                    used_keys.add(key)
            limits[value] = float(default_threshold if limit is None else limit) if override is None else override
        vocabulary = Vocabulary(tuple(labels), prompts)  # refuses a prompt shared by two labels
        targets.append(Target(MASK_CONTROLS[control.tag], control.name, image.name, vocabulary, limits,
                              frozenset(stuff)))
    if not targets and caption is None:
        raise ValueError("the labeling config has no BrushLabels, PolygonLabels, RectangleLabels or TextArea "
                         f"tag for the image {image.name!r}: nothing for X-Decoder to fill in")
    if task == "auto":
        task = "panoptic" if any(t.kind == "brush" for t in targets) else "instance"
    class_names: dict[str, str] = {}  # folded -> first spelling
    owners: dict[str, set[str]] = {}  # folded class -> folded label values that claim it
    stuff_classes: set[str] = set()
    for t in targets:
        for label in t.labels:
            for text in t.vocabulary.texts(label):
                key = fold(text)
                class_names.setdefault(key, text)
                owners.setdefault(key, set()).add(fold(label))
                if label in t.stuff:
                    stuff_classes.add(key)
    # the model sees prompts only; a label's value is matched against, unless it is its prompt
    sent = {fold(p): class_names[fold(p)] for t in targets for label in t.labels
            for p in t.vocabulary.prompts.get(label, (label,))}
    routes: dict[str, tuple[tuple[Target, str], ...]] = {}
    for key, name in sent.items():
        candidates: list[tuple[Target, str]] = []
        for t in targets:
            found = t.vocabulary.exact(name)
            if found is None:  # another control's label of the same value ("truck" -> Car)
                found = next((v for v in t.labels if fold(v) in owners[key]), None)
            if found is not None:
                candidates.append((t, found))
        routes[name] = _route(candidates, key in stuff_classes, routing)
    warnings = [f"threshold for {k!r}: no control has that label" for k in settings_limits if k not in used_keys]
    known = {fold(label) for t in targets for label in t.labels}
    warnings += [f"label mapping {phrase!r} -> {label!r}: no control has that label"
                 for phrase, label in (mapping or {}).items() if fold(label) not in known]
    return LabelingConfig(image.name, image.value.lstrip("$"), tuple(targets), caption, tuple(sent.values()),
                          frozenset(sent[k] for k in sent if k in stuff_classes), routes, task, tuple(warnings))

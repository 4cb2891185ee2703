"""What a Label Studio project asks for, read from its labeling config (label-studio-sdk's parser).

Class names come from the labels of ``BrushLabels`` / ``PolygonLabels`` / ``RectangleLabels``. A
label's text prompt for X-Decoder defaults to its value; ``predicted_values="car,truck"`` gives it
other prompts (as Label Studio's own ML backends do), ``stuff="true"`` marks an amorphous class
(one merged region in panoptic mode), and ``model_score_threshold`` on a control or a label sets
the minimum score. A ``TextArea`` receives the caption (one with ``smart="true"`` is an interactive
prompt box instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

MASK_CONTROLS = {"BrushLabels": "brush", "PolygonLabels": "polygon", "RectangleLabels": "rectangle"}
TASKS = ("panoptic", "instance", "semantic")


@dataclass(frozen=True)
class Target:
    """One control tag that receives regions."""

    kind: str  # brush | polygon | rectangle
    from_name: str
    to_name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelingConfig:
    image: str  # name of the <Image> tag
    image_key: str  # key of the image URL in task data
    targets: tuple[Target, ...]
    caption: str | None  # from_name of the caption TextArea
    prompts: dict[str, str]  # X-Decoder prompt text -> label value
    stuff: frozenset[str]  # prompt texts of amorphous classes
    thresholds: dict[str, float]  # label value -> minimum score
    task: str

    @property
    def class_names(self) -> list[str]:
        """X-Decoder's class list: the prompt texts."""
        return list(self.prompts)

    @property
    def labels(self) -> list[str]:
        """The label values of every target, in config order, once each."""
        return list(dict.fromkeys(label for t in self.targets for label in t.labels))

    def targets_for(self, label: str) -> list[Target]:
        return [t for t in self.targets if label in t.labels]


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def parse_labeling_config(xml: str, task: str = "auto", default_threshold: float = 0.5,
                          thresholds: Mapping[str, float] | None = None) -> LabelingConfig:
    """``task`` auto: panoptic when a BrushLabels tag is present (it can hold stuff and things),
    else instance. ``thresholds`` (per label value) win over the config's ``model_score_threshold``."""
    if task not in ("auto", *TASKS):
        raise ValueError(f"unknown task {task!r}; choose auto or one of {TASKS}")
    try:
        interface = LabelInterface(xml)
    except Exception as err:  # noqa: BLE001 - the SDK raises several kinds for malformed XML
        raise ValueError(f"the labeling config cannot be parsed: {err}") from err
    images = [o for o in interface.objects if o.tag == "Image"]
    if not images:
        raise ValueError("the labeling config has no <Image> tag")
    image = images[0]
    targets: list[Target] = []
    prompts: dict[str, str] = {}
    stuff: set[str] = set()
    limits: dict[str, float] = {}
    caption = None
    for control in interface.controls:
        if image.name not in (control.to_name or []):
            continue
        if control.tag == "TextArea" and caption is None and not _truthy(control.attr.get("smart")):
            caption = control.name
        if control.tag not in MASK_CONTROLS:
            continue
        targets.append(Target(MASK_CONTROLS[control.tag], control.name, image.name, tuple(control.labels)))
        control_limit = control.attr.get("model_score_threshold")
        for value, label in (control.labels_attrs or {}).items():
            texts = label.attr.get("predicted_values") or value
            for text in (t.strip() for t in texts.split(",")):
                if text and prompts.setdefault(text, value) != value:
                    raise ValueError(f"prompt {text!r} is given to two labels: {prompts[text]!r} and {value!r}")
                if _truthy(label.attr.get("stuff")):
                    stuff.add(text)
            limit = label.attr.get("model_score_threshold", control_limit)
            if limit is not None:
                limits[value] = float(limit)
    if not targets and caption is None:
        raise ValueError("the labeling config has no BrushLabels, PolygonLabels, RectangleLabels or TextArea "
                         f"tag for the image {image.name!r}: nothing for X-Decoder to fill in")
    if task == "auto":
        task = "panoptic" if any(t.kind == "brush" for t in targets) else "instance"
    every_label = {v for t in targets for v in t.labels}
    limits = {label: limits.get(label, default_threshold) for label in every_label} | dict(thresholds or {})
    return LabelingConfig(image.name, image.value.lstrip("$"), tuple(targets), caption, prompts,
                          frozenset(stuff), limits, task)

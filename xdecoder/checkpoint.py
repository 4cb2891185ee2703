"""Reading, strict loading and exporting of X-Decoder weights in the official key layout.

The released ``.pt`` files are flat ``OrderedDict``s of fp32 tensors named exactly as this
package names its modules (SPEC §2), so no renaming is needed. Unlike the official loader,
which silently keeps random weights for missing or mis-shaped keys, loading here is strict.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

HF_PREFIX = "hf://"
# Keys a released file may carry that the inference model does not need.
IGNORED_KEYS = frozenset({"criterion.empty_weight"})
# Buffers the model can recompute when a file lacks them.
RECOMPUTABLE_KEYS = frozenset({"sem_seg_head.predictor.self_attn_mask"})


class CheckpointError(ValueError):
    """The file does not fit the model; the message names the offending keys (the first 20 of
    each kind), the attributes list all of them."""

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    sha256: str
    num_tensors: int
    ignored: tuple[str, ...]


def resolve(source: str | os.PathLike[str]) -> Path:
    """A local path, or ``hf://<repo_owner>/<repo_name>/<file>`` fetched (and cached) with huggingface_hub."""
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        parts = text[len(HF_PREFIX):].split("/", 2)
        if len(parts) != 3:
            raise ValueError(f"expected hf://owner/repo/file, got {text!r}")
        from huggingface_hub import hf_hub_download  # only needed for hub sources

        return Path(hf_hub_download(repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2]))
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a flat state dict, got {type(state).__name__}")
    # Tolerate the usual wrappers of re-saved files; released files are flat.
    for wrapper in ("model", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Raise CheckpointError unless ``state`` fits ``model`` exactly; returns the ignored keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in RECOMPUTABLE_KEYS]
    unexpected = [k for k in state if k not in expected and k not in IGNORED_KEYS]
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_format_keys(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (file != model): {_format_keys(mismatched)}")
    if problems:
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        raise CheckpointError(f"checkpoint does not fit config {name!r}: " + "; ".join(problems),
                              missing, unexpected, mismatched)
    return [k for k in state if k in IGNORED_KEYS]


def load_state_dict(model: nn.Module, state: dict[str, Tensor], *, assign: bool = False) -> list[str]:
    """Strictly load ``state``; ``assign`` keeps the given tensors (e.g. into a meta-device model)."""
    ignored = check_state_dict(model, state)
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    for key in RECOMPUTABLE_KEYS:  # keep the model's own computed buffer when the file has none
        if key not in state and key in model.state_dict():
            state[key] = model.state_dict()[key]
    model.load_state_dict(state, strict=True, assign=assign)
    return ignored


def load_checkpoint(model: nn.Module, source: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Load official weights (``.pt`` or ``.safetensors``, local or ``hf://``) strictly into ``model``."""
    path = resolve(source)
    state = read_state_dict(path)
    ignored = load_state_dict(model, state)
    return LoadedCheckpoint(path, file_sha256(path), len(state), tuple(ignored))


def official_state_dict(model: nn.Module, *, with_criterion: bool = True) -> dict[str, Tensor]:
    """The model's weights under the official names, as a released file holds them.

    ``criterion.empty_weight`` (a training buffer: ones, 0.1 for no-object) is added so the
    key set equals a released checkpoint's.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if with_criterion:
        n = getattr(getattr(model, "config", None), "criterion_classes", 133)
        empty_weight = torch.ones(n + 1)
        empty_weight[-1] = 0.1
        state["criterion.empty_weight"] = empty_weight
    return state

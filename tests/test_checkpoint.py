"""Strict loading of the four released layouts, export back to the official keys, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import FIXTURES, PARITY
from xdecoder import CheckpointError, build_model, load_checkpoint, official_state_dict
from xdecoder.checkpoint import load_state_dict, resolve
from xdecoder.config import get_config
from xdecoder.modeling.xdecoder import XDecoder

LAYOUTS = {
    "focalt": "xdecoder_focalt_keys.json",
    "focall": "xdecoder_focall_oq201_keys.json",
    "davitd3": "xdecoder_davitd3_oq201_keys.json",
    "davitd5": "xdecoder_davitd5_oq201_keys.json",
}
MASK_KEY = "sem_seg_head.predictor.self_attn_mask"


def released_keys(config: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / "keys" / LAYOUTS[config]).read_text())


def state_from_keys(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A state dict with the released keys and shapes (values arbitrary, mask buffer bool)."""
    return {k: torch.zeros(shape, dtype=torch.bool) if k == MASK_KEY else torch.empty(shape)
            for k, shape in keys.items()}


def meta_model(config: str) -> XDecoder:
    # The meta device gives the real module tree without allocating hundreds of MB of weights.
    with torch.device("meta"):
        return XDecoder(get_config(config))


@pytest.mark.parametrize("config", sorted(LAYOUTS))
def test_released_layout_loads_strictly(config: str) -> None:
    keys = released_keys(config)
    model = meta_model(config)
    ignored = load_state_dict(model, state_from_keys(keys), assign=True)
    assert ignored == ["criterion.empty_weight"]
    # Every parameter and persistent buffer received a tensor from the file.
    assert not [n for n, t in model.state_dict().items() if t.is_meta]


@pytest.mark.parametrize("config", sorted(LAYOUTS))
def test_export_gives_exactly_the_released_keys_and_shapes(config: str) -> None:
    keys = released_keys(config)
    exported = official_state_dict(meta_model(config))
    assert list(exported) == list(keys), "key set or order differs from the released file"
    assert {k: list(v.shape) for k, v in exported.items()} == keys


def test_wrong_config_names_the_offending_keys() -> None:
    model = meta_model("focalt")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(model, state_from_keys(released_keys("focall")), assign=True)
    message = str(err.value)
    assert "'focalt'" in message and "missing 48 keys" in message
    assert "backbone.layers.0.blocks.0.dw1.weight" in message  # focal_dw keys absent from a Focal-L file
    assert "sem_seg_head.predictor.query_feat.weight (201, 512) != (101, 512)" in err.value.mismatched
    assert "backbone.layers.2.blocks.17.gamma_1" in err.value.unexpected


def test_missing_mask_buffer_is_recomputed(parity_model: XDecoder, tmp_path: Path) -> None:
    state = official_state_dict(parity_model)
    del state[MASK_KEY]
    path = tmp_path / "no_mask.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    fresh = build_model("parity")
    load_checkpoint(fresh, path)
    assert torch.equal(fresh.decoder.self_attn_mask, parity_model.decoder.self_attn_mask)


def test_computed_mask_equals_the_official_buffer(parity_model: XDecoder) -> None:
    from safetensors.torch import load_file

    official = load_file(str(PARITY / "reduced_weights.safetensors"))[MASK_KEY]
    assert torch.equal(build_model("parity").decoder.self_attn_mask, official)


def test_pt_roundtrip_is_weights_only_and_exact(parity_model: XDecoder, tmp_path: Path) -> None:
    """A flat .pt as the official trainer writes it loads with weights_only=True and gives the same weights."""
    path = tmp_path / "xdecoder_parity.pt"
    torch.save(official_state_dict(parity_model), path)
    fresh = build_model("parity")
    loaded = load_checkpoint(fresh, path)
    assert len(loaded.sha256) == 64 and loaded.ignored == ("criterion.empty_weight",)
    for (name, a), b in zip(fresh.state_dict().items(), parity_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weights": np.array([1, 2, 3], dtype=object)}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(build_model("parity"), path)


def test_missing_file_and_bad_hub_uri(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="hf://owner/repo/file"):
        resolve("hf://xdecoder/xdecoder_focalt_last.pt")


def test_hub_source_resolves_from_the_local_cache(parity_model: XDecoder, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """hf:// goes through huggingface_hub. No hub is reachable here, so the test lays out the
    hub cache as a download leaves it and runs huggingface_hub offline against it."""
    snapshot = tmp_path / "hub" / "models--xdecoder--X-Decoder" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    torch.save(official_state_dict(parity_model), snapshot / "xdecoder_parity.pt")
    (tmp_path / "hub" / "models--xdecoder--X-Decoder" / "refs").mkdir()
    (tmp_path / "hub" / "models--xdecoder--X-Decoder" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    loaded = load_checkpoint(build_model("parity"), "hf://xdecoder/X-Decoder/xdecoder_parity.pt")
    assert loaded.path == snapshot / "xdecoder_parity.pt"
    assert len(loaded.sha256) == 64
    with pytest.raises(Exception, match="(?i)offline|cache|not found|connect"):
        resolve("hf://xdecoder/X-Decoder/xdecoder_focalt_last.pt")  # not cached: a clear error, no hang

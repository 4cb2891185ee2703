"""X-Decoder in PyTorch: the official architecture, strict checkpoint loading, one-pass tasks.

Public API::

    model = build_model("focalt")
    load_checkpoint(model, "xdecoder_focalt_last.pt")      # or hf://xdecoder/X-Decoder/<file>
    predictor = Predictor(model)
    features = predictor.encode(images)
    predictor.panoptic(features, ["person", "dog", "grass"])
"""

from xdecoder.build import build_model
from xdecoder.checkpoint import CheckpointError, load_checkpoint, official_state_dict
from xdecoder.config import CONFIGS, XDecoderConfig
from xdecoder.predictor import Predictor

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "Predictor",
    "XDecoderConfig",
    "build_model",
    "load_checkpoint",
    "official_state_dict",
]

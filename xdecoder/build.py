"""``build_model(name)``: a named configuration -> an X-Decoder module in eval mode."""

from __future__ import annotations

from xdecoder.config import XDecoderConfig, get_config
from xdecoder.modeling.xdecoder import XDecoder


def build_model(name: str | XDecoderConfig) -> XDecoder:
    """Build the network for a config name (``focalt``, ``focall``, ``davitd3``, ``davitd5``,
    ``parity``) or a config object. Weights are randomly initialised until a checkpoint is loaded."""
    cfg = get_config(name) if isinstance(name, str) else name
    return XDecoder(cfg).eval()

"""What one ingest pass stores per image (``--outputs``, ``XDLABEL_INGEST_OUTPUTS``, a job's
``outputs``). Kept free of heavy imports: settings validate with it at startup."""

from __future__ import annotations

from collections.abc import Collection

# The image vector is always made: image and text search read it, and it costs one pooling of
# features the pass computes anyway. Regions and captions each add work that bulk runs may skip.
OUTPUTS = ("embedding", "regions", "caption")
ALL_OUTPUTS = frozenset(OUTPUTS)


def parse_outputs(value: str | Collection[str]) -> frozenset[str]:
    """``"embedding,regions"`` or a list of names -> the set; unknown names, an empty set or one
    without ``embedding`` are refused with the reason."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    unknown = sorted(set(names) - ALL_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {', '.join(unknown)}; choose from {', '.join(OUTPUTS)}")
    if "embedding" not in names:
        raise ValueError("outputs must include embedding: it is what image search reads")
    return frozenset(names)

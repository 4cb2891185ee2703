"""The ingestion pipeline on Ray Data: decoding and the model run in an actor pool (one model per
actor, a GPU per actor when the cluster has GPUs); the driver writes through the same
``IngestPipeline.write`` as the local engine, so SQL, the index, resume and the handling of
duplicates (two identical files in one batch or in two actors' batches, another ingest writing the
same images) behave identically.

``address=None`` starts a local Ray; ``address="auto"`` or ``"ray://head:10001"`` joins a cluster
(every node needs xdlabel installed and the checkpoint at the same path, or an hf:// source).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xdlabel.decoding import Decoded, decode, is_known
from xdlabel.inference import infer_each
from xdlabel.ingest import IngestPipeline, IngestReport
from xdlabel.outputs import ALL_OUTPUTS
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import Item


class InferActor:
    """Holds one X-Decoder; turns a batch of URIs into a pickled ``InferredBatch``."""

    def __init__(self, settings_json: str, known: set[str], retry_keys: set[str],
                 source_roots: Sequence[Path] | None = None, forbidden: Sequence[Path] = (),
                 outputs: frozenset[str] = ALL_OUTPUTS) -> None:
        from xdecoder import Predictor, build_model, load_checkpoint

        self.settings = Settings.model_validate_json(settings_json)
        model = build_model(self.settings.model)
        load_checkpoint(model, self.settings.checkpoint)
        self.predictor = Predictor(model, device=self.settings.device, settings=self.settings.predictor_settings())
        self.known, self.retry_keys = known, retry_keys
        self.source_roots, self.forbidden, self.outputs = source_roots, forbidden, outputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self.settings
        decoded: list[Decoded] = [
            decode(Item(str(uri), pickle.loads(meta)), max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
                   allow_private=s.allow_private_urls, roots=self.source_roots, forbidden=self.forbidden,
                   timeout=s.fetch_timeout)
            for uri, meta in zip(batch["uri"], batch["meta"], strict=True)]
        fresh = [d for d in decoded if not is_known(d, self.known, self.retry_keys)]
        result = infer_each(self.predictor, [d for d in fresh if d.error is None], [d for d in fresh if d.error],
                            outputs=self.outputs)
        duplicates = [d.item.uri for d in decoded if is_known(d, self.known, self.retry_keys)]
        return {"payload": np.array([pickle.dumps((result, duplicates))], dtype=object)}


def run_on_ray(services: Services, dataset: str, items: Iterable[Item], *, batch_size: int = 4,
               tags: tuple[str, ...] = (), actors: int = 1, address: str | None = None,
               progress: Callable[[IngestReport], None] | None = None, source_roots: Sequence[Path] | None = None,
               forbidden: Sequence[Path] = (), outputs: str | Collection[str] | None = None) -> IngestReport:
    import ray

    pipeline = IngestPipeline(services, dataset, batch_size=batch_size, tags=tags, progress=progress,
                              source_roots=source_roots, forbidden=forbidden, outputs=outputs)
    known = pipeline.prepare()
    rows: list[dict[str, Any]] = [{"uri": item.uri, "meta": pickle.dumps(item.meta)} for item in items]
    if not rows:
        return pipeline.report
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= actors else 0
        data = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch_size))
        results = data.map_batches(
            InferActor, fn_constructor_kwargs={"settings_json": services.settings.model_dump_json(), "known": known,
                                   "retry_keys": pipeline.retry_keys, "source_roots": source_roots,
                                   "forbidden": tuple(forbidden), "outputs": pipeline.outputs},
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus,
            batch_format="numpy")
        for row in results.iter_rows():
            batch, duplicates = pickle.loads(row["payload"])
            pipeline.report.duplicates += duplicates
            pipeline.write(batch)
    finally:
        if started_here:
            ray.shutdown()
    return pipeline.report

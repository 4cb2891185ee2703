"""The ingestion pipeline: read -> fetch/decode/validate -> batch -> one model pass -> write.

Fetching and decoding run in a thread pool ahead of the model, and writing runs in its own
thread behind it, so the model never waits on I/O (PyTorch, PIL and the database drivers release
the GIL). Each batch is written in one transaction (images, caption predictions, image and region
vectors), so a killed job leaves whole batches; rerunning it skips what is stored (content
sha256 per dataset) and the index is repaired from SQL at the next start. Bad inputs are stored
as failed images with the reason, and the job carries on.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from annotator.client import LabelStudioClient
from annotator.convert import mask_to_coco_rle
from annotator.labeling import LabelingConfig, parse_labeling_config
from annotator.outbox import DeliveryReport, Outbox, Outgoing, enqueue
from annotator.prelabel import PrelabelSettings, predictions
from index.models import Image, Prediction
from index.repository import add_image, create_dataset, dataset_by_name
from index.store import NewEmbedding
from xdecoder.predictor import Features, Predictor
from xdecoder.results import Region
from xdecoder.transforms import read_image
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import FetchError, Item, fetch


@dataclass
class IngestReport:
    added: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # uri -> reason
    cancelled: bool = False
    delivery: DeliveryReport | None = None  # pre-labels pushed to Label Studio, when items came from it


@dataclass
class LabelStudioPush:
    """Pre-labels for items from a Label Studio project (``labelstudio://``): computed from the same
    model pass, queued in the outbox in the batch's transaction, delivered in bulk."""

    client: LabelStudioClient
    model_version: str
    task: str = "auto"
    default_threshold: float = 0.5
    thresholds: dict[str, float] = field(default_factory=dict)
    prelabel: PrelabelSettings = PrelabelSettings()
    chunk_size: int = 200
    configs: dict[int, LabelingConfig] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, model_version: str) -> LabelStudioPush | None:
        """None unless a Label Studio server is configured."""
        if not settings.ls_url or not settings.ls_token:
            return None
        return cls(LabelStudioClient(settings.ls_url, settings.ls_token), model_version, settings.ls_task,
                   settings.ls_score_threshold, dict(settings.ls_thresholds),
                   PrelabelSettings(polygon_tolerance=settings.ls_polygon_tolerance), settings.ls_chunk_size)

    def config(self, project_id: int) -> LabelingConfig:
        if project_id not in self.configs:
            xml = self.client.project(project_id)["label_config"]
            self.configs[project_id] = parse_labeling_config(xml, self.task, self.default_threshold, self.thresholds)
        return self.configs[project_id]


@dataclass
class Decoded:
    item: Item
    digest: str
    rgb: np.ndarray | None = None
    mode: str | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height), upright


def decode(item: Item, *, max_bytes: int, max_pixels: int, allow_private: bool,
           labelstudio: LabelStudioClient | None = None) -> Decoded:
    """Fetch and decode one item; never raises: a bad input comes back with ``error`` set."""
    try:
        if "ls_image" in item.meta:
            if labelstudio is None:
                raise FetchError(f"{item.uri}: no Label Studio connection to read it")
            data = labelstudio.read_file(item.meta["ls_image"], max_bytes)
        else:
            data = fetch(item.uri, max_bytes=max_bytes, allow_private=allow_private)
    except (FetchError, OSError, ValueError) as err:
        return Decoded(item, hashlib.sha256(item.uri.encode()).hexdigest(), error=str(err))
    digest = hashlib.sha256(data).hexdigest()
    try:
        rgb, mode = read_image(data, max_pixels)
    except ValueError as err:
        return Decoded(item, digest, error=str(err))
    return Decoded(item, digest, rgb, mode)


@dataclass
class InferredBatch:
    """What one model pass produced for a batch, plus the batch's failed inputs."""

    decoded: list[Decoded]
    failures: list[Decoded]
    vectors: np.ndarray | None = None
    regions: list[list[Region]] | None = None
    captions: list[str] | None = None
    ls_predictions: dict[int, dict[str, object]] = field(default_factory=dict)  # batch index -> prediction


def infer(predictor: Predictor, batch: list[Decoded], failures: list[Decoded],
          push: LabelStudioPush | None = None) -> InferredBatch:
    """One model pass: image vectors, region vectors and captions of the decoded images, and the
    Label Studio pre-labels of those that came from a project."""
    out = InferredBatch(batch, failures)
    if batch:
        features = predictor.encode([d.rgb for d in batch if d.rgb is not None])
        out.vectors = predictor.image_embeddings(features)
        out.regions = predictor.region_embeddings(features)
        out.captions = predictor.caption(features)
        projects = {d.item.meta["ls_project"] for d in batch if "ls_project" in d.item.meta} if push else set()
        for project_id in sorted(projects):
            assert push is not None
            members = [k for k, d in enumerate(batch) if d.item.meta.get("ls_project") == project_id]
            subset = Features([features.images[k] for k in members])
            made = predictions(predictor, subset, push.config(project_id), push.model_version, push.prelabel,
                               captions=[out.captions[k] for k in members])
            out.ls_predictions.update(zip(members, made, strict=True))
    for d in batch:  # pixels are not needed past the model; keep what is written
        d.size = (d.rgb.shape[1], d.rgb.shape[0]) if d.rgb is not None else None
        d.rgb = None
    return out


class IngestPipeline:
    def __init__(self, services: Services, dataset: str, *, batch_size: int = 4, tags: Sequence[str] = (),
                 decode_workers: int = 2, progress: Callable[[IngestReport], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, push: LabelStudioPush | None = None) -> None:
        self.services, self.dataset, self.batch_size, self.tags = services, dataset, batch_size, tuple(tags)
        self.decode_workers, self.progress, self.should_stop = decode_workers, progress, should_stop
        self.push = push
        self.outbox = Outbox(services.sessions, push.client, push.chunk_size) if push else None
        self.report = IngestReport()

    def prepare(self) -> set[str]:
        """Create the dataset if needed; returns the content hashes it already holds."""
        with self.services.sessions() as session:
            ds = dataset_by_name(session, self.dataset) or create_dataset(session, name=self.dataset)
            session.commit()
            self.dataset_id = ds.id
            self.stored = set(session.scalars(select(Image.sha256).where(Image.dataset_id == ds.id)))
        self.services.model  # noqa: B018 - registers the model version before any write
        return set(self.stored)

    def run(self, items: Iterable[Item]) -> IngestReport:
        services = self.services
        known = self.prepare()
        settings = services.settings
        predictor = services.predictor  # load the model before the threads start
        writes: queue.Queue[InferredBatch | None] = queue.Queue(maxsize=2)
        writer_error: list[BaseException] = []
        writer = threading.Thread(target=self._write_loop, args=(writes, writer_error), daemon=True)
        writer.start()
        pending: list[Future[Decoded]] = []
        batch: list[Decoded] = []
        failures: list[Decoded] = []
        seen: set[str] = set()
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool:
            source = iter(items)

            def refill() -> None:
                while len(pending) < 4 * self.batch_size:
                    item = next(source, None)
                    if item is None:
                        return
                    pending.append(pool.submit(decode, item, max_bytes=settings.max_image_bytes,
                                               max_pixels=settings.max_image_pixels,
                                               allow_private=settings.allow_private_urls,
                                               labelstudio=self.push.client if self.push else None))

            refill()
            while pending and not writer_error:
                decoded = pending.pop(0).result()
                refill()
                if decoded.digest in known or decoded.digest in seen:
                    self.report.duplicates.append(decoded.item.uri)
                    continue
                seen.add(decoded.digest)
                (failures if decoded.error else batch).append(decoded)
                if len(batch) == self.batch_size or len(failures) >= self.batch_size:
                    writes.put(infer(predictor, batch, failures, self.push))
                    batch, failures = [], []
                    if self.should_stop and self.should_stop():
                        self.report.cancelled = True
                        for future in pending:
                            future.cancel()
                        break
            if (batch or failures) and not writer_error and not self.report.cancelled:
                writes.put(infer(predictor, batch, failures, self.push))
        writes.put(None)
        writer.join()
        if writer_error:
            raise writer_error[0]
        if self.outbox is not None:  # what earlier runs queued too
            self.report.delivery = self.outbox.deliver()
        return self.report

    def _write_loop(self, writes: queue.Queue[InferredBatch | None], errors: list[BaseException]) -> None:
        while (batch := writes.get()) is not None:
            if errors:
                continue  # drain after a failure
            try:
                self.write(batch)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                errors.append(err)

    def write(self, batch: InferredBatch) -> None:
        """One transaction: the batch's images, caption predictions and vectors, and its failures.
        Content already stored (or written earlier in this run) is counted as a duplicate."""
        model = self.services.model
        fresh = [k for k, d in enumerate(batch.decoded) if d.digest not in self.stored]
        self.report.duplicates += [d.item.uri for k, d in enumerate(batch.decoded) if k not in fresh]
        self.report.duplicates += [d.item.uri for d in batch.failures if d.digest in self.stored]
        failures = [d for d in batch.failures if d.digest not in self.stored]
        with self.services.sessions() as session:
            for d in failures:
                session.add(Image(dataset_id=self.dataset_id, uri=d.item.uri, sha256=d.digest, meta=d.item.meta,
                                  status="failed", error=d.error))
            items: list[NewEmbedding] = []
            added = []
            for k in fresh:
                d = batch.decoded[k]
                assert d.size is not None and batch.vectors is not None and batch.regions is not None
                assert batch.captions is not None
                row = add_image(session, dataset_id=self.dataset_id, uri=d.item.uri, sha256=d.digest,
                                width=d.size[0], height=d.size[1], mode=d.mode, meta=d.item.meta,
                                tags=self.tags, caption=batch.captions[k])
                session.add(Prediction(image_id=row.id, model_version_id=model.version_id, task="caption",
                                       payload={"text": batch.captions[k]}))
                items.append(NewEmbedding(row.id, "image", batch.vectors[k]))
                items += [NewEmbedding(row.id, "region", r.embedding, box=list(r.box),
                                       mask_rle=mask_to_coco_rle(r.mask), score=r.score) for r in batch.regions[k]]
                if k in batch.ls_predictions and self.push is not None:
                    meta = d.item.meta
                    enqueue(session, self.push.client.url,
                            [Outgoing(meta["ls_project"], meta["ls_task"], batch.ls_predictions[k], row.id)])
                added.append(row.id)
            # One transaction per batch: images, predictions and vectors land together or not at all.
            self.services.store.add_embeddings(session, model.version_id,
                                               {"image": model.image_dim, "region": model.region_dim}, items)
        self.stored |= {batch.decoded[k].digest for k in fresh} | {d.digest for d in failures}
        self.report.added += added
        self.report.failed.update({d.item.uri: d.error or "" for d in failures})
        if self.outbox is not None and self.outbox.counts().get("pending", 0) >= self.outbox.chunk_size:
            self.outbox.deliver()  # an outage leaves them queued for the end of the run or the next one
        if self.progress:
            self.progress(self.report)


def ingest_files(services: Services, dataset: str, paths: Sequence[Path], *, batch_size: int = 4,
                 tags: Sequence[str] = ()) -> IngestReport:
    """Ingest local files (the synchronous convenience used by the CLI, the demo and tests)."""
    items = [Item(Path(p).resolve().as_uri()) for p in paths]
    return IngestPipeline(services, dataset, batch_size=batch_size, tags=tags).run(items)

"""The ingestion pipeline: read -> fetch/decode/validate -> batch -> one model pass -> write.

Fetching and decoding run in a thread pool ahead of the model, and writing runs in its own
thread behind it, so the model never waits on I/O (PyTorch, PIL and the database drivers release
the GIL). Each batch is written in one transaction (images, caption predictions, image and region
vectors), so a killed job leaves whole batches; rerunning it skips what is stored (content
sha256 per dataset) and the index is repaired from SQL at the next start.

Any error of one item is that item's failure, with a one-line reason, and the run carries on.
Errors that may go away (timeouts, 5xx/429, Label Studio down) are retried a few times with
backoff first. Failures are stored as ``failed`` images in two kinds:

- the bytes could not be had (network, file missing, Label Studio, model error): the row is
  keyed by the hash of the URI and the item is tried again on every run; when it succeeds the
  same row becomes the image (its id stays);
- the bytes are not an image (truncated, bomb, text): the row is keyed by the content hash and
  those bytes are skipped from then on.

Writes are idempotent under concurrency: any number of processes ingesting the same images into
one dataset end with each image once, its vectors written by the one writer that inserted it
(``ON CONFLICT DO NOTHING``), and no run failing because of another; a locked SQLite or a
PostgreSQL serialization failure or deadlock retries the batch's transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from annotator.client import LabelStudioClient
from annotator.convert import mask_to_coco_rle
from annotator.labeling import LabelingConfig, parse_labeling_config
from annotator.outbox import DeliveryReport, Outbox, Outgoing, enqueue
from annotator.prelabel import PrelabelSettings
from index.models import Dataset, Image, ImageTag, Prediction
from index.repository import get_or_create_dataset, insert_image_if_new
from index.retry import is_transient_db_error, retry
from index.store import NewEmbedding
from xdecoder.predictor import Predictor
from xdlabel.decoding import Decoded, decode, is_known, reason, uri_key
from xdlabel.inference import InferredBatch, infer_each
from xdlabel.outputs import parse_outputs
from xdlabel.services import Services
from xdlabel.settings import Settings, labelstudio_client
from xdlabel.sources import Item

log = logging.getLogger(__name__)
SKIP_CHECK_SECONDS = 1.0  # while skipping stored items: how often to look for a stop and report progress


class DatasetGone(RuntimeError):
    """The dataset a run writes into was deleted while it ran: what was written stays deleted with
    it, nothing more is added (on SQLite a new dataset may even have taken its id)."""


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
        return cls(labelstudio_client(settings), model_version, settings.ls_task,
                   settings.ls_score_threshold, dict(settings.ls_thresholds),
                   PrelabelSettings(polygon_tolerance=settings.ls_polygon_tolerance), settings.ls_chunk_size)

    def config(self, project_id: int) -> LabelingConfig:
        if project_id not in self.configs:
            xml = self.client.project(project_id)["label_config"]
            self.configs[project_id] = parse_labeling_config(xml, self.task, self.default_threshold, self.thresholds)
        return self.configs[project_id]


@dataclass
class Written:
    """What one batch's transaction did."""

    added: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)  # content hashes now in the dataset


def _lost_race(err: BaseException) -> bool:
    """A batch transaction worth running again: the database was busy, or another writer stored
    one of its images in the moment between our check and our write (the rerun sees it)."""
    if is_transient_db_error(err):
        return True
    text = str(getattr(err, "orig", err))
    return isinstance(err, IntegrityError) and ("uq_images_dataset_sha256" in text or "images.sha256" in text)


class IngestPipeline:
    def __init__(self, services: Services, dataset: str, *, batch_size: int = 4, tags: Sequence[str] = (),
                 decode_workers: int = 2, progress: Callable[[IngestReport], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, push: LabelStudioPush | None = None,
                 source_roots: Sequence[Path] | None = None, forbidden: Sequence[Path] = (),
                 fetch_timeout: float | None = None, outputs: str | Collection[str] | None = None) -> None:
        self.services, self.dataset, self.batch_size, self.tags = services, dataset, batch_size, tuple(tags)
        self.outputs = parse_outputs(services.settings.ingest_outputs if outputs is None else outputs)
        self.decode_workers, self.progress, self.should_stop = decode_workers, progress, should_stop
        self.push, self.source_roots, self.forbidden = push, source_roots, tuple(forbidden)
        self.fetch_timeout = fetch_timeout or services.settings.fetch_timeout
        self.outbox = Outbox(services.sessions, push.client, push.chunk_size) if push else None
        self.report = IngestReport()
        self._lock = threading.Lock()  # ``write`` may be called from several threads

    def prepare(self) -> set[str]:
        """Create the dataset if needed; returns the content hashes it already holds. Safe against
        another process creating the same dataset at the same moment."""

        def load() -> tuple[int, set[str], set[str]]:
            with self.services.sessions() as session:
                ds = get_or_create_dataset(session, name=self.dataset)
                session.commit()
                rows = session.execute(select(Image.sha256, Image.status).where(Image.dataset_id == ds.id)).all()
                return ds.id, {sha for sha, _ in rows}, {sha for sha, status in rows if status == "failed"}

        self.dataset_id, self.stored, self.retry_keys = retry(load, what="prepare ingest")
        self.services.model  # noqa: B018 - registers the model version before any write
        return set(self.stored)

    def decode(self, item: Item) -> Decoded:
        settings = self.services.settings
        return decode(item, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                      allow_private=settings.allow_private_urls, labelstudio=self.push.client if self.push else None,
                      roots=self.source_roots, forbidden=self.forbidden, timeout=self.fetch_timeout)

    def run(self, items: Iterable[Item]) -> IngestReport:
        known = self.prepare()
        predictor = self.services.predictor  # load the model before the threads start
        writes: queue.Queue[InferredBatch | None] = queue.Queue(maxsize=2)
        writer_error: list[BaseException] = []
        writer = threading.Thread(target=self._write_loop, args=(writes, writer_error), name="ingest-writer",
                                  daemon=True)
        writer.start()
        pending: list[Future[Decoded]] = []
        try:
            with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool:
                try:
                    self._feed(iter(items), pool, pending, known, predictor, writes, writer, writer_error)
                finally:
                    for future in pending:  # on a stop or an error: start no more downloads
                        future.cancel()
        finally:  # the writer is always told to stop, and never waited on if it is gone
            self._put(writes, None, writer)
            writer.join()
        if writer_error:
            raise writer_error[0]
        if self.outbox is not None:  # what earlier runs queued too
            self.report.delivery = self.outbox.deliver()
        return self.report

    def _feed(self, source: Iterable[Item], pool: ThreadPoolExecutor, pending: list[Future[Decoded]],
              known: set[str], predictor: Predictor, writes: queue.Queue[InferredBatch | None],
              writer: threading.Thread, writer_error: list[BaseException]) -> None:
        """The main loop: keeps the decode pool busy, batches, runs the model, hands batches on."""
        batch: list[Decoded] = []
        failures: list[Decoded] = []
        seen: set[str] = set()
        items = iter(source)

        def refill() -> None:
            while len(pending) < 4 * self.batch_size:
                item = next(items, None)
                if item is None:
                    return
                pending.append(pool.submit(self.decode, item))

        refill()
        next_look = time.monotonic() + SKIP_CHECK_SECONDS
        while pending and not writer_error:
            decoded = pending.pop(0).result()
            refill()
            if is_known(decoded, known, self.retry_keys) or decoded.digest in seen:
                with self._lock:
                    self.report.duplicates.append(decoded.item.uri)
                # A long stretch of stored items writes no batch: still heed a stop and show progress.
                if time.monotonic() >= next_look:
                    next_look = time.monotonic() + SKIP_CHECK_SECONDS
                    if self.progress:
                        self.progress(self.report)
                    if self.should_stop and self.should_stop():
                        self.report.cancelled = True
                        return
                continue
            seen.add(decoded.digest)
            (failures if decoded.error else batch).append(decoded)
            if len(batch) == self.batch_size or len(failures) >= self.batch_size:
                if not self._put(writes, infer_each(predictor, batch, failures, self.push, self.outputs), writer):
                    return
                batch, failures = [], []
                if self.should_stop and self.should_stop():
                    self.report.cancelled = True
                    return
        if (batch or failures) and not writer_error:
            self._put(writes, infer_each(predictor, batch, failures, self.push, self.outputs), writer)

    @staticmethod
    def _put(writes: queue.Queue[InferredBatch | None], batch: InferredBatch | None,
             writer: threading.Thread) -> bool:
        """Hands ``batch`` to the writer; False (instead of blocking forever) if the writer is gone."""
        while writer.is_alive():
            try:
                writes.put(batch, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _write_loop(self, writes: queue.Queue[InferredBatch | None], errors: list[BaseException]) -> None:
        while (batch := writes.get()) is not None:
            if errors:
                continue  # drain after a failure; the main loop stops feeding
            try:
                self.write(batch)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread
                log.error("writing a batch failed: %s", reason(err))
                errors.append(err)

    def write(self, batch: InferredBatch) -> None:
        """Writes one batch in one transaction (run again whole if the database was busy or another
        writer got in between). Images already in the dataset, whoever stored them and when, and
        repeats inside the batch count as duplicates; only images inserted here get vectors."""
        try:
            written = retry(lambda: self._write_once(batch), transient=_lost_race, attempts=8, first_wait=0.1,
                            max_wait=3.0, what=f"ingest batch into {self.dataset!r}")
        except IntegrityError:  # a foreign key: the dataset was deleted under this batch
            with self.services.sessions() as session:
                if session.scalar(select(Dataset.name).where(Dataset.id == self.dataset_id)) != self.dataset:
                    raise self._gone() from None
            raise
        with self._lock:
            self.stored |= written.stored
            self.report.added += written.added
            self.report.duplicates += written.duplicates
            self.report.failed.update(written.failed)
        if self.outbox is not None and self.outbox.counts().get("pending", 0) >= self.outbox.chunk_size:
            self.outbox.deliver()  # an outage leaves them queued for the end of the run or the next one
        if self.progress:
            self.progress(self.report)

    def _write_once(self, batch: InferredBatch) -> Written:
        """The batch's transaction, computed from the database as it is now (so a rerun is safe)."""
        model = self.services.model
        out = Written()
        items: list[NewEmbedding] = []
        # One order for every writer (by content hash), so two transactions never wait on each other.
        work = sorted([(d.digest, k, True) for k, d in enumerate(batch.decoded)]
                      + [(d.digest, k, False) for k, d in enumerate(batch.failures)])
        with self.services.sessions() as session:
            done: set[str] = set()
            for digest, k, ok in work:
                d = batch.decoded[k] if ok else batch.failures[k]
                if digest in done:  # the same content twice in this batch
                    out.duplicates.append(d.item.uri)
                    continue
                done.add(digest)
                if not ok:
                    self._write_failure(session, d, out)
                    continue
                image_id = self._insert_image(session, batch, k)
                if image_id is None:
                    out.duplicates.append(d.item.uri)
                    out.stored.add(digest)
                    continue
                self._inserted(session, d, image_id)
                assert batch.vectors is not None and batch.regions is not None and batch.captions is not None
                if "caption" in self.outputs and batch.captions[k] is not None:  # else made for Label Studio only
                    session.add(Prediction(image_id=image_id, model_version_id=model.version_id, task="caption",
                                           payload={"text": batch.captions[k]}))
                items.append(NewEmbedding(image_id, "image", batch.vectors[k]))
                items += [NewEmbedding(image_id, "region", r.embedding, box=list(r.box),
                                       mask_rle=mask_to_coco_rle(r.mask), score=r.score) for r in batch.regions[k]]
                if k in batch.ls_predictions and self.push is not None:
                    meta = d.item.meta
                    enqueue(session, self.push.client.url,
                            [Outgoing(meta["ls_project"], meta["ls_task"], batch.ls_predictions[k], image_id)])
                out.added.append(image_id)
                out.stored.add(digest)
            # Still our dataset? Checked after this batch's inserts, so on SQLite (one writer, whose
            # lock this transaction now holds) nobody can delete it between the check and the commit;
            # on PostgreSQL the inserts' foreign keys lock its row until the commit.
            if session.scalar(select(Dataset.name).where(Dataset.id == self.dataset_id)) != self.dataset:
                raise self._gone()
            # One transaction per batch: images, predictions and vectors land together or not at all.
            self.services.store.add_embeddings(session, model.version_id,
                                               {"image": model.image_dim, "region": model.region_dim}, items)
        return out

    def _inserted(self, session: Session, decoded: Decoded, image_id: int) -> None:
        """Called in the batch's transaction for each image it inserts (a video frame adds its link)."""

    def _gone(self) -> DatasetGone:
        return DatasetGone(f"dataset {self.dataset!r} was deleted while this run was writing to it; nothing more "
                           "is added")

    def _write_failure(self, session: Session, d: Decoded, out: Written) -> None:
        new = insert_image_if_new(session, dataset_id=self.dataset_id, uri=d.item.uri, sha256=d.digest,
                                  meta=d.item.meta, status="failed", error=d.error)
        if new is None and d.fetched:  # these bytes failed before: remembered, skipped
            out.duplicates.append(d.item.uri)
            out.stored.add(d.digest)
            return
        if new is None:  # failed to fetch again: the row says the latest reason
            session.execute(update(Image).where(Image.dataset_id == self.dataset_id, Image.sha256 == d.digest,
                                                Image.status == "failed").values(error=d.error)
                            .execution_options(synchronize_session=False))
        out.failed[d.item.uri] = d.error or ""
        if d.fetched:
            out.stored.add(d.digest)

    def _insert_image(self, session: Session, batch: InferredBatch, k: int) -> int | None:
        """The new image's id, or None when the dataset holds its content. A failed row of the same
        URI (it could not be fetched before) becomes the image, keeping its id."""
        d = batch.decoded[k]
        assert d.size is not None and batch.captions is not None
        caption = batch.captions[k] if "caption" in self.outputs else None
        values: dict[str, Any] = {"uri": d.item.uri, "width": d.size[0], "height": d.size[1], "mode": d.mode,
                                  "meta": d.item.meta, "caption": caption}
        placeholder, other = uri_key(d.item.uri), aliased(Image)
        adopted = session.scalar(
            update(Image).where(Image.dataset_id == self.dataset_id, Image.sha256 == placeholder,
                                Image.status == "failed",
                                ~exists().where(other.dataset_id == self.dataset_id, other.sha256 == d.digest))
            .values(sha256=d.digest, status="done", error=None, **values).returning(Image.id)
            .execution_options(synchronize_session=False))
        if adopted is not None:
            session.add_all([ImageTag(image_id=adopted, tag=t) for t in dict.fromkeys(self.tags)])
            return adopted
        new = insert_image_if_new(session, dataset_id=self.dataset_id, sha256=d.digest, tags=self.tags, **values)
        if new is None:  # stored already: a failed row of this URI is stale now
            session.execute(delete(Image).where(Image.dataset_id == self.dataset_id, Image.sha256 == placeholder,
                                                Image.status == "failed")
                            .execution_options(synchronize_session=False))
        return new


def ingest_files(services: Services, dataset: str, paths: Sequence[Path], *, batch_size: int = 4,
                 tags: Sequence[str] = ()) -> IngestReport:
    """Ingest local files (the synchronous convenience used by the CLI, the demo and tests)."""
    items = [Item(Path(p).resolve().as_uri()) for p in paths]
    return IngestPipeline(services, dataset, batch_size=batch_size, tags=tags).run(items)

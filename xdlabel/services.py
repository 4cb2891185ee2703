"""What one process holds once: database sessions, the retrieval store and the model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from index.db import make_engine, make_session_factory
from index.repository import get_or_create_model_version
from index.store import RetrievalStore
from index.vectors import IndexParams
from xdlabel.settings import Settings
from xdlabel.textqueries import TextQueries

if TYPE_CHECKING:
    from xdecoder import Predictor


@dataclass(frozen=True)
class ModelInfo:
    version_id: int
    name: str
    image_dim: int  # image vectors: decoder and backbone embeddings, concatenated
    region_dim: int


def version_name(config: str, checkpoint_sha256: str, preprocessing: Mapping[str, object] | None = None) -> str:
    """``config-<weights sha256>-<sha256 of the whole config and the preprocessing>``, shortened: whatever
    decides a vector (weights, architecture, short side, size guard, dtype) decides its version. Without
    ``preprocessing``: the name of a checkpoint alone, as versions were named before (no vectors made)."""
    if preprocessing is None:
        return f"{config}-{checkpoint_sha256[:12]}"
    from xdecoder.config import get_config

    key = json.dumps({"config": dataclasses.asdict(get_config(config)), "preprocessing": dict(preprocessing)},
                     sort_keys=True, default=str)
    return f"{config}-{checkpoint_sha256[:12]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class Services:
    def __init__(self, settings: Settings, serving: bool = False) -> None:
        """``serving``: a server's, whose first search may answer before the index has caught up
        with rows written since it was saved (a command's waits for them)."""
        self.settings = settings
        self.engine = make_engine(settings.sqlalchemy_url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.store = RetrievalStore(self.sessions, settings.index_dir, IndexParams(
            use_gpu=settings.use_gpu_index, recall=settings.search_recall, memory_gb=settings.index_memory_gb,
            graph=settings.index_graph),
            defer_open=serving)
        self.text_queries: dict[str, TextQueries] = {}  # per kind, made by xdlabel.search on first use
        self._lock = threading.Lock()
        # One model call at a time in this process (search and the ML backend): the model's memory is
        # sized for one batch, and callers wait in their worker threads, never on the event loop.
        self.model_lock = threading.Lock()

    @cached_property
    def predictor(self) -> Predictor:
        """The X-Decoder predictor, loaded on first use, once per process (concurrent first
        requests wait for the one load: cached_property alone would let each thread build one)."""
        with self._lock:
            if "predictor" in self.__dict__:
                return self.__dict__["predictor"]  # type: ignore[no-any-return]
            from xdecoder import Predictor, build_model, load_checkpoint

            model = build_model(self.settings.model)
            self.checkpoint = load_checkpoint(model, self.settings.checkpoint)
            predictor = Predictor(model, device=self.settings.device, settings=self.settings.predictor_settings())
            predictor.version = version_name(self.settings.model, self.checkpoint.sha256, predictor.preprocessing())
            self.__dict__["predictor"] = predictor  # published before the lock is released
            return predictor

    @cached_property
    def model_version_name(self) -> str:
        """The loaded model's version name, known without loading the model (from the file's hash)."""
        if "model" in self.__dict__:
            return self.model.name
        from xdecoder.checkpoint import file_sha256, resolve
        from xdecoder.predictor import compute_dtype, preprocessing

        return version_name(self.settings.model, file_sha256(resolve(self.settings.checkpoint)),
                            preprocessing(self.settings.predictor_settings(), compute_dtype(self.settings.device)))

    @cached_property
    def model(self) -> ModelInfo:
        """The model version row of the loaded checkpoint (registered on first use)."""
        predictor = self.predictor
        with self._lock:
            if "model" in self.__dict__:
                return self.__dict__["model"]  # type: ignore[no-any-return]
            dim = predictor.model.config.dim_proj
            name = predictor.version
            with self.sessions() as session:
                version = get_or_create_model_version(session, name=name, checkpoint_sha256=self.checkpoint.sha256,
                                                      embedding_dim=dim, preprocessing=predictor.preprocessing())
                session.commit()
                info = ModelInfo(version.id, name, 2 * dim, dim)
            self.__dict__["model"] = info
            return info

    def close(self, build_wait: float = 30.0) -> None:
        # A background rebuild that finishes in time is saved; one cut short is redone at the next open.
        self.store.wait(build_wait)
        self.store.save()
        self.engine.dispose()

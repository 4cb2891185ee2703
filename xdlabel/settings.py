"""Settings from XDLABEL_* environment variables or a .env-style config file (pydantic-settings).

Defaults are the embedded ones: SQLite and the indexes under ./xdlabel-data, FAISS on CPU, the
bundled model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from annotator.client import LabelStudioClient
    from xdecoder.preprocess import PredictorSettings

REPO = Path(__file__).resolve().parents[1]
# The bundled model: the reduced ("parity"-size) X-Decoder trained by `make train-demo` on the synthetic
# shape scenes; its JSON beside it says on what, at which image size, and with which held-out metrics.
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "models" / "shapes.safetensors"


def bundled_meta() -> dict[str, Any]:
    return json.loads(BUNDLED_CHECKPOINT.with_suffix(".json").read_text())  # type: ignore[no-any-return]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XDLABEL_", env_file=None, extra="ignore")

    data_dir: Path = Path("xdlabel-data")
    database_url: str | None = None  # default: sqlite:///<data_dir>/xdlabel.db
    model: str = "parity"  # X-Decoder config name
    checkpoint: str = str(BUNDLED_CHECKPOINT)  # local path or hf://owner/repo/file
    device: str | None = None  # None: CUDA when present
    short_side: int | None = None  # None: the bundled model's training size with it, else 512 (official demos)
    ingest_outputs: str = "embedding,regions,caption"  # what ingest stores per image (embedding always)
    caption_steps: int | None = None  # None: the bundled model's with it, else the model config's
    # Text -> image score's weight on the decoder embedding. None: the bundled model's with it, else 0.5
    # (the official score).
    retrieval_decoder_weight: float | None = Field(default=None, ge=0, le=1)
    use_gpu_index: bool | None = None  # None: FAISS GPU when a GPU build sees a GPU
    search_recall: float = Field(default=0.95, gt=0, le=1)  # recall@10 target of searches (IVF calibrated)
    # RAM for one index's full vectors; past it (or past 5M vectors) the index is IVF-PQ with full vectors
    # on disk, memory-mapped, for exact re-ranking. None: no budget.
    index_memory_gb: float | None = Field(default=None, gt=0)
    # HNSW graphs instead of IVF between 20k vectors and the compressed sizes: faster at the same recall,
    # slower to build, removals are tombstones until a rebuild (README, Search speed).
    index_graph: bool = False
    require_api_key: bool = True
    # Threads for the API's blocking work (SQL, search, the model). A few more than the cores keep them
    # busy; many more only queue on the GIL, which stretches the slowest requests (anyio's default is 40).
    api_threads: int = Field(default=16, ge=1)
    max_upload_bytes: int = 20 * 1024 * 1024  # search-by-image uploads
    max_image_bytes: int = 100 * 1024 * 1024  # ingested files and downloads
    max_image_pixels: int = 64_000_000  # decompression-bomb guard: larger images are refused
    max_video_bytes: int = 4 * 1024**3  # video files and downloads (downloads are held in memory)
    max_video_seconds: float = Field(default=4 * 3600.0, gt=0)  # declared duration
    max_video_frames: int = Field(default=20_000, gt=0)  # sampled frames per video
    allow_private_urls: bool = False  # fetched URLs resolving to private/loopback addresses
    # Folders that sources submitted over HTTP may name (the CLI reads what its user names); none by
    # default: a job over HTTP reads only URLs. A JSON list, or paths separated by commas or os.pathsep.
    source_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    fetch_timeout: float = Field(default=20.0, gt=0)  # seconds for a whole download, redirects included
    allowed_origins: list[str] = Field(default_factory=list)
    # A worker's hold on its job: renewed every third of it, taken over by another worker once it
    # lapses (a killed worker's job resumes within lease + poll interval, ~12 s by default).
    job_lease_seconds: float = Field(default=10.0, gt=0)

    # Label Studio: the server to push to and read task images from (a legacy token or a personal
    # access token), and how its projects are pre-labelled.
    ls_url: str | None = None
    ls_token: str | None = None
    ls_task: str = "auto"  # auto | panoptic | instance | semantic
    ls_score_threshold: float = 0.5
    ls_thresholds: dict[str, float] = Field(default_factory=dict)  # per label value
    ls_polygon_tolerance: float = 1.0  # pixels
    ls_chunk_size: int = 200  # predictions per bulk request
    ls_label_map: dict[str, str] = Field(default_factory=dict)  # phrase -> label value, wins over meaning
    ls_routing: str = "tool"  # tool: a region in its label's tool control only; every: in each control
    # The ML backend at /ml answers only with HTTP basic auth; it is off until a password is set.
    ml_backend_user: str = "xdlabel"
    ml_backend_password: str | None = None
    # Label Studio's ML_TIMEOUT_PREDICT (or the backend's timeout), seconds: /predict answers within
    # ml_predict_budget of it and leaves the rest to a background pre-label through the outbox.
    ml_timeout_predict: float = Field(default=100.0, gt=0)
    ml_predict_budget: float = Field(default=60.0, gt=0)
    ml_feature_cache_mb: int = Field(default=512, ge=0)  # interactive prompts: encoded images kept
    ml_train_in_server: bool = True  # "Start training" runs in the server's own pool (else: a worker's job)

    @field_validator("ingest_outputs")
    @classmethod
    def _known_outputs(cls, value: str) -> str:
        from xdlabel.outputs import parse_outputs

        parse_outputs(value)  # a wrong name fails at startup with its reason, not mid-ingest
        return value

    @field_validator("source_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            parts = text.replace(os.pathsep, ",").split(",") if text else []
            return [part.strip() for part in parts if part.strip()]
        return value

    @property
    def uses_bundled_model(self) -> bool:
        return Path(self.checkpoint).resolve() == BUNDLED_CHECKPOINT

    @property
    def image_short_side(self) -> int:
        if self.short_side:
            return self.short_side
        return int(bundled_meta()["short_side"]) if self.uses_bundled_model else 512

    @property
    def image_caption_steps(self) -> int | None:
        if self.caption_steps or not self.uses_bundled_model:
            return self.caption_steps
        return int(bundled_meta()["caption_steps"])

    @property
    def image_retrieval_decoder_weight(self) -> float:
        if self.retrieval_decoder_weight is not None:
            return self.retrieval_decoder_weight
        return float(bundled_meta().get("retrieval_decoder_weight", 0.5)) if self.uses_bundled_model else 0.5

    def predictor_settings(self) -> PredictorSettings:
        """How the configured model reads images and queries (the bundled model's own sizes by default)."""
        from xdecoder.preprocess import PredictorSettings

        return PredictorSettings(short_side=self.image_short_side, caption_steps=self.image_caption_steps,
                                 retrieval_decoder_weight=self.image_retrieval_decoder_weight)

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'xdlabel.db'}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def thumbnail_dir(self) -> Path:
        return self.data_dir / "thumbnails"


def labelstudio_client(settings: Settings, url: str | None = None, token: str | None = None
                       ) -> LabelStudioClient:
    """A Label Studio client whose reads of task images obey the fetch settings (private
    addresses, deadline); ``url``/``token`` default to the configured server."""
    from annotator.client import LabelStudioClient

    url, token = url or settings.ls_url, token or settings.ls_token
    if not url or not token:
        raise ValueError("set XDLABEL_LS_URL and XDLABEL_LS_TOKEN (a legacy or personal access token)")
    return LabelStudioClient(url, token, allow_private=settings.allow_private_urls, max_seconds=settings.fetch_timeout)


def load_settings(config_file: str | None = None) -> Settings:
    """Environment variables win over the config file (KEY=value lines with XDLABEL_ names)."""
    if config_file:
        return Settings(_env_file=config_file)  # type: ignore[call-arg]
    return Settings()

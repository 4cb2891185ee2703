"""Settings from XDLABEL_* environment variables or a .env-style config file (pydantic-settings).

Defaults are the embedded ones: SQLite and the indexes under ./xdlabel-data, FAISS on CPU.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parents[1]
# Until the bundled trained model exists (issue 5) the default is the reduced X-Decoder with the
# official code's parity weights: real code paths, untrained weights.
DEFAULT_CHECKPOINT = REPO / "tests" / "fixtures" / "parity" / "reduced_weights.safetensors"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XDLABEL_", env_file=None, extra="ignore")

    data_dir: Path = Path("xdlabel-data")
    database_url: str | None = None  # default: sqlite:///<data_dir>/xdlabel.db
    model: str = "parity"  # X-Decoder config name
    checkpoint: str = str(DEFAULT_CHECKPOINT)  # local path or hf://owner/repo/file
    device: str | None = None  # None: CUDA when present
    short_side: int = 512
    use_gpu_index: bool | None = None  # None: FAISS GPU when a GPU build sees a GPU
    require_api_key: bool = True
    max_upload_bytes: int = 20 * 1024 * 1024  # search-by-image uploads
    max_image_bytes: int = 100 * 1024 * 1024  # ingested files and downloads
    max_image_pixels: int = 64_000_000  # decompression-bomb guard: larger images are refused
    allow_private_urls: bool = False  # ingest URLs resolving to private/loopback addresses
    allowed_origins: list[str] = Field(default_factory=list)

    # Label Studio: the server to push to and read task images from (a legacy token or a personal
    # access token), and how its projects are pre-labelled.
    ls_url: str | None = None
    ls_token: str | None = None
    ls_task: str = "auto"  # auto | panoptic | instance | semantic
    ls_score_threshold: float = 0.5
    ls_thresholds: dict[str, float] = Field(default_factory=dict)  # per label value
    ls_polygon_tolerance: float = 1.0  # pixels
    ls_chunk_size: int = 200  # predictions per bulk request
    # The ML backend at /ml answers only with HTTP basic auth; it is off until a password is set.
    ml_backend_user: str = "xdlabel"
    ml_backend_password: str | None = None

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'xdlabel.db'}"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def thumbnail_dir(self) -> Path:
        return self.data_dir / "thumbnails"


def load_settings(config_file: str | None = None) -> Settings:
    """Environment variables win over the config file (KEY=value lines with XDLABEL_ names)."""
    if config_file:
        return Settings(_env_file=config_file)  # type: ignore[call-arg]
    return Settings()

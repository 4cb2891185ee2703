"""docker-compose.yml and the Dockerfile, checked against the code (Docker itself cannot run here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

from xdecoder.config import CONFIGS
from xdlabel.cli import build_parser
from xdlabel.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_ports_volumes_and_health() -> None:
    spec = compose()
    services = spec["services"]
    assert {"api", "worker", "postgres", "label-studio"} <= set(services)
    for name in ("api", "postgres", "label-studio"):
        assert "healthcheck" in services[name], name
    assert services["api"]["ports"] == ["8000:8000"]
    assert services["api"]["command"][-2:] == ["--port", "8000"]
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    declared = set(spec["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in declared, f"{name}: undeclared volume {source}"


def test_compose_environment_matches_the_settings() -> None:
    services = compose()["services"]
    fields = set(Settings.model_fields)
    for name in ("api", "worker"):
        env = services[name]["environment"]
        for key in env:
            assert key.startswith("XDLABEL_") and key.removeprefix("XDLABEL_").lower() in fields, key
        settings = Settings(**{k.removeprefix("XDLABEL_").lower(): v for k, v in env.items()})
        url = make_url(settings.sqlalchemy_url)
        db = services["postgres"]["environment"]
        assert (url.drivername, url.host, url.database, url.username, url.password) == (
            "postgresql+psycopg", "postgres", db["POSTGRES_DB"], db["POSTGRES_USER"], db["POSTGRES_PASSWORD"])
        assert settings.model in CONFIGS
        assert str(settings.data_dir) in {v.split(":")[1] for v in services[name]["volumes"]}
    # The commands are real CLI commands.
    parser = build_parser()
    for name in ("api", "worker"):
        parser.parse_args(services[name]["command"][1:])


def test_dockerfile_builds_cpu_by_default_with_a_gpu_variant() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert 'if [ "$VARIANT" = "gpu" ]' in text and "faiss-gpu" in text
    copied = set(re.findall(r"^COPY (\S+)", text, re.M))
    for package in ("xdecoder", "xdlabel", "index", "annotator", "migrations", "pyproject.toml"):
        assert package in copied, package
    assert 'CMD ["xdlabel", "serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "EXPOSE 8000" in text

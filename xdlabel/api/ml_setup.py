"""The ML backend's per-project state: where a Label Studio project's files are read, its
Connect-dialog ``extra_params`` (per-project settings), and the self-healing of its webhook.

Label Studio creates the backend's webhook (``<backend url>/webhook``) without any auth header, so
every annotation event would be refused with 401 and nothing stored. After each /setup the webhook
is checked in the background and, with the Label Studio token, given the basic auth header; when
that is not possible the log says exactly what to set.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request

from annotator.client import LabelStudioClient, LabelStudioError
from annotator.labeling import TASKS, LabelingConfig, parse_labeling_config
from xdlabel.api.ml_interactive import FeatureCache
from xdlabel.jobs import FINETUNE_PARAMS
from xdlabel.services import Services
from xdlabel.settings import Settings

if TYPE_CHECKING:
    from xdecoder import Predictor

log = logging.getLogger(__name__)
HEAL_WAITS = (0.5, 1.0, 2.0, 4.0, 8.0)  # Label Studio creates the webhook after its first /setup
TRAIN_KEYS = (*FINETUNE_PARAMS, "width", "height")
HEAL_EVERY = 300.0  # seconds between checks of a project whose webhook was found right


def refuse(status: int, reason: str) -> HTTPException:
    """A refusal whose reason is in the body and in this log: Label Studio shows only the status."""
    log.warning("ML backend refused a request (%d): %s", status, reason)
    return HTTPException(status, reason)


@dataclass(frozen=True)
class ProjectParams:
    """The Connect dialog's ``extra_params``, as JSON: ``{"task": "instance", "threshold": 0.4,
    "thresholds": {"Car": 0.7}, "label_mapping": {"grass": "Vegetation"}}`` (every key optional).
    ``label_mapping`` maps phrases (X-Decoder prompts, typed phrases) to the config's labels."""

    task: str | None = None
    threshold: float | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    label_mapping: dict[str, str] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)  # fine-tune options: steps, lr, min_heldout...


def parse_extra_params(raw: Any) -> ProjectParams:
    """``extra_params`` as Label Studio sends it (null, an object or a JSON string); unknown keys and
    wrong types are refused with the reason."""
    if raw is None or raw == "" or raw == {}:
        return ProjectParams()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"extra_params is not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"extra_params must be a JSON object, got {type(raw).__name__}")
    known = set(ProjectParams.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"extra_params: unknown keys {unknown}; known: {sorted(known)}")
    task = raw.get("task")
    if task is not None and task not in (*TASKS, "auto"):
        raise ValueError(f"extra_params.task must be one of {[*TASKS, 'auto']}, got {task!r}")
    threshold = raw.get("threshold")
    thresholds = raw.get("thresholds", {})
    mapping = raw.get("label_mapping", {})
    if threshold is not None and not _is_score(threshold):
        raise ValueError(f"extra_params.threshold must be a number in [0, 1], got {threshold!r}")
    if not isinstance(thresholds, dict) or not all(isinstance(k, str) and _is_score(v) for k, v in thresholds.items()):
        raise ValueError("extra_params.thresholds must map label values to numbers in [0, 1]")
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) and k.strip()
                                                for k, v in mapping.items()):
        raise ValueError("extra_params.label_mapping must map phrases to label values (strings)")
    train = raw.get("train", {})
    if not isinstance(train, dict) or not all(k in TRAIN_KEYS and isinstance(v, int | float) and v > 0
                                              and not isinstance(v, bool) for k, v in train.items()):
        raise ValueError(f"extra_params.train must map some of {list(TRAIN_KEYS)} to positive numbers")
    return ProjectParams(task, None if threshold is None else float(threshold),
                         {k: float(v) for k, v in thresholds.items()},
                         {k.strip(): v for k, v in mapping.items()}, dict(train))


def _is_score(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


@lru_cache(maxsize=64)
def _config(xml: str, task: str, default: float, thresholds: tuple[tuple[str, float], ...],
            mapping: tuple[tuple[str, str], ...], routing: str) -> LabelingConfig:
    config = parse_labeling_config(xml, task, default, dict(thresholds), mapping=dict(mapping), routing=routing)
    for warning in config.warnings:
        log.warning("labeling config: %s", warning)
    return config


def label_mapping(services: Services, params: ProjectParams | None) -> dict[str, str]:
    """Phrase -> label: the project's extra_params over XDLABEL_LS_LABEL_MAP."""
    return {**services.settings.ls_label_map, **(params.label_mapping if params else {})}


def labeling_config(services: Services, xml: str, params: ProjectParams | None = None) -> LabelingConfig:
    """The project's config with its settings: ``extra_params`` win over XDLABEL_LS_* settings."""
    s, p = services.settings, params or ProjectParams()
    thresholds = {**s.ls_thresholds, **p.thresholds}
    try:
        return _config(xml, p.task or s.ls_task, s.ls_score_threshold if p.threshold is None else p.threshold,
                       tuple(sorted(thresholds.items())), tuple(sorted(label_mapping(services, p).items())),
                       s.ls_routing)
    except ValueError as err:
        raise refuse(400, str(err)) from None


def project_id(project: str | None) -> int | None:
    """Label Studio names a project "<id>.<created timestamp>" in ML backend calls."""
    head = (project or "").split(".", 1)[0]
    return int(head) if head.isdigit() else None


class Pace:
    """Seconds per task of /predict, as last measured in this process (a chunk's time over its tasks)."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.seconds: float | None = None
        self._lock = threading.Lock()

    def record(self, seconds: float, tasks: int) -> None:
        with self._lock:
            self.seconds = seconds / max(tasks, 1)

    def fits(self, deadline: float) -> int:
        """How many tasks (at most a chunk) fit before ``deadline``; one when nothing was measured."""
        with self._lock:
            per_task = self.seconds
        left = deadline - time.monotonic()
        if left <= 0:
            return 0
        if per_task is None:
            return 1
        return max(0, min(self.chunk, int(left / max(per_task, 1e-6))))


class Connections:
    """The ML backend's state in this process. Per Label Studio project (as /setup names it:
    "<id>.<created>"): where its files are read, its extra_params, when its webhook was checked;
    and for all: the prediction pace, the interactive feature cache and the background pool
    (predictions /predict had no time for, fine-tuning started from Label Studio)."""

    def __init__(self, predict_chunk: int = 4) -> None:
        self.pace = Pace(predict_chunk)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ml-background")
        self._features: FeatureCache | None = None
        self._serving: tuple[Predictor, str, str] | None = None  # a fine-tune this server switched to
        self.training: dict[str, Any] | None = None  # the last fine-tune run here: job, state, report
        self._by_project: dict[str, tuple[str, str]] = {}
        self._params: dict[str, ProjectParams] = {}
        self._healed: dict[tuple[str, int], float] = {}  # (server, project) -> when found right
        self._healing: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def remember(self, project: str, hostname: str | None, token: str | None,
                 params: ProjectParams | None = None) -> None:
        with self._lock:
            if hostname and token:
                self._by_project[project] = (hostname, token)
            if params is not None:
                self._params[project] = params

    def serve(self, predictor: Predictor, version: str, checkpoint: str) -> None:
        """From now on /predict and /setup use this model (a fine-tune registered as ``version``)."""
        with self._lock:
            self._serving = (predictor, version, checkpoint)
        log.info("the ML backend now serves model version %s", version)

    def version(self, services: Services) -> str:
        """The served model's version, known without loading it."""
        with self._lock:
            serving = self._serving
        return serving[1] if serving else services.model_version_name

    def checkpoint(self, services: Services) -> str:
        """The served checkpoint: the next fine-tune starts from it."""
        with self._lock:
            serving = self._serving
        return serving[2] if serving else services.settings.checkpoint

    def predictor(self, services: Services) -> Predictor:
        with self._lock:
            serving = self._serving
        return serving[0] if serving else services.predictor

    def features(self, max_bytes: int) -> FeatureCache:
        with self._lock:
            if self._features is None:
                self._features = FeatureCache(max_bytes)
            return self._features

    def known_params(self) -> list[tuple[str, ProjectParams]]:
        with self._lock:
            return list(self._params.items())

    def params(self, project: str | None) -> ProjectParams:
        with self._lock:
            return self._params.get(project or "", ProjectParams())

    def client(self, services: Services, project: str | int | None) -> LabelStudioClient:
        """The connection for a project named as /setup names it, or by its id alone."""
        settings = services.settings
        if settings.ls_url and settings.ls_token:  # configured: wins over what /setup said
            return _client(settings, settings.ls_url, settings.ls_token)
        with self._lock:
            if isinstance(project, int):
                known = next((v for k, v in self._by_project.items() if project_id(k) == project), None)
            else:
                known = self._by_project.get(project or "")
        if known is None:
            raise refuse(400, "no Label Studio connection for this project: set XDLABEL_LS_URL and "
                              "XDLABEL_LS_TOKEN, or let Label Studio call /setup first")
        return _client(settings, *known)

    def heal_webhook(self, client: LabelStudioClient, project: int, hook_url: str, header: str,
                     waits: tuple[float, ...] = HEAL_WAITS) -> None:
        """Checks the project's webhook to ``hook_url`` in a background thread (one per project at
        a time, at most every HEAL_EVERY seconds once right)."""
        key = (client.url, project)
        with self._lock:
            if key in self._healing or time.monotonic() - self._healed.get(key, -HEAL_EVERY) < HEAL_EVERY:
                return
            self._healing.add(key)

        def run() -> None:
            try:
                if heal_webhook(client, project, hook_url, header, waits):
                    with self._lock:
                        self._healed[key] = time.monotonic()
            finally:
                with self._lock:
                    self._healing.discard(key)

        threading.Thread(target=run, name=f"heal-webhook-{project}", daemon=True).start()

    def wait_healed(self, timeout: float) -> bool:
        """Whether no webhook check is running (tests and shutdown wait for them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._healing:
                    return True
            time.sleep(0.05)
        return False


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def what_to_set(project: int, hook_url: str) -> str:
    return (f"in Label Studio, project {project} > Settings > Webhooks > {hook_url}: add the header "
            f"'Authorization: Basic <base64 of XDLABEL_ML_BACKEND_USER:XDLABEL_ML_BACKEND_PASSWORD>' "
            f"(or give xdlabel XDLABEL_LS_URL and XDLABEL_LS_TOKEN so that it sets it itself)")


def heal_webhook(client: LabelStudioClient, project: int, hook_url: str, header: str,
                 waits: tuple[float, ...] = HEAL_WAITS) -> bool:
    """Gives the project's webhook(s) to ``hook_url`` the auth header (creating the webhook when
    Label Studio did not, e.g. under SSRF protection). True when the webhook is right."""
    for attempt, wait in enumerate((0.0, *waits)):
        time.sleep(wait)
        try:
            hooks = [h for h in client.call(client.sdk.webhooks.list, project=str(project)) if h.url == hook_url]
            if not hooks and attempt < len(waits):
                continue  # Label Studio creates it right after it saves the backend
            if not hooks:
                hooks = [client.call(client.sdk.webhooks.create, url=hook_url, project=project, send_payload=True,
                                     send_for_all_actions=True)]
                log.info("project %s: created the ML backend's webhook %s", project, hook_url)
            for hook in hooks:
                if (hook.headers or {}).get("Authorization") != header:
                    client.call(client.sdk.webhooks.update, id=hook.id, url=hook_url,
                                headers={**(hook.headers or {}), "Authorization": header})
                    log.info("project %s: webhook %s now carries the ML backend's basic auth", project, hook_url)
            return True
        except (LabelStudioError, PermissionError, ConnectionError) as err:
            log.warning("project %s: cannot fix the webhook's auth (%s); %s", project, err,
                        what_to_set(project, hook_url))
            return False
    return False


def _client(settings: Settings, url: str, token: str) -> LabelStudioClient:
    return _cached_client(url, token, settings.allow_private_urls, settings.fetch_timeout)


@lru_cache(maxsize=32)
def _cached_client(url: str, token: str, allow_private: bool, max_seconds: float) -> LabelStudioClient:
    # One client per server and token: it keeps its connection pool and refreshed access token.
    return LabelStudioClient(url, token, allow_private=allow_private, max_seconds=max_seconds)


def connections_of(request: Request) -> Connections:
    return request.app.state.ls_connections  # type: ignore[no-any-return]


ConnectionsDep = Annotated[Connections, Depends(connections_of)]


def webhook_url(request: Request) -> str:
    """This backend's webhook URL as Label Studio names it: its registered URL + /webhook."""
    url = str(request.url.replace(query=None))
    return url[: -len("/setup")] + "/webhook" if url.endswith("/setup") else url

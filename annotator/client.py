"""A Label Studio server as xdlabel uses it, through label-studio-sdk."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

Task = dict[str, Any]


class LabelStudioUnavailable(ConnectionError):
    """The server did not answer (down, restarting, unreachable); the work can be retried."""


class LabelStudioError(ValueError):
    """The server refused a request (4xx): retrying the same request will not help."""

    def __init__(self, status_code: int | None, body: Any) -> None:
        super().__init__(f"Label Studio answered {status_code}: {body}")
        self.status_code = status_code
        self.body = body


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2


class LabelStudioClient:
    """``token``: a legacy API token or a personal access token (a JWT refresh token)."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=timeout)
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    # -- calls, with connection failures turned into one exception type --------------------------------

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (httpx.TransportError, ConnectionError) as err:
            raise LabelStudioUnavailable(f"Label Studio at {self.url} is not reachable: {err}") from err
        except ApiError as err:
            if err.status_code in (502, 503, 504):
                raise LabelStudioUnavailable(f"Label Studio at {self.url} answered {err.status_code}") from err
            raise LabelStudioError(err.status_code, err.body) from None

    def project(self, project_id: int) -> dict[str, Any]:
        return self.call(self.sdk.projects.get, id=project_id).model_dump()  # type: ignore[no-any-return]

    def tasks(self, project_id: int, page_size: int = 500) -> Iterator[Task]:
        """Every task of the project with its predictions and annotations."""
        page = 1
        while True:
            response = self.call(self._get, "/api/tasks/", params={"project": project_id, "page": page,
                                                                  "page_size": page_size, "fields": "all"})
            if response.status_code == 404:  # past the last page
                return
            response.raise_for_status()
            tasks = response.json().get("tasks", [])
            yield from tasks
            if len(tasks) < page_size:
                return
            page += 1

    def create_project(self, title: str, label_config: str) -> int:
        return int(self.call(self.sdk.projects.create, title=title, label_config=label_config).id)

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Tasks, with their ``predictions`` or ``annotations`` inline; returns the new task ids."""
        response = self.call(self.sdk.projects.import_tasks, id=project_id, request=list(tasks),
                             return_task_ids=True)
        return [int(t) for t in response.task_ids or []]

    def import_predictions(self, project_id: int, predictions: Sequence[dict[str, Any]]) -> int:
        """Bulk import: one request for all of ``predictions`` (each with ``task``)."""
        response = self.call(self.sdk.projects.import_predictions, id=project_id, request=list(predictions))
        return int(getattr(response, "created", len(predictions)) or len(predictions))

    def predictions_of(self, task_id: int) -> list[dict[str, Any]]:
        return [p.model_dump() for p in self.call(self.sdk.predictions.list, task=task_id)]

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """The editor pre-fills only predictions of the project's model version."""
        self.call(self.sdk.projects.update, id=project_id, model_version=model_version)

    def register_ml_backend(self, project_id: int, url: str, user: str, password: str,
                            title: str = "xdlabel X-Decoder", timeout: float = 100.0) -> int:
        """Connects xdlabel's ML backend (``url`` ends in /ml) to a project, interactive, with basic
        auth; Label Studio then calls /health and /setup. The webhook it creates for the backend
        carries no auth header, so the header is added to it here."""
        backend = self.call(self.sdk.ml.create, project=project_id, url=url.rstrip("/"), title=title,
                            is_interactive=True, auth_method="BASIC_AUTH", basic_auth_user=user,
                            basic_auth_pass=password, timeout=timeout)
        header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        hook_url = url.rstrip("/") + "/webhook"
        hooks = [h for h in self.call(self.sdk.webhooks.list, project=str(project_id)) if h.url == hook_url]
        if not hooks:
            hooks = [self.call(self.sdk.webhooks.create, url=hook_url, project=project_id, send_payload=True,
                               send_for_all_actions=True)]
        for hook in hooks:
            self.call(self.sdk.webhooks.update, id=hook.id, url=hook_url, headers={"Authorization": header})
        return int(backend.id)

    # -- files -----------------------------------------------------------------------------------------

    def _auth_header(self) -> dict[str, str]:
        if not _is_jwt(self.token):
            return {"Authorization": f"Token {self.token}"}
        with self._lock:  # a personal access token is exchanged for a short-lived access token
            if self._access is None or self._access[1] < time.monotonic():
                response = httpx.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token},
                                      timeout=self.timeout)
                response.raise_for_status()
                self._access = (response.json()["access"], time.monotonic() + 240)
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(urljoin(self.url + "/", path.lstrip("/")), headers=self._auth_header(),
                         timeout=self.timeout, follow_redirects=True, **kwargs)

    def is_own_url(self, url: str) -> bool:
        parsed = urlparse(url)
        return not parsed.netloc or urlparse(self.url).netloc == parsed.netloc

    def read_file(self, url: str, max_bytes: int) -> bytes:
        """A task's file: Label Studio URLs (``/data/...``, uploads, local files) with its auth,
        other http(s) URLs as they are."""
        if not self.is_own_url(url):
            response = self.call(httpx.get, url, timeout=self.timeout, follow_redirects=True)
        else:
            response = self.call(self._get, url)
        if response.status_code >= 500 and self.is_own_url(url):
            raise LabelStudioUnavailable(f"{url}: the server answered {response.status_code}")
        if response.status_code != 200:
            raise LabelStudioError(response.status_code, f"cannot read {url}")
        if len(response.content) > max_bytes:
            raise ValueError(f"{url}: {len(response.content)} bytes is over the limit of {max_bytes}")
        return response.content

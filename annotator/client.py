"""A Label Studio server as xdlabel uses it, through label-studio-sdk."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn
from urllib.parse import urljoin, urlsplit

import httpx
from label_studio_sdk.core.api_error import ApiError

from annotator.fetcher import FetchError, GuardedFetcher, same_origin
from index.retry import retry

Task = dict[str, Any]


class LabelStudioUnavailable(ConnectionError):
    """The server did not answer, or answered 429/5xx (down, restarting, overloaded): the same
    request may succeed later. ``sent`` is False when it surely was not processed (connection
    refused, 429), so it can go again without asking the server what it did; ``retry_after`` is
    the server's Retry-After in seconds, if it gave one."""

    def __init__(self, message: str, sent: bool = True, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.sent = sent
        self.retry_after = retry_after


class LabelStudioAuthError(PermissionError):
    """401/403: the token is wrong, expired or lacks rights. Nothing will succeed until it is fixed."""


class LabelStudioError(ValueError):
    """The server refused a request (4xx): retrying the same request will not help."""

    def __init__(self, status_code: int | None, body: Any) -> None:
        super().__init__(f"Label Studio answered {status_code}: {body}")
        self.status_code = status_code
        self.body = body


def is_unavailable(err: BaseException) -> bool:
    return isinstance(err, LabelStudioUnavailable)


def _retry_after(headers: Any) -> float | None:
    try:
        value = float((headers or {}).get("retry-after") or (headers or {}).get("Retry-After") or "")
    except ValueError:  # absent, or an HTTP date: back off as usual
        return None
    return value if value >= 0 else None


def _detail(body: Any) -> str:
    """Django REST framework's message out of an error body ({"detail": ...}), else the body."""
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    return str(body)


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2


class LabelStudioClient:
    """``token``: a legacy API token or a personal access token (a JWT refresh token)."""

    def __init__(self, url: str, token: str, timeout: float = 60.0, attempts: int = 3, *,
                 allow_private: bool = False, max_seconds: float = 20.0) -> None:
        self.url = url.rstrip("/")
        # Task files: every URL through the guarded fetcher; this server's own host is configured,
        # so it is allowed even on a private address. ``max_seconds``: one file's whole download.
        self.fetcher = GuardedFetcher(allow_private=allow_private, trusted=[self.url])
        self.max_seconds = max_seconds
        self.token = token
        self.timeout = timeout
        self.attempts = attempts  # tries of a read while the server is unavailable (bounded backoff)
        self.max_retry_after = 30.0  # seconds: a larger Retry-After is cut to this
        # The SDK's own retries would resend a POST whose answer was lost (a duplicate prediction):
        # retries are decided here, per call, instead.
        from label_studio_sdk import LabelStudio  # ~2.5 s to import: only where a client is made

        self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=timeout, max_retries=0)
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    # -- calls, with every failure sorted into one of four classes -------------------------------------

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One try. Raises LabelStudioAuthError (401/403), LabelStudioUnavailable (no answer, 429,
        5xx: transient) or LabelStudioError (any other refusal: this request will never succeed)."""
        try:
            return fn(*args, **kwargs)
        except httpx.ConnectError as err:  # refused or unresolvable: the request never left
            raise LabelStudioUnavailable(f"Label Studio at {self.url} is not reachable: {err}", sent=False) from err
        except (httpx.TransportError, ConnectionError) as err:
            raise LabelStudioUnavailable(f"Label Studio at {self.url} is not reachable: {err}") from err
        except ApiError as err:
            self._raise_for(err.status_code, err.body, err.headers)
        except httpx.HTTPStatusError as err:  # a token exchange refused
            self._raise_for(err.response.status_code, err.response.text[:500], err.response.headers)

    def _raise_for(self, status: int | None, body: Any, headers: Any = None) -> NoReturn:
        if status in (401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {self.url} refused the token ({status}: {_detail(body)}); check XDLABEL_LS_TOKEN (a "
                f"legacy or personal access token of a user of that server) and XDLABEL_LS_URL") from None
        if status is not None and (status == 429 or status >= 500):
            raise LabelStudioUnavailable(f"Label Studio at {self.url} answered {status}", sent=status != 429,
                                         retry_after=_retry_after(headers)) from None
        raise LabelStudioError(status, body) from None

    def retrying(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``call`` for requests that are safe to repeat (reads, setting a field), retried with
        backoff while the server is unavailable (``attempts`` tries in all)."""

        def attempt() -> Any:
            try:
                return self.call(fn, *args, **kwargs)
            except LabelStudioUnavailable as err:
                self.pause(err)
                raise

        return retry(attempt, transient=is_unavailable, attempts=self.attempts, first_wait=0.5, max_wait=5.0,
                     what=f"Label Studio {getattr(fn, '__name__', 'call')}")

    def pause(self, err: LabelStudioUnavailable) -> None:
        """Waits what the server asked for (Retry-After), at most ``max_retry_after`` seconds."""
        if err.retry_after:
            time.sleep(min(err.retry_after, self.max_retry_after))

    def alive(self) -> bool:
        """Whether the server's API answers at all (a file's error is then that file's)."""
        try:
            return httpx.get(f"{self.url}/health", timeout=min(self.timeout, 10.0)).status_code == 200
        except httpx.HTTPError:
            return False

    def project(self, project_id: int) -> dict[str, Any]:
        return self.retrying(self.sdk.projects.get, id=project_id).model_dump()  # type: ignore[no-any-return]

    def tasks(self, project_id: int, page_size: int = 500) -> Iterator[Task]:
        """Every task of the project with its predictions and annotations."""
        page = 1
        while True:
            response = self.retrying(self._get_checked, "/api/tasks/", params={
                "project": project_id, "page": page, "page_size": page_size, "fields": "all"})
            if response.status_code == 404:  # past the last page
                return
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
        return [p.model_dump() for p in self.retrying(self.sdk.predictions.list, task=task_id)]

    def delete_predictions(self, task_id: int, model_version: str) -> int:
        """Deletes the task's predictions of ``model_version`` (before a forced redo replaces them);
        one already gone counts as deleted. Returns how many were there."""
        found = [p for p in self.predictions_of(task_id) if p.get("model_version") == model_version]
        for prediction in found:
            try:
                self.call(self.sdk.predictions.delete, id=prediction["id"])
            except LabelStudioError as err:
                if err.status_code != 404:
                    raise
        return len(found)

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """The editor pre-fills only predictions of the project's model version."""
        self.retrying(self.sdk.projects.update, id=project_id, model_version=model_version)

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

    def _absolute(self, url: str) -> str:
        """``url`` made absolute: a path (``/data/...``) is under the server's URL."""
        parts = urlsplit(url)
        return urljoin(self.url + "/", url if parts.scheme or parts.netloc else url.lstrip("/"))

    def _get(self, path: str, **kwargs: Any) -> httpx.Response:
        """An API GET with the token, which never leaves the server's origin: redirects are followed
        only within it."""
        url = self._absolute(path)
        for _ in range(5):
            if not self.is_own_url(url):
                raise LabelStudioError(None, f"{path}: not on Label Studio's origin {self.url}")
            response = httpx.get(url, headers=self._auth_header(), timeout=self.timeout, follow_redirects=False,
                                 **kwargs)
            if not response.is_redirect:
                return response
            url = urljoin(str(response.url), response.headers.get("location", ""))
            kwargs.pop("params", None)  # the Location carries its own query
        raise LabelStudioError(None, f"{path}: too many redirects")

    def _get_checked(self, path: str, **kwargs: Any) -> httpx.Response:
        """``_get`` with refusals classified as ``call`` does for the SDK (404 is left to the caller)."""
        response = self._get(path, **kwargs)
        if response.status_code >= 400 and response.status_code != 404:
            self._raise_for(response.status_code, response.text[:500], response.headers)
        return response

    def is_own_url(self, url: str) -> bool:
        """Whether ``url`` (a path is) is on this server's origin: scheme, host and port."""
        return same_origin(self._absolute(url), self.url)

    def read_file(self, url: str, max_bytes: int) -> bytes:
        """A task's file, at most ``max_bytes``, within ``max_seconds``, through the guarded fetcher:
        Label Studio's own URLs (``/data/...``, uploads, local files) with its token, which goes to
        no other origin (a redirect elsewhere is followed without it); any other URL without it,
        refused on a private address unless allowed. Failures on the server's own origin raise as
        ``call`` does (LabelStudioUnavailable, LabelStudioAuthError, LabelStudioError); others
        FetchError (``transient`` says whether to try again)."""
        own = self.is_own_url(url)
        headers = self.call(self._auth_header) if own else {}
        try:
            return self.fetcher.get(self._absolute(url) if own else url, max_bytes=max_bytes,
                                    timeout=self.max_seconds, headers=headers)
        except FetchError as err:
            if not own or (err.url is not None and not self.is_own_url(err.url)):
                raise
            if err.status is not None:
                self._raise_for(err.status, f"cannot read {url}")
            if err.transient:
                raise LabelStudioUnavailable(f"Label Studio at {self.url} is not reachable: {err}") from err
            raise

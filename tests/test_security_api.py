"""The HTTP API tried as an attacker holding a key would, against a real uvicorn server on SQLite.

A secret lives outside the configured source root (a text file and a PNG, both carrying a random
token); the root holds images, symlinks out, a list file naming outside files and a "PNG" that is
really the secret text. No response of any endpoint may carry a byte of the token or of
/etc/passwd. Then the caps (body bytes, pixels), /health under model load, and a bounded
schemathesis run over the whole OpenAPI with a write key, a read key and no key.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gc
import http.server
import io
import itertools
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image, PngImagePlugin
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy import select

from index.db import upgrade
from index.models import Image as ImageRow
from tests.conftest import Server, make_images
from xdlabel.api.app import create_app
from xdlabel.api.auth import create_api_key
from xdlabel.ingest import ingest_files
from xdlabel.jobs import work
from xdlabel.services import Services
from xdlabel.settings import Settings

PASSWD = Path("/etc/passwd").read_bytes()[:40]  # its first line's start: root:x:0:0:...


def _png_with(token: str, size: tuple[int, int] = (64, 48)) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("secret", token)
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "PNG", pnginfo=info)
    return out.getvalue()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    token = f"TOPSECRET-{uuid.uuid4().hex}"
    root, outside, data = tmp_path / "allowed", tmp_path / "outside", tmp_path / "data"
    outside.mkdir()
    (outside / "secret.txt").write_text(f"root:x:0:0:{token}\n")
    (outside / "secret.png").write_bytes(_png_with(token))
    photos = make_images(root / "photos", 3)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "garbage.png").write_text(f"root:x:0:0:{token}\n")  # a failed image if ever read
    (root / "list.txt").write_text(f"/etc/passwd\n{outside / 'secret.png'}\n{outside / 'secret.txt'}\n")
    settings = Settings(data_dir=data, source_roots=[root], short_side=128, max_upload_bytes=1024 * 1024,
                        ml_backend_password="pw")
    upgrade(settings.sqlalchemy_url)
    services = Services(settings)
    ingest_files(services, "cli", photos)  # the CLI's own ingestion: trusted paths
    with services.sessions() as session:
        write, read = create_api_key(session, "writer"), create_api_key(session, "reader", scopes=["read"])
    with Server(services) as url:
        yield {"url": url, "services": services, "token": token, "root": root, "outside": outside, "data": data,
               "write": write, "read": read, "tmp": tmp_path}
    services.engine.dispose()


def _clean(response: httpx.Response, world: dict[str, Any], paths: bool = True) -> bool:
    """No byte of the secrets; with ``paths``, not the server's folders either."""
    body = response.content
    secret_png = (world["outside"] / "secret.png").read_bytes()
    return world["token"].encode() not in body and PASSWD not in body and secret_png not in body \
        and not (paths and str(world["tmp"]).encode() in body)


def test_job_sources_outside_the_roots_are_refused(world: dict[str, Any]) -> None:
    """12 ways to name a file outside the root (absolute, .., file://, a symlink, the database, the
    data folder, a list file naming outside files, /proc) with a write key: all 400, nothing queued,
    no byte of the secret in the answer; a read key may not submit at all."""
    root, outside, data = world["root"], world["outside"], world["data"]
    attempts = ["/etc/passwd", str(outside / "secret.txt"), str(outside / "secret.png"),
                f"{root}/../outside/secret.png", str(root / "link.png"), str(root / "linked" / "secret.png"),
                str(data / "xdlabel.db"), str(data), (outside / "secret.png").as_uri(), str(root / "list.txt"),
                "../outside/secret.png", "/proc/self/environ"]
    with httpx.Client(base_url=world["url"], timeout=30) as client:
        for source in attempts:
            r = client.post("/v1/jobs", json={"dataset": "web", "sources": [source]},
                            headers={"X-API-Key": world["write"]})
            assert r.status_code == 400, (source, r.text)
            # the answer may name the source as sent, never what lies behind it
            assert _clean(r, world, paths=False) and r.json()["error"]["message"], source
            assert str(outside).encode() not in r.content or str(outside) in source, (source, r.text)
            r = client.post("/v1/jobs", json={"dataset": "web", "sources": [source]},
                            headers={"X-API-Key": world["read"]})
            assert r.status_code == 403
        assert client.get("/v1/jobs", headers={"X-API-Key": world["read"]}).json() == []


def test_nothing_outside_the_root_is_ever_served(world: dict[str, Any]) -> None:
    """Two jobs run by a real worker: the whole root (accepted: it is allowed; its symlinks out are
    not followed) and its photos with the fake PNG, which fails and is never served back. Then every
    endpoint that can show an image or a job, with both keys, for every stored image: no secret byte."""
    services, root = world["services"], world["root"]
    with httpx.Client(base_url=world["url"], timeout=60) as client:
        job_ids = []
        for sources in ([str(root)], [str(root / "photos"), str(root / "garbage.png")]):
            r = client.post("/v1/jobs", json={"dataset": "web", "sources": sources},
                            headers={"X-API-Key": world["write"]})
            assert r.status_code == 201, r.text
            assert r.json()["params"]["restricted"] is True
            job_ids.append(r.json()["id"])
        assert work(services, once=True) == 2
        with services.sessions() as session:
            rows = session.scalars(select(ImageRow)).all()
            failed = [im.id for im in rows if im.status != "done"]
            ids, done = [im.id for im in rows], sum(im.status == "done" for im in rows)
        assert failed, "the fake PNG in the root should be stored as failed"
        responses = []
        for key in (world["read"], world["write"]):
            headers = {"X-API-Key": key}
            responses += [client.get(f"/v1/jobs/{job_id}", headers=headers) for job_id in job_ids]
            responses.append(client.get("/v1/jobs", headers=headers))
            responses.append(client.post("/v1/search/text", json={"query": "x", "k": 50}, headers=headers))
            for image_id in ids:
                for suffix in ("", "/original", "/thumbnail", "/predictions", "/regions"):
                    responses.append(client.get(f"/v1/images/{image_id}{suffix}", headers=headers))
            for image_id in failed:
                assert client.get(f"/v1/images/{image_id}/original", headers=headers).status_code == 404
        assert all(response.status_code < 500 for response in responses)
        # jobs show the sources as submitted (paths in the root), never what lies outside it
        dirty = [str(response.url) for response in responses
                 if not _clean(response, world, paths="/jobs" not in response.url.path)
                 or str(world["outside"]).encode() in response.content]
        assert dirty == []
        served = [response for response in responses if response.url.path.endswith("/original")
                  and response.status_code == 200]
        hits = client.post("/v1/search/text", json={"query": "x", "k": 50},
                           headers={"X-API-Key": world["read"]}).json()["hits"]
        # under the root: the path relative to it; the CLI's photos are in the root too
        assert {h["uri"] for h in hits} == {f"photos/{p.name}" for p in (root / "photos").iterdir()}
        photos = {p.read_bytes() for p in (root / "photos").iterdir()}
        assert len(served) == 2 * done and all(response.content in photos for response in served)


def _bomb() -> bytes:
    """A valid PNG declaring 12000x12000 (144 Mpx, 432 MB as RGB) in a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\x00" * (12000 * 3 + 1) * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _read_all(s: socket.socket) -> bytes:
    """What the server sent until it closed the connection (bounded by the socket's timeout)."""
    reply = b""
    try:
        while part := s.recv(65536):
            reply += part
    except OSError:  # reset after the answer: what came before is the reply
        pass
    return reply


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_upload_and_pixel_caps(world: dict[str, Any]) -> None:
    """A PNG declaring 12000x12000 is refused before decoding (fast, no memory jump); a body
    announced as 1 GiB is refused before it is sent; a chunked 1 GiB body is cut off near the 1 MiB
    cap (the bytes the server accepted are counted from the client side)."""
    url = world["url"]
    headers = {"X-API-Key": world["read"]}
    before, start = _maxrss_mb(), time.monotonic()
    r = httpx.post(f"{url}/v1/search/image", files={"file": ("bomb.png", _bomb(), "image/png")}, headers=headers,
                   timeout=30)
    elapsed = time.monotonic() - start
    assert r.status_code == 413 and "64000000-pixel limit" in r.json()["error"]["message"], r.text
    assert elapsed < 2.0 and _maxrss_mb() - before < 200, (elapsed, _maxrss_mb() - before)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/search/image HTTP/1.1\r\nHost: x\r\nX-API-Key: {world['read']}\r\n"
                  f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {2**30}\r\n\r\n".encode())
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 413") and b"1114112 bytes" in reply, reply[:200]
    sent, chunk = 0, b"0" * 65536
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/search/image HTTP/1.1\r\nHost: x\r\nX-API-Key: {world['read']}\r\n"
                  "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")  # then the file's bytes, without end
        try:
            while sent < 2**30:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:  # the server answered and closed: the rest was never taken
            pass
        reply = _read_all(s) if sent < 2**30 else b""
    print(f"chunked 1 GiB upload: the client could send {sent / 2**20:.1f} MiB before the server closed")
    assert sent < 64 * 2**20, f"the server took {sent} bytes of a 1 GiB body"
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _serve_process(world: dict[str, Any], env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """``xdlabel serve`` on the world's database and settings, a process of its own as in production;
    yields its URL and pid. Its log goes to a file that a failing test prints."""
    from bench.search_load import stop_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = world["tmp"] / "serve.log"
    settings_ = world["services"].settings
    env = {**os.environ, "XDLABEL_DATA_DIR": str(settings_.data_dir),
           "XDLABEL_SOURCE_ROOTS": ",".join(map(str, settings_.source_roots)),
           "XDLABEL_SHORT_SIDE": str(settings_.short_side), "XDLABEL_MAX_UPLOAD_BYTES": str(settings_.max_upload_bytes),
           "XDLABEL_ML_BACKEND_PASSWORD": "pw", **env}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "xdlabel"), "serve", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        yield url, proc.pid
    except BaseException:
        print(log.read_text()[-3000:])
        raise
    finally:
        stop_group(proc)


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_health_stays_fast_while_the_model_works(world: dict[str, Any]) -> None:
    """Two clients keep the model busy (image searches with 640x480 uploads, /ml/predict batches of
    4 tasks read from a local origin playing Label Studio) while /health and /ml/health (Label
    Studio's 1 s check) are sampled every 20 ms: neither waits for the model (p95 and max under 100 ms).
    Before that, a task image declaring 12000x12000 is skipped by /ml/predict without decoding it.

    The server is the real ``xdlabel serve`` in a process of its own: an in-thread server would share
    pytest's interpreter, whose collector walks every object of hundreds of earlier tests, and time
    those pauses as the server's. For the same reason the collector of this (measuring) process is off
    while it samples."""
    folder = world["tmp"] / "ls" / "data"
    folder.mkdir(parents=True)
    for k in range(4):
        Image.new("RGB", (320, 240), (40 * k, 90, 160)).save(folder / f"{k}.png")
    handler = functools.partial(_Files, directory=str(world["tmp"] / "ls"))
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    upload = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 120, 30)).save(upload, "PNG")
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
              '<Label value="Ball" predicted_values="circle"/></BrushLabels></View>')
    tasks = [{"id": k, "data": {"image": f"/data/{k}.png"}} for k in range(4)]
    auth = {"Authorization": "Basic " + base64.b64encode(b"xdlabel:pw").decode()}
    ls = {"XDLABEL_LS_URL": f"http://127.0.0.1:{origin.server_address[1]}", "XDLABEL_LS_TOKEN": "t"}
    with _serve_process(world, ls) as (url, pid):
        stop, done, errors = threading.Event(), {"search": 0, "predict": 0}, []

        def search() -> None:
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    r = c.post(f"{url}/v1/search/image", headers={"X-API-Key": world["read"]},
                               files={"file": ("q.png", upload.getvalue(), "image/png")})
                    if r.status_code != 200:
                        errors.append(r.text)
                        return
                    done["search"] += 1

        projects = itertools.count(1)

        def predict() -> None:
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    # a project of its own per call: a stored prediction would be answered without the model
                    r = c.post(f"{url}/ml/predict", headers=auth, json={"tasks": tasks, "label_config": config,
                                                                        "project": f"{next(projects)}.1"})
                    if r.status_code != 200 or not all(x["score"] > 0 for x in r.json()["results"]):  # all read
                        errors.append(r.text[:300])
                        return
                    done["predict"] += 1

        httpx.post(f"{url}/v1/search/text", json={"query": "warm up"}, headers={"X-API-Key": world["read"]},
                   timeout=120)
        # the pixel cap on the ML backend's path too: a task image declaring 12000x12000 is skipped, fast
        (folder / "bomb.png").write_bytes(_bomb())
        before, start = _peak_rss_mb(pid), time.monotonic()
        r = httpx.post(f"{url}/ml/predict", headers=auth, timeout=60, json={
            "tasks": [{"id": 9, "data": {"image": "/data/bomb.png"}}, tasks[0]], "label_config": config,
            "project": "9999.1"})
        assert r.status_code == 200 and time.monotonic() - start < 10 and _peak_rss_mb(pid) - before < 200
        bomb_result, fine_result = r.json()["results"]
        assert bomb_result["result"] == [] and bomb_result["score"] == 0.0 and fine_result["score"] > 0
        workers = [threading.Thread(target=f) for f in (search, predict, search)]
        samples = []
        gc.disable()
        try:
            with httpx.Client(base_url=url, timeout=10) as client:
                client.get("/health")  # the connection is open before the load starts: only answers are timed
                for t in workers:
                    t.start()
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline or min(done.values()) < 2:
                    assert time.monotonic() < deadline + 60 and not errors, (done, errors)
                    for path, headers in (("/health", {}), ("/ml/health", auth)):
                        start = time.perf_counter()
                        assert client.get(path, headers=headers).status_code == 200
                        samples.append(time.perf_counter() - start)
                    time.sleep(0.02)
        finally:
            gc.enable()
            stop.set()
            for t in workers:
                t.join(120)
            origin.shutdown()
        p95 = statistics.quantiles(samples, n=20)[-1]
        print(f"/health and /ml/health under load: {len(samples)} samples, "
              f"p50 {statistics.median(samples) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
              f"max {max(samples) * 1000:.1f} ms; {done}")
        assert min(done.values()) >= 2 and len(samples) >= 200
        assert p95 < 0.1 and max(samples) < 0.1



# -- schemathesis: every operation, three identities, fixed seed ------------------------------------

def test_no_server_error_and_no_schema_violation(world: dict[str, Any]) -> None:
    """Every operation of the OpenAPI, valid and invalid requests (NULs allowed) generated by
    schemathesis with a fixed seed, each sent with a write key, a read key and no key (the /ml routes
    with basic auth): no 5xx, and every answer matches the schema documented for its status."""
    from hypothesis import given, seed

    app = create_app(services=world["services"])
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    api.config.generation.update(allow_x00=True)
    basic = "Basic " + base64.b64encode(b"xdlabel:pw").decode()
    own_keys = {"1", "2"}  # the fixture's keys: revoking them would blind the rest of the run
    failures: list[str] = []
    sent = 0

    def exercise(case: Any) -> None:
        nonlocal sent
        for key in (world["write"], world["read"], None):
            if case.path == "/v1/keys/{key_id}" and str((case.path_parameters or {}).get("key_id")) in own_keys:
                continue
            headers = {"X-API-Key": key} if key else {}
            if case.path.startswith("/ml"):
                headers["Authorization"] = basic
            response = case.call(headers=headers)
            sent += 1
            where = f"{case.method} {case.formatted_path} ({'key' if key else 'no key'})"
            if response.status_code >= 500:
                failures.append(f"{where}: {response.status_code} {response.text[:200]}")
                continue
            try:
                case.validate_response(response, checks=[response_schema_conformance], headers=headers)
            except Exception as err:  # noqa: BLE001 - schemathesis' FailureGroup: collected, reported at the end
                failures.append(f"{where}: {str(err)[:300]}")

    start = time.monotonic()
    operations = [result.ok() for result in api.get_all_operations()]
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            run = seed(20261201)(settings(max_examples=EXAMPLES, deadline=None, database=None,
                                          suppress_health_check=list(HealthCheck))(
                given(case=operation.as_strategy(generation_mode=mode))(exercise)))
            try:
                run()
            except Exception as err:  # noqa: BLE001 - a strategy that cannot generate is not an API failure
                if "Unsatisfiable" not in type(err).__name__:
                    raise
    print(f"schemathesis: {len(operations)} operations, {sent} requests in {time.monotonic() - start:.1f} s, "
          f"{len(failures)} failures")
    assert failures == [], "\n".join(failures[:20])


EXAMPLES = 15


def test_thumbnail_reads_only_the_verified_original(world: dict[str, Any]) -> None:
    """An ingested photo is replaced by a symlink to an outside image (the secret PNG, then a copy of
    the photo renamed outside, same size): a thumbnail of a size not cached yet is 404, the cache never
    holds a thumbnail of the outside image; the sizes 16..1024 (all 1009 of them) make at most 5 files."""
    services, outside = world["services"], world["outside"]
    thumbs = services.settings.thumbnail_dir
    with services.sessions() as session:
        image = session.scalars(select(ImageRow).where(ImageRow.status == "done")).first()
        image_id, path = image.id, Path(image.uri.removeprefix("file://"))
    headers = {"X-API-Key": world["read"]}
    with httpx.Client(base_url=world["url"], timeout=60) as client:
        for size in range(16, 1025):
            assert client.get(f"/v1/images/{image_id}/thumbnail", params={"size": size},
                              headers=headers).status_code == 200, size
        assert len(list(thumbs.iterdir())) <= 5
        real = {p.name: p.read_bytes() for p in thumbs.iterdir()}
        for name in real:
            (thumbs / name).unlink()
        original = path.read_bytes()
        (outside / "other.png").write_bytes(_png_with(world["token"], Image.open(path).size))
        path.unlink()
        path.symlink_to(outside / "other.png")
        for size in (16, 100, 256, 1024):
            r = client.get(f"/v1/images/{image_id}/thumbnail", params={"size": size}, headers=headers)
            assert r.status_code == 404 and _clean(r, world), r.text
        assert list(thumbs.iterdir()) == []
        path.unlink()
        path.write_bytes(original)
        r = client.get(f"/v1/images/{image_id}/thumbnail", params={"size": 100}, headers=headers)
        assert r.status_code == 200 and r.content in real.values()


def test_ml_predict_goes_in_chunks_in_task_order(world: dict[str, Any]) -> None:
    """/ml/predict of 11 tasks (10 images of distinct sizes from a local origin playing Label Studio,
    one missing file at index 5): 11 results in task order (each result's original size is its own
    task's image; the missing one empty), and the model never encodes more than 4 images at once
    (the encoder is wrapped to record batch sizes: it still runs for real). Then a text search sent
    while a 22-task predict runs (its encoder slowed by 0.3 s a chunk) answers before the last chunk."""
    services = world["services"]
    folder = world["tmp"] / "ls" / "data"
    folder.mkdir(parents=True)
    sizes = [(96 + 16 * k, 64 + 8 * k) for k in range(11)]
    for k, size in enumerate(sizes):
        if k != 5:
            Image.new("RGB", size, (20 * k, 90, 160)).save(folder / f"{k}.png")
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_Files, directory=str(world["tmp"] / "ls")))
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    services.settings.ls_url, services.settings.ls_token = f"http://127.0.0.1:{origin.server_address[1]}", "t"
    predictor = services.predictor
    batches: list[int] = []
    encode = predictor.encode

    def recording(images: Any, *args: Any, **kwargs: Any) -> Any:
        batches.append(len(images))
        return encode(images, *args, **kwargs)

    predictor.encode = recording  # type: ignore[method-assign]
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
              '<Label value="Ball" predicted_values="circle"/></BrushLabels></View>')
    tasks = [{"id": k, "data": {"image": f"/data/{k}.png"}} for k in range(11)]
    auth = {"Authorization": "Basic " + base64.b64encode(b"xdlabel:pw").decode()}

    projects = itertools.count(1)  # a project of its own per call: predictions are stored once per project

    def ask(some: list[dict[str, Any]]) -> list[dict[str, Any]]:
        r = httpx.post(f"{world['url']}/ml/predict", headers=auth, timeout=120,
                       json={"tasks": some, "label_config": config, "project": f"{next(projects)}.1"})
        assert r.status_code == 200, r.text
        return r.json()["results"]  # type: ignore[no-any-return]

    try:
        results = ask(tasks)
        chunked = list(batches)
        alone = {k: ask([tasks[k]])[0] for k in (0, 4, 6, 10)}  # each task on its own: the reference
        # a long batch (6 chunks, each encode slowed by 0.3 s) does not hold the model for its whole length
        started, calls = threading.Event(), []

        def slow(images: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(time.monotonic())
            started.set()
            time.sleep(0.3)
            return encode(images, *args, **kwargs)

        predictor.encode = slow  # type: ignore[method-assign]
        # 22 distinct task ids (a task id is answered once per call) over the 10 images
        long = threading.Thread(target=ask, args=([{"id": 100 + k, "data": tasks[k % 11]["data"]}
                                                   for k in range(24) if k % 11 != 5],))
        long.start()
        assert started.wait(60)
        r = httpx.post(f"{world['url']}/v1/search/text", json={"query": "a ball"},
                       headers={"X-API-Key": world["read"]}, timeout=60)
        searched = time.monotonic()
        long.join(120)
        assert r.status_code == 200 and len(calls) >= 5 and searched < calls[-1], (len(calls), searched, calls)
    finally:
        origin.shutdown()
        predictor.encode = encode  # type: ignore[method-assign]
    assert len(results) == 11 and results[5]["result"] == [] and results[5]["score"] == 0.0
    assert all(results[k]["score"] > 0 for k in range(11) if k != 5)
    for k, result in alone.items():
        assert results[k]["score"] == pytest.approx(result["score"], abs=1e-3), k
    assert len({round(results[k]["score"], 4) for k in alone}) == len(alone)  # distinct: order is visible
    assert sum(chunked) == 10 and max(chunked) <= 4 and len(chunked) >= 3, chunked


def test_job_answers_hide_server_paths(world: dict[str, Any]) -> None:
    """A job over the photos and the fake PNG (which fails) run by a real worker: its errors name the
    file under the root, never the server's path. Then the job's error is set to a real SQLAlchemy
    error whose statement carries a path parameter: the answer keeps one line, no SQL, no path."""
    from sqlalchemy import text

    from index.models import Job

    services, root = world["services"], world["root"]
    headers = {"X-API-Key": world["read"]}
    with httpx.Client(base_url=world["url"], timeout=60) as client:
        sources = [str(root / "photos"), str(root / "garbage.png")]
        r = client.post("/v1/jobs", json={"dataset": "web", "sources": sources}, headers={"X-API-Key": world["write"]})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert work(services, once=True) == 1
        shown = client.get(f"/v1/jobs/{job_id}", headers=headers)
        # params keep the sources as submitted; errors never show a server path
        assert shown.status_code == 200 and str(world["tmp"]) not in str(shown.json()["errors"]), shown.text
        assert [e["uri"] for e in shown.json()["errors"]] == ["garbage.png"]
        with services.sessions() as session:
            try:
                session.execute(text("INSERT INTO no_such_table VALUES (:p)"), {"p": str(root / "x.png")})
            except Exception as err:  # noqa: BLE001 - the real exception text is what is stored
                raw = f"{type(err).__name__}: {err}"
            session.rollback()
            job = session.get(Job, job_id)
            job.error = raw
            session.commit()
        assert "[SQL:" in raw and str(root) in raw
        for shown in (client.get(f"/v1/jobs/{job_id}", headers=headers), client.get("/v1/jobs", headers=headers)):
            body = shown.json() if isinstance(shown.json(), list) else [shown.json()]
            assert shown.status_code == 200 and all(str(world["tmp"]) not in str((j["errors"], j["error"]))
                                                    for j in body), shown.text
        error = client.get(f"/v1/jobs/{job_id}", headers=headers).json()["error"]
        assert error.startswith("OperationalError") and "\n" not in error and "SQL" not in error, error

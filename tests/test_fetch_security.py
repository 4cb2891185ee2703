"""Outbound fetches and local sources, tried as an attacker would.

Every request goes only to 127.0.0.1: a test origin (http.server in a thread) serves an image,
redirects, a redirect chain, a slow drip, a huge body and error statuses, and records every request
with its headers. Private and link-local addresses other than loopback are never connected to:
those checks run with an injected connect hook that fails the test if it is called, and a "public"
name is an injected resolver answer that the hook sends to the test origin.
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from annotator.client import LabelStudioClient, LabelStudioError, LabelStudioUnavailable
from annotator.fetcher import FetchError, GuardedFetcher
from index.db import upgrade
from tests.conftest import Server
from xdlabel.services import Services
from xdlabel.settings import Settings
from xdlabel.sources import SourceRefused, check_sources, fetch, items_from

PUBLIC = "93.184.216.34"  # what the injected resolver answers for "public" names; never connected to
HUGE = 64 * 1024 * 1024
CHUNK = b"\0" * 65536


def png(seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), (seed % 256, 80, 160)).save(out, "PNG")
    return out.getvalue()


class Origin:
    """A test origin on 127.0.0.1 that records (path, headers) of every request it gets, and for
    the big bodies how many bytes it sent before the client went away."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sent: dict[str, tuple[int, bool]] = {}  # path -> (bytes written, client closed early)
        self.stop = threading.Event()
        self.image = png(1)
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                origin.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
                if path.endswith("/image.png"):
                    self._answer(200, origin.image, (("Content-Type", "image/png"),))
                elif path == "/redirect":
                    self._answer(302, b"", (("Location", query["to"][0]),))
                elif path.startswith("/chain/"):
                    left = int(path.rsplit("/", 1)[1])
                    self._answer(302, b"", (("Location", f"/chain/{left - 1}" if left else "/image.png"),))
                elif path.startswith("/status/"):
                    self._answer(int(path.rsplit("/", 1)[1]), b"no")
                elif path == "/slow":  # one byte every 0.2 s, 100 bytes announced
                    self._drip()
                elif path in ("/huge", "/huge-declared"):
                    self._huge(declared=path == "/huge-declared")
                else:
                    self._answer(404, b"")

            def _answer(self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _drip(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                try:
                    for _ in range(100):
                        if origin.stop.wait(0.2):
                            return
                        self.wfile.write(b"x")
                        self.wfile.flush()
                except OSError:
                    return

            def _huge(self, declared: bool) -> None:
                self.send_response(200)
                if declared:
                    self.send_header("Content-Length", str(HUGE))
                self.end_headers()  # otherwise HTTP/1.0: the body ends when the connection does
                written, closed = 0, False
                try:
                    while written < HUGE and not origin.stop.is_set():
                        self.wfile.write(CHUNK)
                        written += len(CHUNK)
                except OSError:
                    closed = True
                origin.sent[self.path] = (written, closed)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin() -> Iterator[Origin]:
    with Origin() as server:
        yield server


class Net:
    """An injected resolver and connect hook: names in ``answers`` resolve to those addresses (a
    list per call, the last one repeated); a connect to ``PUBLIC`` goes to the test origin; a
    connect to any other address that is not loopback fails the test."""

    def __init__(self, port: int, answers: dict[str, list[list[str]]] | None = None) -> None:
        self.port, self.answers = port, answers or {}
        self.lookups: list[str] = []
        self.connects: list[tuple[str, int]] = []

    def resolve(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.lookups.append(host)
        calls = self.answers.get(host)
        if calls is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = calls[min(self.lookups.count(host), len(calls)) - 1]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answer]

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        self.connects.append(address)
        if address[0] == PUBLIC:
            return socket.create_connection(("127.0.0.1", self.port), timeout)
        assert address[0] in ("127.0.0.1", "::1"), f"tried to connect to {address}"
        return socket.create_connection(address, timeout)

    def fetcher(self, **kwargs: Any) -> GuardedFetcher:
        return GuardedFetcher(resolver=self.resolve, connect=self.connect, **kwargs)


SSRF_HOSTS = ["127.0.0.1", "[::1]", "2130706433", "0x7f000001", "127.1", "0177.0.0.1", "0x7f.1",
              "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "169.254.169.254", "[fe80::1]", "10.0.0.1",
              "192.168.1.1", "172.16.0.1", "100.64.0.1", "240.0.0.1", "0.0.0.0", "[::]", "224.0.0.1", "[fc00::1]",
              "[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::]", "private.test", "localhost"]


@pytest.mark.parametrize("host", SSRF_HOSTS)
def test_non_public_hosts_are_refused_before_any_connection(origin: Origin, host: str) -> None:
    """24 host forms (numeric spellings of 127.0.0.1, IPv6 with embedded IPv4, NAT64 and 6to4
    of the metadata address, private, shared, reserved, multicast and unspecified ranges, a name
    resolving to 10.0.0.1): refused, nothing connected."""
    net = Net(origin.port, {"private.test": [["10.0.0.1"]], "localhost": [["127.0.0.1", "::1"]]})
    with pytest.raises(FetchError, match="non-public address") as err:
        net.fetcher().get(f"http://{host}:{origin.port}/image.png", max_bytes=10_000)
    assert err.value.transient is False
    assert net.connects == [] and origin.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "2130706433", "0x7f000001", "127.1", "localhost",
                                  "[::ffff:127.0.0.1]"])
def test_sources_fetch_refuses_loopback_forms(origin: Origin, host: str) -> None:
    """The ingest path (default resolver and connect): loopback spellings refused, the origin saw
    nothing; allowed, the IPv4 spellings reach it (the origin listens on 127.0.0.1 only)."""
    url = f"http://{host}:{origin.port}/image.png"
    with pytest.raises(FetchError, match="non-public address"):
        fetch(url, max_bytes=10_000)
    assert origin.requests == []
    if "[" not in host:
        assert fetch(url, max_bytes=10_000, allow_private=True) == origin.image


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/image.png", "http://[::1]:{port}/image.png",
                                    "http://2130706433:{port}/image.png", "http://169.254.169.254/latest/meta-data",
                                    "http://10.0.0.1/", "http://[::ffff:127.0.0.1]:{port}/", "file:///etc/passwd",
                                    "http://private.test/"])
def test_redirects_to_non_public_addresses_are_refused(origin: Origin, target: str) -> None:
    """A public name (simulated) redirects to 8 private targets: the first hop is fetched, the
    redirect is refused, no second connection is made."""
    net = Net(origin.port, {"public.test": [[PUBLIC]], "private.test": [["192.168.1.1"]]})
    url = f"http://public.test:{origin.port}/redirect?to=" + target.format(port=origin.port)
    with pytest.raises(FetchError, match="non-public address|unsupported URI scheme"):
        net.fetcher().get(url, max_bytes=10_000)
    assert net.connects == [(PUBLIC, origin.port)]
    assert [path for path, _ in origin.requests] == [urlsplit(url).path + "?" + urlsplit(url).query]


def test_dns_rebinding_gets_no_second_resolution(origin: Origin) -> None:
    """The name answers public first and 127.0.0.1 after: one lookup, the connection goes to the
    checked address, with the name in Host. An answer holding both is refused outright."""
    net = Net(origin.port, {"rebind.test": [[PUBLIC], ["127.0.0.1"]], "both.test": [[PUBLIC, "127.0.0.1"]]})
    assert net.fetcher().get(f"http://rebind.test:{origin.port}/image.png", max_bytes=10_000) == origin.image
    assert net.lookups == ["rebind.test"] and net.connects == [(PUBLIC, origin.port)]
    assert origin.requests[-1][1]["host"] == f"rebind.test:{origin.port}"
    with pytest.raises(FetchError, match="non-public address 127.0.0.1"):
        net.fetcher().get(f"http://both.test:{origin.port}/image.png", max_bytes=10_000)
    assert len(net.connects) == 1


def test_allowed_private_connects_to_the_pinned_address_with_the_name_as_host(origin: Origin) -> None:
    net = Net(origin.port, {"images.internal": [["127.0.0.1"]]})
    body = net.fetcher(allow_private=True).get(f"http://images.internal:{origin.port}/image.png", max_bytes=10_000)
    assert body == origin.image
    assert net.connects == [("127.0.0.1", origin.port)]
    assert origin.requests[0][1]["host"] == f"images.internal:{origin.port}"


def test_tls_verifies_the_name_while_connecting_to_the_pinned_address(tmp_path: Path) -> None:
    """HTTPS to a name pinned to 127.0.0.1: SNI and the certificate check use the name (a
    certificate for images.test passes for images.test, fails for other.test on the same address)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=images.test", "-days", "1",
                    "-addext", "subjectAltName=DNS:images.test"], check=True, capture_output=True, timeout=60)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_side.sni_callback = lambda sock, name, context: names.append(name)  # type: ignore[assignment,func-returns-value]
    with Origin(tls=server_side) as origin:
        net = Net(origin.port, {"images.test": [["127.0.0.1"]], "other.test": [["127.0.0.1"]]})
        fetcher = net.fetcher(allow_private=True, ssl_context=ssl.create_default_context(cafile=str(cert)))
        assert fetcher.get(f"https://images.test:{origin.port}/image.png", max_bytes=10_000) == origin.image
        assert names == ["images.test"] and origin.requests[0][1]["host"] == f"images.test:{origin.port}"
        with pytest.raises(FetchError, match="certificate does not verify") as err:
            fetcher.get(f"https://other.test:{origin.port}/image.png", max_bytes=10_000)
        assert err.value.transient is False and net.connects == [("127.0.0.1", origin.port)] * 2
        assert len(origin.requests) == 1


def test_redirect_chains_are_rechecked_and_bounded(origin: Origin) -> None:
    """Every hop is looked up and checked again; more than max_redirects hops is an error."""
    net = Net(origin.port, {"public.test": [[PUBLIC]]})
    assert net.fetcher().get(f"http://public.test:{origin.port}/chain/4", max_bytes=10_000) == origin.image
    assert net.lookups == ["public.test"] * 6 and len(net.connects) == 6
    with pytest.raises(FetchError, match="more than 5 redirects") as err:
        net.fetcher().get(f"http://public.test:{origin.port}/chain/9", max_bytes=10_000)
    assert err.value.transient is False


@pytest.mark.parametrize("path", ["/huge", "/huge-declared"])
def test_the_byte_cap_stops_reading(origin: Origin, path: str) -> None:
    """A 64 MiB body against a 1 MiB cap (close-delimited and with Content-Length): refused, the
    server sees the connection closed early, and the fetch never holds more than a few MiB."""
    fetcher = GuardedFetcher(allow_private=True)
    tracemalloc.start()
    try:
        # with Content-Length: refused on the header, before reading the body
        with pytest.raises(FetchError, match=f"{HUGE} bytes is over" if "declared" in path else "more than") as err:
            fetcher.get(origin.url + path, max_bytes=1024 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.transient is False
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes"
    deadline = time.monotonic() + 10
    while path not in origin.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    written, closed = origin.sent[path]
    assert closed and written < HUGE // 2, (written, closed)


def test_the_deadline_cuts_a_slow_drip(origin: Origin) -> None:
    """One byte every 0.2 s never trips a per-read timeout; the 1 s deadline ends it anyway."""
    start = time.monotonic()
    with pytest.raises(FetchError, match="no complete answer within 1 s") as err:
        GuardedFetcher(allow_private=True).get(origin.url + "/slow", max_bytes=10_000, timeout=1.0)
    assert 0.9 <= time.monotonic() - start < 1.5
    assert err.value.transient is True


def test_a_hanging_name_lookup_is_cut_at_the_deadline() -> None:
    def slow(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        time.sleep(3)
        return []

    start = time.monotonic()
    with pytest.raises(FetchError, match="before the deadline") as err:
        GuardedFetcher(resolver=slow).get("http://slow-dns.test/x.png", max_bytes=10, timeout=0.5)
    assert time.monotonic() - start < 1.0 and err.value.transient is True


def test_transient_flags(origin: Origin) -> None:
    """500/503/429, timeouts and refused connections may pass; 404, refused addresses, unknown
    names, other schemes and the size cap will not."""
    fetcher = GuardedFetcher(allow_private=True)

    def flag(url: str, **kwargs: Any) -> bool:
        with pytest.raises(FetchError) as err:
            (kwargs.pop("fetcher", None) or fetcher).get(url, max_bytes=kwargs.pop("max_bytes", 10_000), **kwargs)
        return err.value.transient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    again = Net(origin.port, {})
    assert {status: flag(f"{origin.url}/status/{status}") for status in (500, 503, 429, 404, 403)} == {
        500: True, 503: True, 429: True, 404: False, 403: False}
    assert flag(f"{origin.url}/slow", timeout=0.3) is True
    assert flag(f"http://127.0.0.1:{closed_port}/x") is True
    assert flag(f"http://127.0.0.1:{origin.port}/x", fetcher=GuardedFetcher()) is False
    assert flag("http://nowhere.test/x", fetcher=again.fetcher()) is False
    assert flag("ftp://127.0.0.1/x") is False
    assert flag(f"{origin.url}/image.png", max_bytes=10) is False


# -- Label Studio's token and the ML backend ---------------------------------------------------------

def test_label_studio_token_stays_on_its_origin() -> None:
    """Two origins on 127.0.0.1: one plays Label Studio's (configured, so allowed though private),
    the other a task's foreign image host. The token reaches only the first."""
    with Origin() as ls, Origin() as foreign:
        client = LabelStudioClient(ls.url, "secret-token")
        assert client.read_file("/data/upload/image.png", 10_000) == ls.image
        assert client.read_file(f"{ls.url}/redirect?to=/data/image.png", 10_000) == ls.image
        assert [h.get("authorization") for _, h in ls.requests] == ["Token secret-token"] * 3
        with pytest.raises(FetchError, match="non-public address"):  # private foreign host: refused
            client.read_file(f"{foreign.url}/image.png", 10_000)
        with pytest.raises(FetchError, match="non-public address"):  # redirected there: refused too
            client.read_file(f"/redirect?to={foreign.url}/image.png", 10_000)
        assert foreign.requests == []
        open_client = LabelStudioClient(ls.url, "secret-token", allow_private=True)
        assert open_client.read_file(f"{foreign.url}/image.png", 10_000) == foreign.image
        assert open_client.read_file(f"/redirect?to={foreign.url}/image.png", 10_000) == foreign.image
        assert len(foreign.requests) == 2 and all("authorization" not in h for _, h in foreign.requests)
        with pytest.raises(LabelStudioError):
            client.read_file("/status/404", 10_000)
        with pytest.raises(LabelStudioUnavailable):
            client.read_file("/status/500", 10_000)
        with pytest.raises(FetchError) as err:
            open_client.read_file(f"{foreign.url}/status/500", 10_000)
        assert err.value.transient is True
        with pytest.raises(FetchError, match="limit"):
            client.read_file("/huge", 100_000)


def test_ml_backend_refuses_a_task_image_on_a_private_host(tmp_path: Path) -> None:
    """/ml/predict with a task on a foreign 127.0.0.1 port (refused: empty result, the origin saw no
    request) beside a task on Label Studio's own origin (read, with the token)."""
    with Origin() as ls, Origin() as foreign:
        settings = Settings(data_dir=tmp_path / "data", short_side=128, ml_backend_password="pw",
                            ls_url=ls.url, ls_token="secret-token")
        upgrade(settings.sqlalchemy_url)
        services = Services(settings)
        try:
            with Server(services) as url:
                tasks = [{"id": 1, "data": {"image": f"{foreign.url}/image.png"}},
                         {"id": 2, "data": {"image": "/data/upload/image.png"}}]
                config = ('<View><Image name="image" value="$image"/><BrushLabels name="mask" toName="image">'
                          '<Label value="Ball" predicted_values="circle"/></BrushLabels></View>')
                auth = "Basic " + base64.b64encode(b"xdlabel:pw").decode()
                response = httpx.post(f"{url}/ml/predict", json={"tasks": tasks, "label_config": config,
                                                                "project": "1.1764547200"},
                                      headers={"Authorization": auth}, timeout=120)
        finally:
            services.engine.dispose()
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["result"] == []
        assert foreign.requests == []
        assert [(p, h.get("authorization")) for p, h in ls.requests] == [("/data/upload/image.png",
                                                                        "Token secret-token")]


# -- local sources: roots, symlinks, the data folder, list files ---------------------------------------

@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Any]:
    """root/ (allowed) with an image and symlinks out; outside/ with a secret; data/ (forbidden)
    with a database file holding the secret."""
    secret = f"SECRET-{random.Random(7).getrandbits(64):x}"
    root, outside, data = tmp_path / "root", tmp_path / "outside", tmp_path / "data"
    for folder in (root / "sub", outside, data / "index"):
        folder.mkdir(parents=True)
    (root / "ok.png").write_bytes(png(2))
    for name in ("secret.txt", "secret.png", "secret.csv", "secret.json"):
        (outside / name).write_text(f"{secret}\nroot:x:0:0:{secret}\n")
    (data / "xdlabel.db").write_text(f"api key hash {secret}\n")
    (root / "out.png").symlink_to(outside / "secret.png")
    (root / "db.png").symlink_to(data / "xdlabel.db")
    (root / "outdir").symlink_to(outside, target_is_directory=True)
    (root / "datadir").symlink_to(data, target_is_directory=True)
    (root / "out.txt").symlink_to(outside / "secret.txt")
    return {"root": root, "outside": outside, "data": data, "secret": secret}


def _hostile(rng: random.Random, tree: dict[str, Any], case: int) -> str:
    """One hostile source: a path out of the root in one of 12 spellings, or a list file (txt,
    csv, COCO) written inside the root naming one."""
    root, outside, data = tree["root"], tree["outside"], tree["data"]
    target = rng.choice(["secret.png", "secret.txt", "secret.csv", "secret.json"])
    forms = [str(outside / target), f"{root}/../outside/{target}", f"{root}/sub/../../outside/{target}",
             f"{root}/./outdir/{target}", str(root / "out.png"), str(root / "db.png"), str(root / "out.txt"),
             str(data / "xdlabel.db"), str(data), f"{root}/datadir/xdlabel.db", (outside / target).as_uri(),
             str(root / "outdir")]
    form = rng.choice(forms)
    kind = rng.choice(["path", "path", "txt", "csv", "coco"])
    if kind == "path":
        return form
    relative = rng.choice([form, f"../outside/{target}", "outdir/" + target, "db.png", "datadir/xdlabel.db"])
    listed = root / f"list{case}.{ {'txt': 'txt', 'csv': 'csv', 'coco': 'json'}[kind] }"
    if kind == "txt":
        listed.write_text(f"ok.png\n{relative}\n")
    elif kind == "csv":
        listed.write_text(f"uri,note\nok.png,fine\n{relative},x\n")
    else:
        name = relative.removeprefix("file://")
        listed.write_text(json.dumps({"images": [{"id": 1, "file_name": "ok.png"}, {"id": 2, "file_name": name}]}))
    return str(listed)


def test_hostile_sources_are_refused_without_echoing_contents(tree: dict[str, Any]) -> None:
    """80 seeded random hostile sources (12 path spellings out of the root: .., symlinks to a file,
    a folder, the database and the data folder, file:// URIs; or .txt/.csv/COCO lists in the root
    naming them): check_sources, items_from and fetch all refuse, and no message holds the secret."""
    rng = random.Random(20261201)
    root, data, secret = tree["root"], tree["data"], tree["secret"]
    for case in range(80):
        spec = _hostile(rng, tree, case)
        with pytest.raises(SourceRefused) as refused:
            check_sources([spec], roots=[root], forbidden=[data])
        with pytest.raises(SourceRefused) as also:
            items_from([spec], roots=[root], forbidden=[data])
        for err in (refused.value, also.value):
            assert secret not in str(err) and "root:x" not in str(err), (spec, str(err))
        if not Path(spec).name.startswith("list"):  # (a list file in the root may itself be read)
            with pytest.raises(FetchError) as read:
                fetch(spec, max_bytes=10_000, roots=[root], forbidden=[data])
            assert secret not in str(read.value)
    # What is inside the root is read; the command line (roots=None) reads outside, never the data folder.
    check_sources([str(root / "ok.png"), str(root)], roots=[root], forbidden=[data])  # no SourceRefused
    assert [i.uri for i in items_from([str(root / "sub" / ".." / "ok.png")], roots=[root], forbidden=[data])] == [
        (root / "ok.png").resolve().as_uri()]
    assert fetch(str(root / "ok.png"), max_bytes=10_000, roots=[root], forbidden=[data]) == png(2)
    assert secret.encode() in fetch(str(tree["outside"] / "secret.txt"), max_bytes=10_000, forbidden=[data])
    with pytest.raises(SourceRefused, match="data folder"):
        fetch(str(root / "db.png"), max_bytes=10_000, forbidden=[data])
    with pytest.raises(SourceRefused, match="data folder"):
        items_from([str(root)], forbidden=[data])  # the folder's db.png link
    with pytest.raises(SourceRefused):  # no roots configured: no local path at all over HTTP
        check_sources([str(root / "ok.png")], roots=[], forbidden=[data])


def test_list_files_that_are_not_lists_name_the_line_not_the_content(tree: dict[str, Any]) -> None:
    root, secret = tree["root"], tree["secret"]
    (root / "bad.txt").write_bytes(b"ok.png\n" + secret.encode() + b"\xff\xfe\n")
    (root / "bad.json").write_text('{"images": [\n{"file_name": "' + secret + '" oops}]}')
    (root / "missing.txt").write_text(f"ok.png\n{secret}.png\n")
    for name, message in (("bad.txt", "not a valid list file (line 2"), ("bad.json", "not a valid COCO file (line 2)"),
                          ("missing.txt", "missing.txt line 2 names no file")):
        with pytest.raises(SourceRefused) as err:
            check_sources([str(root / name)], roots=[root], forbidden=[])
        assert message in str(err.value) and secret not in str(err.value)


def test_a_fifo_or_a_file_swapped_for_a_link_is_not_read(tree: dict[str, Any], monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """A FIFO does not block the reader; a race (injected between the check and the open) that swaps
    the file, or a folder above it, for a symlink out of the root is caught on the opened file."""
    import os

    from xdlabel import sources

    root, data, secret = tree["root"], tree["data"], tree["secret"]
    os.mkfifo(root / "pipe.png")
    with pytest.raises(FetchError, match="not a regular file"):
        fetch(str(root / "pipe.png"), max_bytes=100, roots=[root])
    (root / "sub" / "a.png").write_bytes(png(3))
    (root / "b.png").write_bytes(png(4))
    real_check = sources.Access.check

    def racing(self: sources.Access, given: str, path: Path) -> Path:
        resolved = real_check(self, given, path)
        if resolved.name == "b.png":
            resolved.unlink()
            resolved.symlink_to(tree["outside"] / "secret.png")
        else:
            (root / "sub").rename(root / "sub-old")
            (root / "sub").symlink_to(tree["outside"], target_is_directory=True)
            (tree["outside"] / "a.png").write_text(secret)
        return resolved

    monkeypatch.setattr(sources.Access, "check", racing)
    for name in ("b.png", "sub/a.png"):
        with pytest.raises(FetchError) as err:
            fetch(str(root / name), max_bytes=10_000, roots=[root], forbidden=[data])
        assert secret not in str(err.value)


def test_source_roots_and_deadline_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """XDLABEL_SOURCE_ROOTS takes a JSON list or paths separated by commas or os.pathsep; none by
    default. The download deadline defaults to 20 s."""
    import os

    assert Settings().source_roots == [] and Settings().fetch_timeout == 20.0
    monkeypatch.setenv("XDLABEL_SOURCE_ROOTS", f"{tmp_path}/a,{tmp_path}/b{os.pathsep}{tmp_path}/c")
    assert Settings().source_roots == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    monkeypatch.setenv("XDLABEL_SOURCE_ROOTS", json.dumps([f"{tmp_path}/with, comma"]))
    assert Settings().source_roots == [tmp_path / "with, comma"]

"""One guarded HTTP client for every image xdlabel fetches from a URL someone else chose.

A URL in a job, a list file or a Label Studio task must not turn the server into a proxy into its
own network. So each hop of a request: the host is resolved once (numeric forms such as
``2130706433`` or ``127.1`` are read as the addresses they mean), every address it resolves to
is checked (loopback, private, link-local, reserved, multicast, and those hidden inside IPv6:
``::ffff:127.0.0.1``, 6to4, NAT64, Teredo), and the connection goes to a checked address itself,
never to a second resolution of the name (DNS rebinding); the Host header, TLS SNI and the
certificate check still use the name. Redirects are followed by hand, each hop checked again.
The body is streamed up to a byte cap, and the whole request (resolution, connects, redirects,
every read) has one deadline, so a server that drips a byte at a time is cut off.
"""

from __future__ import annotations

import ipaddress
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# socket.getaddrinfo's shape: (host, port, family=0, type=0, ...) -> [(family, type, proto, name, sockaddr)]
Resolver = Callable[..., Sequence[tuple[Any, ...]]]
# socket.create_connection's shape: ((address, port), timeout) -> a connected socket
Connector = Callable[[tuple[str, int], float], socket.socket]

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_NUMERIC_HOST = re.compile(r"^[0-9a-fx.]+$")
_HOST_NAME = re.compile(r"^[a-z0-9_.-]+$")


class FetchError(ValueError):
    """A URI that could not be fetched; the message says why. ``transient``: trying again later may
    work (timeouts, dropped connections, HTTP 5xx and 429); not for refused addresses, names that
    do not exist, 4xx, the size cap or a bad scheme. ``status``: the HTTP status, when one came;
    ``url``: the hop that failed."""

    def __init__(self, message: str, *, transient: bool = False, status: int | None = None,
                 url: str | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status
        self.url = url


def _shown(url: str) -> str:
    """A URL for messages: without user:password@."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` is not a public one ("loopback", "private", ...), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return "local NAT64"
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return refusal(embedded)
        if address.teredo:
            return refusal(address.teredo[0]) or refusal(address.teredo[1])
    for reason, flag in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                         ("multicast", address.is_multicast), ("unspecified", address.is_unspecified),
                         ("private", address.is_private), ("reserved", address.is_reserved)):
        if flag:
            return reason
    return None if address.is_global else "not globally routable"


def literal_address(host: str) -> IPAddress | None:
    """The address a numeric host stands for, read as the system resolver reads it (``127.1``,
    ``2130706433``, ``0x7f000001``, ``0177.0.0.1`` are all 127.0.0.1); None for a name. A host
    that ends in a numeric label but is no valid address is refused rather than guessed at."""
    name = host.lower()
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    name = name.removesuffix(".")
    if not _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        return None
    if _NUMERIC_HOST.match(name):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            pass
    raise FetchError(f"{host!r} is not a valid numeric host")


def _ascii_host(host: str) -> str:
    try:
        name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise FetchError(f"{host!r} is not a valid host name") from None
    if not _HOST_NAME.match(name):
        raise FetchError(f"{host!r} is not a valid host name")
    return name


def _remaining(deadline: float, timeout: float | None, error: type[Exception]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the request deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every operation ends by the request's deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._sock.settimeout(_remaining(self._deadline, timeout, httpcore.ReadTimeout))
        try:
            return self._sock.recv(max_bytes)
        except TimeoutError as err:
            raise httpcore.ReadTimeout(str(err) or "timed out") from err
        except OSError as err:
            raise httpcore.ReadError(str(err)) from err

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        while buffer:
            self._sock.settimeout(_remaining(self._deadline, timeout, httpcore.WriteTimeout))
            try:
                buffer = buffer[self._sock.send(buffer):]
            except TimeoutError as err:
                raise httpcore.WriteTimeout(str(err) or "timed out") from err
            except OSError as err:
                raise httpcore.WriteError(str(err)) from err

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        self._sock.settimeout(_remaining(self._deadline, timeout, httpcore.ConnectTimeout))
        try:
            sock = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as err:
            self.close()
            raise FetchError(f"{server_hostname}: the TLS certificate does not verify ({err.verify_message})") \
                from None
        except TimeoutError as err:
            self.close()
            raise httpcore.ConnectTimeout(str(err) or "timed out") from err
        except OSError as err:
            self.close()
            raise httpcore.ConnectError(str(err)) from err
        return _DeadlineStream(sock, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock._sslobj  # type: ignore[attr-defined]  # what httpcore itself hands out
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return bool(select.select([self._sock], [], [], 0)[0])
        return None


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked addresses, whatever host httpcore asks for."""

    def __init__(self, addresses: Sequence[IPAddress], connect: Connector, deadline: float) -> None:
        self.addresses, self.connect, self.deadline = addresses, connect, deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        failure: OSError | None = None
        for address in self.addresses:  # in the resolver's order, like socket.create_connection
            wait = _remaining(self.deadline, timeout, httpcore.ConnectTimeout)
            try:
                sock = self.connect((str(address), port), wait)
            except TimeoutError as err:
                failure = err
                continue
            except OSError as err:
                failure = err
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return _DeadlineStream(sock, self.deadline)
        if isinstance(failure, TimeoutError):
            raise httpcore.ConnectTimeout(f"connecting to {host} timed out")
        raise httpcore.ConnectError(f"cannot connect to {host}: {failure}")

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    scheme = parts.scheme.lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


def same_origin(a: str, b: str) -> bool:
    return _origin(urlsplit(a)) == _origin(urlsplit(b))


@dataclass
class GuardedFetcher:
    """``allow_private``: skip the address check (XDLABEL_ALLOW_PRIVATE_URLS). ``trusted``: origins
    (``scheme://host:port``) whose addresses are not checked, such as the configured Label Studio.
    ``resolver`` and ``connect`` are socket.getaddrinfo and socket.create_connection unless given."""

    allow_private: bool = False
    trusted: Collection[str] = ()
    resolver: Resolver = socket.getaddrinfo
    connect: Connector = socket.create_connection
    ssl_context: ssl.SSLContext | None = None
    max_redirects: int = 5
    user_agent: str = "xdlabel"
    _trusted: set[tuple[str, str, int | None]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._trusted = {_origin(urlsplit(url)) for url in self.trusted}

    def get(self, url: str, *, max_bytes: int, timeout: float = 20.0,
            headers: Mapping[str, str] | None = None) -> bytes:
        """The body of a 200 answer, at most ``max_bytes``, within ``timeout`` seconds in all.
        ``headers`` go only to hops on the first URL's origin (credentials stay where they belong)."""
        deadline = time.monotonic() + timeout
        first = url
        for _ in range(self.max_redirects + 1):
            sent = dict(headers or {}) if same_origin(url, first) else {}
            status, location, body = self._hop(url, max_bytes, timeout, deadline, sent)
            if location is None:
                return body
            if not location:
                raise FetchError(f"{_shown(url)}: HTTP {status} redirect without a Location", status=status, url=url)
            url = urljoin(url, location)
        raise FetchError(f"{_shown(first)}: more than {self.max_redirects} redirects", url=url)

    def addresses(self, host: str, port: int, deadline: float, trusted: bool) -> list[IPAddress]:
        """The checked addresses to connect to for ``host``."""
        literal = literal_address(host)
        if literal is not None:
            found = [literal]
        else:
            name = _ascii_host(host)
            infos = _before(deadline, lambda: self.resolver(name, port, type=socket.SOCK_STREAM), host)
            found = []
            for info in infos:
                address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if address not in found:
                    found.append(address)
            if not found:
                raise FetchError(f"cannot resolve {host}: no address")
        if not (self.allow_private or trusted):
            for address in found:
                reason = refusal(address)
                if reason:
                    raise FetchError(f"refusing {host}: it resolves to the non-public address {address} "
                                     f"({reason}; set XDLABEL_ALLOW_PRIVATE_URLS=true to allow)")
        return found

    def _hop(self, url: str, max_bytes: int, timeout: float, deadline: float,
             headers: Mapping[str, str]) -> tuple[int, str | None, bytes]:
        """(status, Location or None, body) of one request."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise FetchError(f"{_shown(url)}: unsupported URI scheme {scheme!r} (http and https only)", url=url)
        host = parts.hostname or ""
        if not host:
            raise FetchError(f"{_shown(url)}: the URL has no host", url=url)
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise FetchError(f"{_shown(url)}: invalid port", url=url) from None
        addresses = self.addresses(host, port, deadline, _origin(parts) in self._trusted)
        literal = literal_address(host)
        name = _ascii_host(host) if literal is None else str(literal)
        shown_host = f"[{name}]" if ":" in name else name
        host_header = shown_host if port == DEFAULT_PORTS[scheme] else f"{shown_host}:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request_headers = [("Host", host_header), ("User-Agent", self.user_agent), ("Accept", "*/*"),
                           ("Accept-Encoding", "identity"), *headers.items()]
        backend = _PinnedBackend(addresses, self.connect, deadline)
        phases = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        try:
            with httpcore.ConnectionPool(ssl_context=self.ssl_context, network_backend=backend,
                                         max_connections=1) as pool, \
                    pool.stream("GET", httpcore.URL(scheme=scheme, host=name, port=port, target=target),
                                headers=request_headers, extensions={"timeout": phases}) as response:
                status = response.status
                found = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                if status in REDIRECTS:
                    return status, found.get("location", ""), b""
                if status != 200:
                    raise FetchError(f"{_shown(url)}: HTTP {status}", status=status, url=url,
                                     transient=status == 429 or status >= 500)
                length = found.get("content-length", "")
                if length.isdigit() and int(length) > max_bytes:
                    raise FetchError(f"{_shown(url)}: {length} bytes is over the {max_bytes}-byte limit", url=url)
                chunks, total = [], 0
                for chunk in response.iter_stream():
                    total += len(chunk)
                    if total > max_bytes:  # stop reading: leaving the block closes the connection
                        raise FetchError(f"{_shown(url)}: more than the {max_bytes}-byte limit", url=url)
                    chunks.append(chunk)
                return status, None, b"".join(chunks)
        except httpcore.TimeoutException as err:
            late = time.monotonic() >= deadline
            raise FetchError(f"{_shown(url)}: " + (f"no complete answer within {timeout:g} s" if late
                                                   else f"timed out ({err})"), transient=True, url=url) from None
        except (httpcore.NetworkError, httpcore.RemoteProtocolError) as err:
            raise FetchError(f"{_shown(url)}: {err or type(err).__name__}", transient=True, url=url) from None
        except httpcore.ProtocolError as err:
            raise FetchError(f"{_shown(url)}: {err or type(err).__name__}", url=url) from None


def _before(deadline: float, fn: Callable[[], Sequence[tuple[Any, ...]]], host: str) -> Sequence[tuple[Any, ...]]:
    """``fn()`` (a name lookup), given up on at the deadline: the system resolver has its own timeouts,
    longer than a request's; a lookup still running is left to finish in its daemon thread."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            box["error"] = err

    thread = threading.Thread(target=run, name="xdlabel-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise FetchError(f"cannot resolve {host}: no answer before the deadline", transient=True)
    error = box.get("error")
    if isinstance(error, socket.gaierror):
        transient = error.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
        raise FetchError(f"cannot resolve {host}: {error.strerror or error}", transient=transient) from None
    if error is not None:
        raise error
    return box["value"]  # type: ignore[no-any-return]


def fetch_url(url: str, *, max_bytes: int, timeout: float = 20.0, allow_private: bool = False,
              headers: Mapping[str, str] | None = None, trusted: Collection[str] = ()) -> bytes:
    """One guarded GET with the default resolver; see GuardedFetcher."""
    return GuardedFetcher(allow_private=allow_private, trusted=trusted).get(
        url, max_bytes=max_bytes, timeout=timeout, headers=headers)

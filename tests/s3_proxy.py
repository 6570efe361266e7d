"""An HTTP proxy of our own in front of an S3 server (moto, SeaweedFS): counts requests and bytes, injects faults.

Tests point s3fs at the proxy (``endpoint_url``); the proxy forwards every
request to the server over loopback. ``Faults`` decides, per request, whether
to answer 500 / 503 SlowDown / 403 AccessDenied or to drop the connection
instead of forwarding; ``Faults.on_request`` sees each request first (a test's trigger:
kill the server when a given request arrives). :meth:`S3Proxy.sever` stops
listening and cuts every connection, as a killed server's kernel would, and
:meth:`S3Proxy.resume` listens again on the same port. With ``max_uploads``, an unsigned ListMultipartUploads
asks for pages of that size, as AWS's are of 1,000 (see :class:`S3Proxy`). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def classify(method: str, path: str) -> str:
    """The S3 operation of a request, from its method and query string."""
    query = parse_qs(urlsplit(path).query, keep_blank_values=True)
    if method == "PUT":
        return "UploadPart" if "partNumber" in query else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "POST"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if method == "GET":
        if "uploads" in query:
            return "ListMultipartUploads"
        if "list-type" in query or urlsplit(path).path.count("/") <= 1:
            return "List"
        return "GetObject"
    return method


@dataclass
class Faults:
    """Which requests fail: ``rule(operation, n)`` -> None, "500", "503", "403", "507", "quota" (403
    QuotaExceeded), "drop", "flip": forward the
    request with one bit of its body flipped, as a bad link or NIC would, or "stall": answer nothing for
    ``stall_s`` seconds, then drop the connection, as a stopped (SIGSTOP) server (n counts that operation).

    ``on_request(operation, path, headers)`` runs first, on every request, before it is judged or forwarded:
    a test's trigger (it may kill or stop the server behind the proxy, or :meth:`S3Proxy.sever`)."""

    rule: Callable[[str, int], str | None] | None = None
    stall_s: float = 5.0
    on_request: Callable[[str, str, Message], None] | None = None

    def decide(self, operation: str, n: int) -> str | None:
        return self.rule(operation, n) if self.rule else None


class Trigger:
    """``action`` run once, at the first request ``when(operation, path, headers)`` picks, before that request
    goes on: a ``Faults.on_request`` (kill or stop the server at a chosen point of a save). ``at``: when
    (``time.monotonic()``, one clock for every process of the host); ``request``: which request."""

    def __init__(self, when: Callable[[str, str, Message], bool], action: Callable[[], None]) -> None:
        self.at: float | None = None
        self.request: str | None = None
        self._when, self._action = when, action
        self._lock = threading.Lock()

    def __call__(self, operation: str, path: str, headers: Message) -> None:
        with self._lock:  # requests arriving meanwhile wait: none goes on before the action is done
            if self.at is None and self._when(operation, path, headers):
                self.at, self.request = time.monotonic(), f"{operation} {urlsplit(path).path}"
                self._action()


@dataclass
class Stats:
    requests: Counter = field(default_factory=Counter)
    body_bytes: Counter = field(default_factory=Counter)
    injected: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.body_bytes.clear()
            self.injected.clear()


ERRORS = {"500": (500, "InternalError"), "503": (503, "SlowDown"), "403": (403, "AccessDenied"),
          "507": (507, "InsufficientStorage"), "quota": (403, "QuotaExceeded")}


class S3Proxy:
    """Forwards to ``upstream_host:upstream_port``.

    ``max_uploads``: AWS lists at most 1,000 multipart uploads a page, SeaweedFS 10,000 and
    moto all of them; a ListMultipartUploads that names no page size is forwarded asking
    for this many, so paging shows as on AWS (at a smaller size, a page costs fewer uploads
    to make). Only unsigned requests can be changed (a signature covers the query string).
    """

    def __init__(self, upstream_host: str, upstream_port: int, max_uploads: int | None = None) -> None:
        self.stats = Stats()
        self.faults = Faults()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            upstream: http.client.HTTPConnection | None = None

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)
                if proxy.severed:  # accepted just before the listener closed
                    self._drop()

            def finish(self) -> None:
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:  # the client left (its timeout) or the proxy cut the connection
                    pass
                if self.upstream is not None:
                    self.upstream.close()

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _forward(self) -> None:
                try:
                    body = self._body()
                except OSError:  # cut while the request arrived
                    self._drop()
                    return
                op = classify(self.command, self.path)
                if proxy.faults.on_request is not None:
                    proxy.faults.on_request(op, self.path, self.headers)
                if proxy.severed:
                    self._drop()
                    return
                with proxy.stats.lock:
                    proxy.stats.requests[op] += 1
                    n = proxy.stats.requests[op]
                    decoded = self.headers.get("x-amz-decoded-content-length")
                    proxy.stats.body_bytes[op] += int(decoded) if decoded else len(body)
                fault = proxy.faults.decide(op, n)
                if fault:
                    with proxy.stats.lock:
                        proxy.stats.injected[f"{op}:{fault}"] += 1
                    if fault == "stall":
                        time.sleep(proxy.faults.stall_s)
                    if fault in ("drop", "stall"):
                        self._drop()
                        return
                if fault == "flip":
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 0x10]) + body[middle + 1 :]
                elif fault:
                    code, s3code = ERRORS[fault]
                    payload = f"<Error><Code>{s3code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                path = self.path
                if (
                    max_uploads
                    and op == "ListMultipartUploads"
                    and "max-uploads" not in parse_qs(urlsplit(path).query, keep_blank_values=True)
                    and "Authorization" not in self.headers
                ):
                    path += f"&max-uploads={max_uploads}"
                # One upstream connection per client connection, kept alive: a new TCP
                # connection per request to a real server costs more than the request.
                for fresh in (False, True):
                    if fresh or self.upstream is None:
                        self.upstream = http.client.HTTPConnection(upstream_host, upstream_port, timeout=120)
                    try:
                        self.upstream.request(self.command, path, body=body, headers=headers)
                        resp = self.upstream.getresponse()
                        data = resp.read()
                        break
                    except (http.client.RemoteDisconnected, ConnectionError):
                        self.upstream.close()
                        if fresh or proxy.severed:
                            # No server behind the proxy (killed): the client's connection ends
                            # unanswered, as the server's own would have.
                            self._drop()
                            return
                # The server's own Date and Server headers, not a second pair of ours (a client
                # would see "Date: <ours>, <server's>").
                self.send_response_only(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # A HEAD answer carries the object's length, not its (empty) body's.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                try:
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError:  # the client gave up waiting (a stopped server's late answer) or was cut
                    self._drop()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._handler = Handler
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.severed = False
        self.port = 0
        self._listen()

    def _listen(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)  # SO_REUSEADDR: the same port again
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def sever(self) -> None:
        """Stop listening and cut every open connection, as the kernel does when the server behind is killed:
        requests under way end unanswered, new connections are refused. Callable from ``on_request``."""
        self.severed = True
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            connections = list(self._connections)
        for c in connections:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def resume(self) -> None:
        """Listen again, on the same port, after :meth:`sever`."""
        self.severed = False
        self._listen()

    def close(self) -> None:
        if not self.severed:
            self.server.shutdown()
            self.server.server_close()

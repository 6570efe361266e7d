"""An HTTP proxy of our own in front of an S3 server (moto, SeaweedFS): counts requests and bytes, injects faults.

Tests point s3fs at the proxy (``endpoint_url``); the proxy forwards every
request to the server over loopback. ``Faults`` decides, per request, whether
to answer 500 / 503 SlowDown / 403 AccessDenied or to drop the connection
instead of forwarding. With ``max_uploads``, an unsigned ListMultipartUploads
asks for pages of that size, as AWS's are of 1,000 (see :class:`S3Proxy`). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
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
    """Which requests fail: ``rule(operation, n)`` -> None, "500", "503", "403", "drop", "flip": forward the
    request with one bit of its body flipped, as a bad link or NIC would, or "stall": answer nothing for
    ``stall_s`` seconds, then drop the connection, as a stopped (SIGSTOP) server (n counts that operation)."""

    rule: Callable[[str, int], str | None] | None = None
    stall_s: float = 5.0

    def decide(self, operation: str, n: int) -> str | None:
        return self.rule(operation, n) if self.rule else None


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


ERRORS = {"500": (500, "InternalError"), "503": (503, "SlowDown"), "403": (403, "AccessDenied")}


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

            def finish(self) -> None:
                super().finish()
                if self.upstream is not None:
                    self.upstream.close()

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
                body = self._body()
                op = classify(self.command, self.path)
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
                        self.close_connection = True
                        self.connection.shutdown(2)
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
                        if fresh:
                            raise
                # The server's own Date and Server headers, not a second pair of ours (a client
                # would see "Date: <ours>, <server's>").
                self.send_response_only(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # A HEAD answer carries the object's length, not its (empty) body's.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

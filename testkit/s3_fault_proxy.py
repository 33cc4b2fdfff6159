"""An HTTP proxy in front of an S3 endpoint that fails requests on purpose.

Modes, switchable while it runs:
- ``fail_rate``: share of requests answered with HTTP 500/503 or a dropped
  connection (``fail_kinds`` picks among ``"500"``, ``"503"``, ``"drop"``);
  ``fail_methods`` limits it to some methods (e.g. ``{"GET"}`` for reads);
- ``throttle_first``: the first N writes (PUT) to each object are answered 503 SlowDown, as S3
  throttles a hot prefix (deterministic, unlike ``fail_rate``);
- ``outage``: every request is refused (connection closed) until cleared;
- ``deny_writes``: writes (PUT, POST, DELETE) get 403 AccessDenied, as with
  read-only credentials; ``deny_writes_matching`` does it only for paths that
  contain that string (one checkpoint, say).

Counters (``requests``, ``failed``, ``forwarded``, ``methods`` and
``bytes_out``, the bytes of GET answers) let tests check that faults really
happened and which requests a client made; ``log`` lists every forwarded
request (method, path without the query, its ``Range`` header, status, the
bytes answered).  ``uploading`` is set while a PUT is being forwarded; with
``hold_uploads`` set, PUTs wait at the proxy (counted as uploading) until
``release`` is set, so a test can see what a client does while its upload is
in flight.  Binds to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Optional
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOLD_LIMIT_S = 60.0
"""A held PUT goes on after this long even unreleased, so a client that never releases it is not stuck."""


@dataclass(frozen=True)
class Forwarded:
    method: str
    path: str
    """The request's path (``/bucket/key``), without the query."""
    range: Optional[str]
    status: int
    nbytes: int
    """Bytes of the answer's body."""


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, fail_rate: float = 0.0, fail_kinds=("500", "503", "drop"),
                 seed: int = 0):
        u = urlparse(upstream)
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.fail_rate = fail_rate
        self.fail_kinds = tuple(fail_kinds)
        self.outage = False
        self.deny_writes = False
        self.deny_writes_matching: str | None = None
        self.fail_methods: set[str] | None = None
        self.throttle_first = 0
        self._writes_seen: Counter[str] = Counter()
        self.requests = self.failed = self.forwarded = self.bytes_out = 0
        self.uploads_in_flight = 0
        self.uploading = threading.Event()
        self.hold_uploads = False
        self.release = threading.Event()
        self.log: list[Forwarded] = []
        self.manifests = 0
        """Checkpoint manifests PUT (each one a published checkpoint)."""
        self.methods: Counter[str] = Counter()
        """Requests forwarded, by HTTP method (GET also lists; POST is a bulk delete)."""
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self):
                body = self._body()
                verdict = proxy._decide(self.command, self.path)
                if verdict == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if verdict in ("500", "503", "403"):
                    code = int(verdict)
                    err = {500: b"InternalError", 503: b"SlowDown", 403: b"AccessDenied"}[code]
                    msg = (b"<?xml version=\"1.0\"?><Error><Code>" + err
                           + b"</Code><Message>injected fault</Message></Error>")
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upload = self.command == "PUT" and len(body) > 0
                if upload:
                    proxy._upload(+1)
                    if proxy.hold_uploads:
                        proxy.release.wait(HOLD_LIMIT_S)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                    if upload:
                        proxy._upload(-1)
                with proxy._lock:
                    proxy.forwarded += 1
                    proxy.methods[self.command] += 1
                    if self.command == "PUT" and self.path.split("?")[0].endswith("/manifest.json") and resp.status < 300:
                        proxy.manifests += 1
                    if self.command == "GET":
                        proxy.bytes_out += len(data)
                    proxy.log.append(Forwarded(self.command, self.path.split("?", 1)[0],
                                               self.headers.get("Range"), resp.status, len(data)))
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    # HEAD answers carry the object's length with no body: pass it on.
                    if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client gone mid-request (a killed worker)
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _upload(self, delta: int) -> None:
        with self._lock:
            self.uploads_in_flight += delta
            if self.uploads_in_flight > 0:
                self.uploading.set()
            else:
                self.uploading.clear()

    def _decide(self, method: str, path: str = "") -> str:
        with self._lock:
            self.requests += 1
            writes = method in ("PUT", "POST", "DELETE")
            if writes and (self.deny_writes or (self.deny_writes_matching and self.deny_writes_matching in path)):
                self.failed += 1
                return "403"
            if self.outage:
                self.failed += 1
                return "drop"
            if self.throttle_first and method == "PUT":
                key = path.split("?", 1)[0]
                self._writes_seen[key] += 1
                if self._writes_seen[key] <= self.throttle_first:
                    self.failed += 1
                    return "503"
            if (self.fail_rate and (self.fail_methods is None or method in self.fail_methods)
                    and self._rng.random() < self.fail_rate):
                self.failed += 1
                return self._rng.choice(self.fail_kinds)
            return "ok"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

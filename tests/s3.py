"""A real S3 endpoint for tests: moto's threaded server on 127.0.0.1, and a proxy in front of it.

The proxy forwards every request unchanged and records what passed (method,
path, Range header, response bytes), and can be told to answer the next few
requests with a 503 or to drop their connection, as a throttled or failing
store would.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

ACCESS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """Start moto's S3 server on a free port of 127.0.0.1; yield its URL; stop it after."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"tk-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, **_client_access()).create_bucket(Bucket=name)
    return name


def _client_access() -> dict[str, str]:
    return {
        "aws_access_key_id": ACCESS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": ACCESS["AWS_SECRET_ACCESS_KEY"],
        "region_name": ACCESS["AWS_DEFAULT_REGION"],
    }


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


@dataclass
class Proxy:
    """Forwards to ``upstream``; ``fail(n, kind)`` makes the next n requests fail ("503" or "reset")."""

    upstream: str
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    #: Seconds each PUT is held before it is forwarded, and the most PUTs seen in flight at once.
    put_delay: float = 0.0
    most_puts_at_once: int = 0
    _puts: int = 0
    _failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, count: int, kind: str, *, method: str | None = None) -> None:
        with self._lock:
            self._failures.extend([f"{kind}:{method or ''}"] * count)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _next_failure(self, method: str) -> str | None:
        with self._lock:
            for i, failure in enumerate(self._failures):
                kind, _, only = failure.partition(":")
                if not only or only == method:
                    del self._failures[i]
                    return kind
        return None


@contextmanager
def proxy_to(upstream: str) -> Iterator[Proxy]:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``upstream``."""
    state = Proxy(upstream)
    host, port = upstream.removeprefix("http://").split(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
                body = self._read_chunked()
            failure = state._next_failure(self.command)
            if failure == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                self.close_connection = True
                return
            if failure == "503":
                payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                with state._lock:
                    state.seen.append(Seen(self.command, self.path, self.headers.get("Range"), 503, 0))
                self.send_response(503)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                self.wfile.write(payload)
                return
            if self.command == "PUT":
                with state._lock:
                    state._puts += 1
                    state.most_puts_at_once = max(state.most_puts_at_once, state._puts)
                time.sleep(state.put_delay)
                with state._lock:
                    state._puts -= 1
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            with state._lock:  # recorded before the client can see the answer, so a test reads it in order
                state.seen.append(Seen(self.command, self.path, self.headers.get("Range"), response.status, len(data)))
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(key, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        def _read_chunked(self) -> bytes:
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()

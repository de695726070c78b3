"""One small HTTP server per service: ``/metrics``, ``/healthz``, ``/readyz`` and any routes the
service adds (the scorer's ``POST /predict``). Request bodies are bounded."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
# A route gets the request body and returns (status, content type, body).
Route = Callable[[bytes], tuple[int, str, bytes]]


class ServiceHTTP:
    def __init__(self, host: str, port: int, metrics: Callable[[], bytes],
                 healthy: Callable[[], bool], ready: Callable[[], bool],
                 routes: dict[tuple[str, str], Route] | None = None):
        self._routes: dict[tuple[str, str], Route] = {
            ("GET", "/metrics"): lambda _: (200, "text/plain; version=0.0.4; charset=utf-8", metrics()),
            ("GET", "/healthz"): lambda _: _status(healthy()),
            ("GET", "/readyz"): lambda _: _status(ready()),
            **(routes or {}),
        }
        handler = self._handler_class()
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def add_routes(self, routes: dict[tuple[str, str], Route]) -> None:
        self._routes.update(routes)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ServiceHTTP:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        routes = self._routes

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                path = self.path.split("?", 1)[0]
                route = routes.get((method, path))
                if route is None:
                    known = any(p == path for _, p in routes)
                    return self._reply(405 if known else 404, "text/plain", b"not found\n")
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    return self._reply(413, "text/plain", b"request body too large\n")
                body = self.rfile.read(length) if length > 0 else b""
                try:
                    status, ctype, payload = route(body)
                except Exception:  # a route bug must not kill the server thread
                    log.exception("HTTP route %s %s failed", method, path)
                    status, ctype, payload = 500, "text/plain", b"internal error\n"
                self._reply(status, ctype, payload)

            def _reply(self, status: int, ctype: str, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def log_message(self, fmt: str, *args) -> None:
                log.debug("http: " + fmt, *args)

        return Handler


def _status(ok: bool) -> tuple[int, str, bytes]:
    return (200, "text/plain", b"ok\n") if ok else (503, "text/plain", b"not ready\n")

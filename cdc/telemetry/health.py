"""HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process runs; ``/readyz`` answers 200 only while the
daemon is connected to PostgreSQL and Redis and streaming (503 otherwise, with the reason).
Served from a daemon thread so a slow scrape never stalls the stream.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cdc.errors import ConfigError
from cdc.telemetry.metrics import Metrics


class Readiness:
    """What ``/readyz`` reports; set by the pipeline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._reason = "starting"

    def set(self, ready: bool, reason: str = "") -> None:
        with self._lock:
            self._ready = ready
            self._reason = reason or ("streaming" if ready else "not ready")

    def get(self) -> tuple[bool, str]:
        with self._lock:
            return self._ready, self._reason


class HealthServer:
    def __init__(self, host: str, port: int, metrics: Metrics, readiness: Readiness) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ready, reason = readiness.get()
                    self._send(200 if ready else 503, (reason + "\n").encode())
                else:
                    self._send(404, b"not found\n")

            def _send(
                self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(
                f"CDC_METRICS_ADDR {host}:{port} cannot be served: {exc.strerror}"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

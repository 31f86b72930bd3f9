"""The HTTP port beside gRPC: Prometheus ``/metrics`` and Triton's HTTP health probes.

prometheus-client's ``start_http_server`` answers every path with the metrics, so a
mistyped probe (``/healthz``) would always pass. Here only three paths exist:
``/metrics``, ``/v2/health/live`` and ``/v2/health/ready``, the last two answering as
Triton's HTTP endpoint does (200 when true, 400 when not), so a Kubernetes or systemd
probe written for Triton works unchanged. Anything else is 404.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

HEALTH_LIVE = "/v2/health/live"
HEALTH_READY = "/v2/health/ready"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # probes every few seconds would flood the log
        pass


def _app(live: Callable[[], bool], ready: Callable[[], bool]):
    metrics = make_wsgi_app()

    def probe(start_response, ok: bool):
        start_response("200 OK" if ok else "400 Bad Request", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == HEALTH_LIVE:
            return probe(start_response, live())
        if path == HEALTH_READY:
            return probe(start_response, ready())
        body = f"no such path {path}; this port serves /metrics, {HEALTH_LIVE} and {HEALTH_READY}\n".encode()
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
    except OSError:
        return socket.AF_INET


class MetricsHttp:
    """Runs the endpoint in a daemon thread; ``close()`` stops it."""

    def __init__(self, host: str, port: int, *, live: Callable[[], bool], ready: Callable[[], bool]) -> None:
        server_class = type("_Server", (_Server,), {"address_family": _family(host)})
        self._server = make_server(host, port, _app(live, ready), server_class, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="tegrad-metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

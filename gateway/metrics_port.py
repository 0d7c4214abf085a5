"""The gateway's /metrics on a port of its own.

Metrics name tenants (token labels) and show traffic: they are for Prometheus, not for the clients
an Ingress lets in. On a separate port (``DISPATCHER_METRICS_PORT``, default 9091) an Ingress or a
Service that routes the API port does not publish them. prometheus_client's own server runs in a
thread, so scraping never waits on the event loop that relays the streams.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

log = logging.getLogger("dispatcher.gateway")


class MetricsPort:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host)
        except OSError as exc:  # the port is taken: say which, rather than run without metrics
            raise RuntimeError(f"cannot serve /metrics on {self.host}:{self.port}: {exc}") from exc
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

"""uvicorn with a drain phase: on SIGTERM the gateway first reports not-ready, then stops accepting.

Kubernetes keeps routing to a pod for a moment after it starts terminating, so for ``drain_delay``
seconds the gateway still serves everything while ``/ready`` answers 503; then uvicorn closes its
listeners and waits (``timeout_graceful_shutdown``) for the open streams to finish; those still open a
second before it runs out end with an error event (``on_grace_end``) rather than being cut off
mid-stream. SIGINT (Ctrl-C) skips the delay.

``dispatcher gateway --workers N`` runs N such servers as child processes on one port (``supervise``).

``GuardedProtocol`` bounds what clients can hold: a request's head must arrive within ``header_timeout``
(uvicorn itself waits forever for a client that sends its headers a byte at a time), and beyond
``max_connections`` open connections a request is answered with an OpenAI-shaped 503 at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmdispatch import processes
from llmdispatch.errors import error_body
from llmdispatch.processes import metrics_directory, port_free

if TYPE_CHECKING:
    from llmdispatch.settings import GatewaySettings

log = logging.getLogger("dispatcher.gateway")

# Seconds before the shutdown grace runs out at which open streams are ended with an error event: the
# relays need a moment to write it before uvicorn cancels what is left.
GRACE_END_MARGIN = 1.0


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head and a cap on connections."""

    header_timeout: float = 10.0
    max_connections: int = 4096

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # the next request of a kept-alive connection: its head has the same deadline

    def on_headers_complete(self) -> None:
        self._disarm()
        over = len(self.connections) > self.max_connections or len(self.tasks) >= self.max_connections
        if over and self.url.partition(b"?")[0] != b"/health":  # liveness stays true under a flood
            app, self.app = self.app, _at_capacity
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these bounds."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )


_AT_CAPACITY = error_body(503, "The gateway has too many open connections; try again shortly.")


async def _at_capacity(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_AT_CAPACITY)).encode()),
               (b"retry-after", b"1"), (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": _AT_CAPACITY})


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        on_drain: Callable[[], None],
        drain_delay: float,
        on_grace_end: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.drain_delay = drain_delay
        self.on_grace_end = on_grace_end
        self._drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT or self.drain_delay <= 0 or self._drain_until is not None:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        self._drain_until = time.monotonic() + self.drain_delay
        self.on_drain()
        log.info("draining: /ready answers 503; closing the listener in %.1fs", self.drain_delay)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown
        timer = None
        if grace is not None and self.on_grace_end is not None:
            timer = asyncio.get_running_loop().call_later(max(0.0, grace - GRACE_END_MARGIN), self.on_grace_end)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()


def supervise(settings: GatewaySettings) -> int:
    """Run ``settings.gateway_workers`` gateway processes on one port until SIGTERM/SIGINT; their exit code.

    Each child is a whole gateway (its own event loop, AMQP connections and reply channel) on a
    SO_REUSEPORT socket (``dispatcher.processes``). This process serves their metrics, summed, on
    the metrics port.
    """
    host, port, count = settings.host, settings.port, settings.gateway_workers
    if not port_free(host, port):  # fail here, once, when the port is taken
        return 1
    with metrics_directory("dispatcher-gateway-metrics-") as metrics_dir:
        # Children serve no /metrics of their own (-1) when this process serves their sum on the metrics
        # port: with 0 they would answer /metrics on the API port, which an Ingress publishes.
        metrics_port = "-1" if settings.metrics_port > 0 else "0"
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, "DISPATCHER_METRICS_PORT": metrics_port}
        command = [sys.executable, "-m", "llmdispatch.cli", "gateway", "--reuse-port", "--workers", "1",
                   "--host", host, "--port", str(port)]  # fmt: skip
        metrics_server = _serve_metrics(settings, metrics_dir)
        try:
            return processes.supervise("gateway", [command] * count, env, metrics_dir)
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()


def _serve_metrics(settings: GatewaySettings, metrics_dir: str) -> Any:
    if settings.metrics_port <= 0:  # 0: each child answers /metrics on the API port; negative: none at all
        return None
    from prometheus_client import start_http_server

    registry = processes.summed_registry(metrics_dir)
    server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    return server

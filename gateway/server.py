"""uvicorn with a drain phase: on SIGTERM the gateway first reports not-ready, then stops accepting.

Kubernetes keeps routing to a pod for a moment after it starts terminating, so for ``drain_delay``
seconds the gateway still serves everything while ``/ready`` answers 503; then uvicorn closes its
listeners and waits (``timeout_graceful_shutdown``) for the open streams to finish. SIGINT (Ctrl-C)
skips the delay.

``dispatcher gateway --workers N`` runs N such servers as child processes on one port (``supervise``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from dispatcher.settings import GatewaySettings

log = logging.getLogger("dispatcher.gateway")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None], drain_delay: float) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.drain_delay = drain_delay
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


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other processes can bind too: the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _die_with_parent() -> None:
    """In a child: get SIGTERM if the supervisor dies (Linux), so no gateway is left orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(settings: GatewaySettings) -> int:
    """Run ``settings.gateway_workers`` gateway processes on one port until SIGTERM/SIGINT; their exit code.

    Each child is a whole gateway (its own event loop, AMQP connections and reply channel) on a
    SO_REUSEPORT socket. Signals are passed on, so every child drains as one gateway would. The
    children write their metrics to a shared directory and this process serves them, summed, on the
    metrics port.
    """
    host, port, count = settings.host, settings.port, settings.gateway_workers
    try:
        reuse_port_socket(host, port).close()  # fail here, once, when the port is taken
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="dispatcher-gateway-metrics-")
    # Children serve no /metrics of their own (-1) when this process serves their sum on the metrics port:
    # with 0 they would answer /metrics on the API port, which an Ingress publishes.
    metrics_port = "-1" if settings.metrics_port > 0 else "0"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, "DISPATCHER_METRICS_PORT": metrics_port}
    command = [sys.executable, "-m", "dispatcher.cli", "gateway", "--reuse-port", "--workers", "1",
               "--host", host, "--port", str(port)]  # fmt: skip
    metrics_server = _serve_metrics(settings, metrics_dir)

    def spawn() -> subprocess.Popen[bytes]:
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which passes it on once.
        return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    children = {spawn(): time.monotonic() for _ in range(count)}
    log.info("gateway: %d processes on %s:%d", count, host, port)
    stopping: list[int] = []

    def on_signal(sig: int, _: FrameType | None) -> None:
        stopping.append(sig)
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        while children:
            time.sleep(0.2)
            for child, started in list(children.items()):
                if child.poll() is None:
                    continue
                del children[child]
                _forget(metrics_dir, child.pid)
                if stopping:
                    code = code or (child.returncode if child.returncode > 0 else 0)
                elif time.monotonic() - started < 5:  # crashes at start: restarting would only loop
                    log.error("a gateway process exited at start (code %s): stopping", child.returncode)
                    code = 1
                    on_signal(signal.SIGTERM, None)
                else:
                    log.warning("a gateway process exited (code %s): starting another", child.returncode)
                    children[spawn()] = time.monotonic()
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _serve_metrics(settings: GatewaySettings, metrics_dir: str) -> Any:
    if settings.metrics_port <= 0:  # 0: each child answers /metrics on the API port; negative: none at all
        return None
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    return server


def _forget(metrics_dir: str, pid: int) -> None:
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, metrics_dir)

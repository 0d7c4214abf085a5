"""uvicorn with a drain phase: on SIGTERM the gateway first reports not-ready, then stops accepting.

Kubernetes keeps routing to a pod for a moment after it starts terminating, so for ``drain_delay``
seconds the gateway still serves everything while ``/ready`` answers 503; then uvicorn closes its
listeners and waits (``timeout_graceful_shutdown``) for the open streams to finish. SIGINT (Ctrl-C)
skips the delay.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

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

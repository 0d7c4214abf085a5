"""Who is still listening: gateway liveness and the cancellations the gateways send.

Direct reply-to drops replies to a requester that is gone without telling anyone, so a worker
learns of a vanished gateway from its heartbeats (``GatewayAlive`` on the control exchange), or
at once when a reconnecting gateway says its old incarnation is gone (``GatewayGone``). Work for
a gone gateway is aborted; its requests still in the queue are dropped when dequeued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

from llmdispatch.wire import GatewayAlive

Status = Literal["alive", "gone", "unknown"]


class GatewayWatch:
    def __init__(self, timeout: float, on_gone: Callable[[str], None], *, forget_after: float = 3600.0) -> None:
        self.timeout = timeout
        self.on_gone = on_gone
        self.forget_after = forget_after
        self._seen: dict[str, float] = {}  # incarnation -> last heartbeat (monotonic)
        self._offset: dict[str, float] = {}  # incarnation -> our wall clock minus its wall clock (s)
        self._gone: dict[str, float] = {}  # incarnation -> when it went (monotonic)
        self._said_gone: set[str] = set()  # gone by its own word: final
        self._listening_since: float | None = None
        self._last_check = time.monotonic()

    def listening(self, on: bool) -> None:
        """Our control subscription (re)started or stopped: what we saw before may be stale."""
        self._listening_since = time.monotonic() if on else None
        self._seen.clear()

    def alive(self, message: GatewayAlive) -> None:
        gateway = message.gateway
        if gateway in self._said_gone:
            return
        self._gone.pop(gateway, None)  # a timeout was wrong (we were the slow one): trust it again
        self._seen[gateway] = time.monotonic()
        self._offset[gateway] = time.time() - message.now / 1000

    def gone(self, gateway: str, *, said: bool = True) -> None:
        if said:
            self._said_gone.add(gateway)
        self._seen.pop(gateway, None)
        if gateway not in self._gone:
            self._gone[gateway] = time.monotonic()
            self.on_gone(gateway)

    def check(self) -> None:
        """Declare gone the gateways that went quiet (called every ``timeout / 8`` or so)."""
        now = time.monotonic()
        stalled, self._last_check = now - self._last_check > self.timeout / 2, now
        if stalled or self._listening_since is None:
            return  # our own loop was late: heartbeats may be waiting unread, judge next time
        for gateway, seen in list(self._seen.items()):
            if now - seen > self.timeout:
                self.gone(gateway, said=False)
        for gateway, at in list(self._gone.items()):
            if now - at > self.forget_after:
                del self._gone[gateway]
                self._said_gone.discard(gateway)
                self._offset.pop(gateway, None)

    def status(self, gateway: str) -> Status:
        if not gateway:
            return "alive"  # a gateway that does not say who it is: assume it listens
        if gateway in self._gone:
            return "gone"
        if gateway in self._seen:
            return "alive"
        return "unknown"

    async def settle(self, gateway: str) -> Status:
        """The gateway's status once known. One we never heard of may be new (its first heartbeat
        still on its way, or its control link reconnecting after a failover): it gets a full
        ``timeout`` of listening to show up before its request counts as orphaned."""
        started = time.monotonic()
        while (status := self.status(gateway)) == "unknown":
            since = self._listening_since
            if since is not None and time.monotonic() - max(since, started) > self.timeout:
                return "gone"  # it vanished before we could hear it
            await asyncio.sleep(self.timeout / 8)
        return status

    def offset(self, gateway: str) -> float:
        return self._offset.get(gateway, 0.0)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.timeout / 8)
            self.check()

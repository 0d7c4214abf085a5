"""One request a worker has taken off the queue: one delivery attempt."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from llmdispatch.delivery import Attempt
from llmdispatch.wire import H_ENDPOINT, H_ENQUEUED_AT, H_GATEWAY, H_PRIORITY, H_TIMEOUT, H_TOKEN, H_TRACEPARENT

_attempts = itertools.count(1)


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


@dataclass
class Job:
    message: AbstractIncomingMessage | None  # None once the broker took it back (connection lost)
    request_id: str
    reply_to: str
    endpoint: str
    token_name: str
    priority: int
    gateway: str  # the publishing gateway's incarnation
    enqueued_at_ms: int  # on the gateway's clock
    timeout_ms: int  # how long after enqueued_at it may be served (0: no limit)
    traceparent: str | None
    attempt: Attempt
    lane: int = 0  # 0: normal queue, 1: express queue
    consumer_tag: str = ""
    received_at: float = field(default_factory=time.monotonic)
    last_sent_at: float = field(default_factory=time.monotonic)
    last_upstream_at: float = field(default_factory=time.monotonic)  # last bytes from vLLM
    # A whole (non-streamed) answer: vLLM is silent until it is done, so the watchdog bounds its
    # total time from ``called_at`` instead of the gap between bytes.
    whole: bool = False
    called_at: float = 0.0  # monotonic; 0: vLLM not called yet
    done_event: bytes = b""  # the server's `data: [DONE]` event, held until the usage record is durable
    output_started: bool = False  # a DATA frame was sent: the answer can no longer be restarted
    status: int = 0  # the status sent to the gateway (HEAD or ERROR frame)
    enqueued_at: float | None = None  # the publish time on this worker's wall clock
    deadline: float = 0.0  # this worker's wall clock; 0: none
    stop_reason: str = ""  # why cancelled from outside: "cancel", "gateway", "stall", "timeout", "lost"...
    settled: bool = False  # acked, nacked or handed back: the slot is free
    task: asyncio.Task[None] | None = None
    body: dict[str, Any] | None = None  # the request as sent to the server (its prompt is counted if cut short)
    # The broker delivered it before (to us or another worker): its gateway must say Proceed first.
    redelivered: bool = False
    go_ahead: asyncio.Future[None] | None = None  # set while waiting for that Proceed

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage, worker_id: str) -> Job:
        headers = message.headers or {}
        traceparent = headers.get(H_TRACEPARENT)
        return cls(
            message=message,
            request_id=message.correlation_id or "",
            reply_to=message.reply_to or "",
            endpoint=str(headers.get(H_ENDPOINT, "chat/completions")),
            token_name=str(headers.get(H_TOKEN, "")),
            priority=_int(headers.get(H_PRIORITY, 0)),
            gateway=str(headers.get(H_GATEWAY, "")),
            enqueued_at_ms=_int(headers.get(H_ENQUEUED_AT)),
            timeout_ms=_int(headers.get(H_TIMEOUT)),
            traceparent=str(traceparent) if traceparent else None,
            attempt=Attempt(f"{worker_id}.{next(_attempts)}"),
            redelivered=bool(message.redelivered),
        )

    def place_in_time(self, gateway_offset: float) -> None:
        """Translate the gateway's clock into ours (``offset`` = our clock - the gateway's, in s)."""
        if self.enqueued_at_ms:
            self.enqueued_at = self.enqueued_at_ms / 1000 + gateway_offset
            if self.timeout_ms:
                self.deadline = self.enqueued_at + self.timeout_ms / 1000

    def expired(self) -> bool:
        return bool(self.deadline) and time.time() > self.deadline

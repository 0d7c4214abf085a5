"""One request a worker has taken off the queue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import msgspec
from aio_pika.abc import AbstractIncomingMessage

from dispatcher.wire import H_DEADLINE, H_ENDPOINT, H_ENQUEUED_AT, H_PRIORITY, H_TOKEN, H_TRACEPARENT


@dataclass
class Job:
    message: AbstractIncomingMessage
    request_id: str
    reply_to: str
    endpoint: str
    token_name: str
    priority: int
    deadline: float  # unix time
    traceparent: str | None
    enqueued_at: float | None = None  # unix time the gateway published it
    received_at: float = field(default_factory=time.monotonic)
    last_sent_at: float = field(default_factory=time.monotonic)
    output_started: bool = False
    status: int = 0  # the status sent to the gateway (HEAD or ERROR frame)
    task: asyncio.Task[None] | None = None

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage) -> Job:
        headers = message.headers or {}
        traceparent = headers.get(H_TRACEPARENT)
        enqueued_at = headers.get(H_ENQUEUED_AT)
        return cls(
            message=message,
            request_id=message.correlation_id or "",
            reply_to=message.reply_to or "",
            endpoint=str(headers.get(H_ENDPOINT, "chat/completions")),
            token_name=str(headers.get(H_TOKEN, "")),
            priority=int(headers.get(H_PRIORITY, 0)),  # type: ignore[arg-type]
            deadline=int(headers.get(H_DEADLINE, 0) or 0) / 1000,  # type: ignore[call-overload]
            traceparent=str(traceparent) if traceparent else None,
            enqueued_at=int(enqueued_at) / 1000 if enqueued_at else None,  # type: ignore[call-overload]
        )

    def expired(self) -> bool:
        return bool(self.deadline) and time.time() > self.deadline


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _WithUsage(msgspec.Struct):
    usage: Usage | None = None


_usage_decoder = msgspec.json.Decoder(_WithUsage)


def usage_of(json_bytes: bytes) -> Usage | None:
    """The `usage` object of a vLLM response or stream chunk, if it has one."""
    try:
        return _usage_decoder.decode(json_bytes).usage
    except msgspec.DecodeError:
        return None

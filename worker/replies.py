"""Frames back to the gateways, batched: one AMQP message per gateway channel per flush.

Replies go to direct reply-to addresses with ``mandatory=False`` and without publisher confirms:
a reply to a gateway that is gone is dropped by the broker, and the gateway learns about a lost
worker from missing heartbeats instead.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
from aio_pika.abc import AbstractChannel

from dispatcher.wire import Frame, frames_encoder

log = logging.getLogger("dispatcher.worker.replies")


class ReplySender:
    def __init__(self, channel: AbstractChannel, flush_interval: float) -> None:
        self.channel = channel
        self.flush_interval = flush_interval
        self._buffers: dict[str, list[Frame]] = {}
        self._flush_scheduled = False
        self._flushing: asyncio.Task[None] | None = None

    def send(self, reply_to: str, frame: Frame) -> None:
        """Queue a frame; it leaves within ``flush_interval``."""
        self._buffers.setdefault(reply_to, []).append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(self.flush_interval, self._start_flush)

    def _start_flush(self) -> None:
        self._flushing = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        self._flush_scheduled = False
        buffers, self._buffers = self._buffers, {}
        for reply_to, frames in buffers.items():
            message = aio_pika.Message(frames_encoder.encode(frames), content_type="application/msgpack")
            try:
                await self.channel.default_exchange.publish(message, routing_key=reply_to, mandatory=False)
            except Exception as exc:  # the broker is gone: the gateways fail these streams themselves
                log.warning("could not send %d frames: %s", len(frames), type(exc).__name__)

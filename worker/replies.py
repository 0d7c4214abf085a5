"""Frames back to the gateways: batched per gateway channel, each gateway's sent in order by its own flusher.

Replies go to direct reply-to addresses with ``mandatory=False`` and without publisher confirms
(a reply to a gateway that is gone is dropped by the broker; gateway liveness tells us instead).
Each gateway incarnation gets a connection of its own: in a cluster, a reply to a gateway whose
node is down makes the broker close the publishing connection (541 on 3.10), and that must not
take the other gateways' streams with it. For the same reason each connection has its own flusher
task: one task publishes that gateway's batches one after another, so its frames can never overtake
each other, while a slow link (a stalled TCP connection, a node in memory alarm, a reconnect) only
delays the frames bound for its own gateway. ``sent(reply_to)`` waits until everything queued
for that address before it has left, so that a request is acked only once its END is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq import spec

from llmdispatch.amqp import BrokerLink
from llmdispatch.wire import Frame, frames_encoder

log = logging.getLogger("dispatcher.worker.replies")


CONNECT_WAIT = 2.0  # s a batch waits for its gateway's new connection before it counts as lost
# Frame bytes per AMQP message: a whole answer of many MB is carried by several messages, each well
# under RabbitMQ 4.x's default max_message_size (16 MiB).
MAX_BATCH_BYTES = 4 << 20


class GatewayLink:
    """The connection replies to one gateway incarnation travel on, and the task that publishes them."""

    def __init__(self, urls: str, name: str, flush_interval: float, on_lost: Callable[[list[Frame]], None]) -> None:
        self.channel: AbstractChannel | None = None
        self.flush_interval = flush_interval
        self.on_lost = on_lost
        self._buffers: dict[str, list[Frame]] = {}  # reply-to address (a channel of the gateway) -> frames
        self._due = asyncio.Event()
        self._scheduled = False
        self._sent: asyncio.Future[None] | None = None  # resolved when the current buffers have left
        self._flushing: asyncio.Future[None] | None = None  # the batches being published now
        self.link = BrokerLink(urls, name, self._setup, self._lost, role="worker-replies")
        self.link.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _setup(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        self.link.watch(channel)
        self.channel = channel

    def _lost(self) -> None:
        self.channel = None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for future in (self._sent, self._flushing):  # nobody waits for a gateway that is gone
            if future is not None and not future.done():
                future.set_result(None)
        await self.link.close()

    def send(self, reply_to: str, frame: Frame, urgent: bool) -> None:
        self._buffers.setdefault(reply_to, []).append(frame)
        if urgent:
            self._due.set()
            self._scheduled = True
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self.flush_interval, self._due.set)

    async def sent(self) -> None:
        """Until every frame queued so far has been published (or given up)."""
        if not self._buffers:
            if self._flushing is not None and not self._flushing.done():
                await asyncio.shield(self._flushing)
            return
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._sent)

    async def flush_now(self) -> None:
        if self._buffers:
            self._due.set()
            await self.sent()

    async def _run(self) -> None:
        while True:
            await self._due.wait()
            self._due.clear()
            self._scheduled = False
            buffers, self._buffers = self._buffers, {}
            sent, self._sent = self._sent, None
            self._flushing = sent or asyncio.get_running_loop().create_future()
            try:
                for reply_to, frames in buffers.items():
                    for batch in _batches(frames):
                        await self._publish(reply_to, batch)
            finally:
                if not self._flushing.done():
                    self._flushing.set_result(None)

    async def _ready_channel(self) -> AbstractChannel | None:
        if not self.link.ready:
            try:
                await asyncio.wait_for(self.link.connected.wait(), CONNECT_WAIT)
            except TimeoutError:
                return None
        return self.channel

    async def _publish(self, reply_to: str, frames: list[Frame]) -> None:
        channel = await self._ready_channel()
        body = frames_encoder.encode(frames)
        try:
            if channel is None or channel.is_closed:
                raise ConnectionError("no reply connection to this gateway")
            # aiormq's publish directly: aio_pika's Message and Exchange.publish cost about a third
            # more per batch, for the same frames on the wire (its default properties, below).
            underlay = await channel.get_underlay_channel()
            properties = spec.Basic.Properties(
                content_type="application/msgpack", delivery_mode=1, headers={}, priority=0
            )
            await underlay.basic_publish(body, routing_key=reply_to, properties=properties, mandatory=False)
        except Exception as exc:  # the broker is gone: these attempts can no longer answer
            log.warning("could not send %d frames: %s", len(frames), type(exc).__name__)
            self.on_lost(frames)


class ReplySender:
    def __init__(self, urls: str, name: str, flush_interval: float, on_lost: Callable[[list[Frame]], None]) -> None:
        self.urls = urls
        self.name = name
        self._links: dict[str, GatewayLink] = {}  # gateway incarnation -> its connection and flusher
        self._gateway_of: dict[str, str] = {}  # reply-to address -> gateway incarnation
        self._made = 0  # links made so far (their connections' names)
        self.flush_interval = flush_interval
        self.on_lost = on_lost  # frames that could not be sent (their attempts are broken)

    def start(self) -> None:
        """Nothing to start: each gateway's link starts its flusher when it is opened."""

    async def stop(self) -> None:
        await self.flush_now()
        for gateway in list(self._links):
            await self.forget(gateway)

    def open(self, gateway: str, reply_to: str) -> None:
        """A job of this gateway arrived: connect for its replies now, while the job starts."""
        self._gateway_of[reply_to] = gateway
        if gateway not in self._links:
            self._links[gateway] = GatewayLink(
                self.urls, f"{self.name}-replies-{self._made}", self.flush_interval, self.on_lost
            )
            self._made += 1

    async def forget(self, gateway: str) -> None:
        """The gateway is gone: close its connection (what it had not sent yet is moot)."""
        link = self._links.pop(gateway, None)
        self._gateway_of = {r: g for r, g in self._gateway_of.items() if g != gateway}
        if link is not None:
            await link.close()

    def _link(self, reply_to: str) -> GatewayLink | None:
        return self._links.get(self._gateway_of.get(reply_to, ""))

    def send(self, reply_to: str, frame: Frame, *, urgent: bool = False) -> None:
        """Queue a frame; it leaves within ``flush_interval``, or at once when ``urgent`` (a stream's
        first output: time to first token is what users feel)."""
        link = self._link(reply_to)
        if link is None:  # no connection to its gateway (gone): its attempt is broken
            asyncio.get_running_loop().call_soon(self.on_lost, [frame])
            return
        link.send(reply_to, frame, urgent)

    async def sent(self, reply_to: str | None = None) -> None:
        """Wait until every frame queued so far for ``reply_to`` (None: for anyone) has been
        published or given up; frames to other gateways are not waited for."""
        if reply_to is not None:
            link = self._link(reply_to)
            if link is not None:
                await link.sent()
            return
        await asyncio.gather(*(link.sent() for link in list(self._links.values())))

    async def flush_now(self) -> None:
        await asyncio.gather(*(link.flush_now() for link in list(self._links.values())))


def _batches(frames: list[Frame]) -> list[list[Frame]]:
    """``frames`` in order, cut into batches of at most ``MAX_BATCH_BYTES`` of data (or one frame)."""
    batches: list[list[Frame]] = [[]]
    size = 0
    for frame in frames:
        if size + len(frame.data) > MAX_BATCH_BYTES and batches[-1]:
            batches.append([])
            size = 0
        batches[-1].append(frame)
        size += len(frame.data)
    return batches

"""The gateway's side of RabbitMQ: publish requests, receive reply frames, send cancellations.

One channel carries both: it consumes ``amq.rabbitmq.reply-to`` (which must happen before the
first publish) and publishes requests with publisher confirms, so that a full queue is a clean
429 and not a hang. Reply frames are demultiplexed by request id into ``PendingRequest`` inboxes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import DeliveryError, PublishError

from dispatcher.amqp import BrokerLink
from dispatcher.errors import APIError, error_body
from dispatcher.settings import GatewaySettings
from dispatcher.wire import (
    CONTROL_EXCHANGE,
    REPLY_TO,
    Announce,
    Cancel,
    Discover,
    Frame,
    Kind,
    control_decoder,
    control_encoder,
    frames_decoder,
    queue_name,
)

log = logging.getLogger("dispatcher.gateway.broker")


class PendingRequest:
    """The inbox of one request in flight: frames arrive here from the reply consumer."""

    __slots__ = ("_frames", "_waiter", "accepted_at", "model", "output_started", "owner", "request_id")

    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        self.owner = ""  # the worker that serves it
        self.output_started = False
        self.accepted_at: float | None = None
        self._frames: deque[Frame] = deque()
        self._waiter: asyncio.Future[None] | None = None  # set while the relay waits for frames

    def feed(self, frame: Frame) -> bool:
        """Take one frame; returns False when it comes from a worker that must be told to stop."""
        if frame.kind is Kind.ACCEPTED:
            if self.output_started and frame.worker != self.owner:
                # Our worker died after sending output and the broker redelivered the request:
                # serving it again would duplicate the answer, so end it here.
                self.fail(502, "The worker serving this request stopped mid-stream.")
                return False
            self.owner = frame.worker
            self.accepted_at = time.monotonic()
        elif frame.worker and self.owner and frame.worker != self.owner:
            return False
        elif frame.kind is Kind.DATA:
            # Only body bytes commit us to this worker: a redelivery after a bare HEAD (the worker
            # died while vLLM still queued the request) is served from the start, cleanly.
            self.output_started = True
        self._frames.append(frame)
        self._wake()
        return True

    def fail(self, status: int, message: str) -> None:
        self._frames.append(Frame(self.request_id, Kind.ERROR, error_body(status, message), status=status))
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_frames(self, timeout: float | None) -> list[Frame]:
        """Every frame that has arrived, waiting up to ``timeout`` for one ([] on timeout)."""
        if not self._frames:
            # A bare future and timer: asyncio.wait_for would wrap every wait in a new task, and this
            # runs once per batch of frames per stream.
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, self._wake)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if not self._frames:
                return []  # timed out
        frames = list(self._frames)
        self._frames.clear()
        return frames


class ModelRegistry:
    """Which models live workers serve, from their periodic announcements."""

    def __init__(self, expiry: float = 15.0) -> None:
        self.expiry = expiry
        self._workers: dict[str, tuple[float, Announce]] = {}

    def update(self, announce: Announce) -> None:
        self._workers[announce.worker] = (time.monotonic() + self.expiry, announce)

    def remove(self, worker: str) -> None:
        self._workers.pop(worker, None)

    def live(self) -> list[Announce]:
        now = time.monotonic()
        for worker in [w for w, (until, _) in self._workers.items() if until < now]:
            del self._workers[worker]
        return [announce for _, announce in self._workers.values()]

    def models(self) -> list[str]:
        return sorted({announce.model for announce in self.live()})

    def serves(self, model: str) -> bool:
        return any(announce.model == model for announce in self.live())


class GatewayBroker:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.registry = ModelRegistry()
        self.pending: dict[str, PendingRequest] = {}
        self.link = BrokerLink(settings.amqp_url, "dispatcher-gateway", self._setup, self._on_connection_lost)
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._control: aio_pika.abc.AbstractExchange | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        return self.link.ready and self._channel is not None

    async def start(self) -> None:
        """Connect in the background (retrying until the broker is there); /ready says when."""
        self.link.start()

    async def stop(self) -> None:
        await self.link.close()

    async def _setup(self, connection: AbstractConnection) -> None:
        """Build the channel, the reply consumer and the control subscription on a fresh connection."""
        # One plain channel per connection: after a reconnect the reply queue has a new name, so it
        # is rebuilt here, exactly once, rather than restored behind our back.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self.link.watch(channel)
        reply_queue = await channel.get_queue(REPLY_TO, ensure=False)
        await reply_queue.consume(self._on_reply, no_ack=True)
        control = await channel.declare_exchange(CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        control_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await control_queue.bind(control)
        await control_queue.consume(self._on_control, no_ack=True)
        self._channel, self._control = channel, control
        await control.publish(aio_pika.Message(control_encoder.encode(Discover())), routing_key="")

    def _on_connection_lost(self) -> None:
        self._channel = self._control = None
        # Replies for requests in flight were addressed to the old channel: they are lost.
        for pending in self.pending.values():
            pending.fail(503, "Lost the connection to the message broker; please retry.")

    async def publish(
        self,
        request_id: str,
        model: str,
        body: bytes,
        *,
        priority: int,
        headers: dict[str, aio_pika.abc.FieldValue],
        expiration: float,
    ) -> PendingRequest:
        """Queue a request; returns its inbox. Raises APIError when it can't be queued."""
        if not self.ready or self._channel is None:
            raise APIError(503, "The gateway is not connected to the message broker; try again shortly.")
        pending = PendingRequest(request_id, model)
        self.pending[request_id] = pending
        message = aio_pika.Message(
            body,
            content_type="application/json",
            priority=priority,
            expiration=expiration,
            correlation_id=request_id,
            reply_to=REPLY_TO,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            routing_key = queue_name(model, express=priority >= self.settings.express_priority)
            await self._channel.default_exchange.publish(message, routing_key=routing_key, mandatory=True)
        except PublishError as exc:  # returned: no queue for this model (no worker ever started)
            self.pending.pop(request_id, None)
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found") from exc
        except DeliveryError as exc:  # nacked: the queue is full (x-overflow: reject-publish)
            self.pending.pop(request_id, None)
            raise APIError(
                429,
                f"The queue for model `{model}` is full; retry later.",
                code="queue_full",
                headers={"Retry-After": "5"},
            ) from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            self.pending.pop(request_id, None)
            raise APIError(503, "Could not queue the request: the message broker is unavailable.") from exc
        return pending

    def finish(self, request_id: str, *, cancel: bool) -> None:
        """Forget a request; when it did not complete, tell the workers to drop it."""
        self.pending.pop(request_id, None)
        if cancel:
            self.send_cancel(request_id)

    def send_cancel(self, request_id: str, worker: str = "") -> None:
        if self._control is None or not self.ready:
            return
        message = aio_pika.Message(control_encoder.encode(Cancel(request_id, worker)))
        task = asyncio.get_running_loop().create_task(self._send_control(message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_control(self, message: aio_pika.Message) -> None:
        try:
            assert self._control is not None
            await self._control.publish(message, routing_key="")
        except Exception as exc:  # best effort: a cancel lost with the broker is moot anyway
            log.warning("could not publish a control message: %s", exc)

    def _on_reply(self, message: AbstractIncomingMessage) -> None:
        # Called for every batch of frames: keep it free of awaits on slow things.
        try:
            frames = frames_decoder.decode(message.body)
        except Exception:
            log.error("dropping an undecodable reply message")
            return
        for frame in frames:
            pending = self.pending.get(frame.request_id)
            if pending is None:
                # Nobody waits for it any more (client gone, timed out): stop the work.
                if frame.kind not in (Kind.END, Kind.ERROR):
                    self.send_cancel(frame.request_id)
                continue
            if not pending.feed(frame):
                self.send_cancel(frame.request_id, frame.worker)

    def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            control = control_decoder.decode(message.body)
        except Exception:
            return
        if isinstance(control, Announce):
            self.registry.update(control)

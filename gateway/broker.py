"""The gateway's side of RabbitMQ: publish requests, receive reply frames, keep workers informed.

Two connections:
- the *reply* connection carries one channel that consumes ``amq.rabbitmq.reply-to`` (which must
  happen before the first publish, on the same channel) and publishes requests with publisher
  confirms, so that a full queue is a clean 429 and not a hang. Its reply consumer is no-ack, so a
  broker memory alarm (which blocks publishers) does not stop replies;
- the *control* connection: worker announcements in, cancellations, go-aheads (``Proceed``) and
  heartbeats out.

Each reply connection is an *incarnation* of this gateway: replies addressed to an earlier one are
lost. Requests carry the incarnation; heartbeats (``GatewayAlive``) tell workers it still listens,
and after a reconnect ``GatewayGone`` tells them the old one does not, so they stop its work.
Frames are demultiplexed by request id into ``Inbox``es (``dispatcher.delivery``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import DeliveryError, PublishError

from llmdispatch.amqp import BrokerLink, declare_model_queue
from llmdispatch.delivery import Inbox
from llmdispatch.errors import APIError
from llmdispatch.settings import GatewaySettings
from llmdispatch.wire import (
    ASK_PROCEED,
    CONTROL_EXCHANGE,
    H_GATEWAY,
    REPLY_TO,
    Announce,
    Cancel,
    Discover,
    Frame,
    GatewayAlive,
    GatewayGone,
    Kind,
    Proceed,
    check_model_name,
    control_decoder,
    control_encoder,
    frames_decoder,
    message_priority,
    queue_arguments,
    queue_name,
    request_queue,
    unix_ms,
)

log = logging.getLogger("dispatcher.gateway.broker")

HEARTBEAT_INTERVAL = 0.2  # s between GatewayAlive messages (workers give up after their liveness timeout)
SWEEP_INTERVAL = 5.0


class ModelRegistry:
    """Which models live workers serve (from their announcements), and which are configured."""

    def __init__(self, configured: list[str], expiry: float = 15.0, remember: float = 3600.0) -> None:
        self.configured = set(configured)
        self.expiry = expiry
        self.remember = remember  # a model served this recently may come back (scale from zero)
        self._workers: dict[str, tuple[float, Announce]] = {}
        self._served_at: dict[str, float] = {}

    def update(self, announce: Announce) -> None:
        now = time.monotonic()
        self._workers[announce.worker] = (now + self.expiry, announce)
        self._served_at[announce.model] = now

    def live(self) -> list[Announce]:
        now = time.monotonic()
        for worker in [w for w, (until, _) in self._workers.items() if until < now]:
            del self._workers[worker]
        return [announce for _, announce in self._workers.values()]

    def models(self) -> list[str]:
        """Models a client may ask for: served now, configured, or served recently."""
        horizon = time.monotonic() - self.remember
        recent = {model for model, at in self._served_at.items() if at > horizon}
        return sorted({announce.model for announce in self.live()} | self.configured | recent)

    def knows(self, model: str) -> bool:
        if model in self.configured or any(announce.model == model for announce in self.live()):
            return True
        served_at = self._served_at.get(model)
        return served_at is not None and served_at > time.monotonic() - self.remember


class GatewayBroker:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        configured = [check_model_name(m.strip()) for m in settings.models.split(",") if m.strip()]
        self.registry = ModelRegistry(configured)
        self.pending: dict[str, Inbox] = {}
        self.name = f"gw-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.incarnation = ""  # changes with every reply connection
        self._gone: list[str] = []  # incarnations to announce as gone once the control link is up
        self.replies = BrokerLink(
            settings.amqp_url,
            f"dispatcher-gateway-{self.name}",
            self._setup_replies,
            self._replies_lost,
            role="gateway-replies",
        )
        self.control = BrokerLink(
            settings.amqp_url,
            f"dispatcher-gateway-{self.name}-control",
            self._setup_control,
            self._control_lost,
            role="gateway-control",
        )
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._underlay: aiormq.abc.AbstractChannel | None = None  # the same channel, for publishing
        self._control: aio_pika.abc.AbstractExchange | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._beat = asyncio.Event()  # set: send a heartbeat now
        self._orphans: dict[str, None] = {}  # attempts told to stop (insertion-ordered, bounded)
        # Gets every END and BILLED frame, also of requests that ended here already (the TPM limits).
        self.on_billed: Callable[[Frame], None] = lambda frame: None

    @property
    def ready(self) -> bool:
        return self.replies.ready and self._channel is not None and self.control.ready

    async def start(self) -> None:
        """Connect in the background (retrying until the broker is there); /ready says when."""
        self.replies.start()
        self.control.start()
        self._tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._sweep())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.incarnation:
            await self._publish_control(GatewayGone(self.incarnation))  # our workers stop at once
        await self.replies.close()
        await self.control.close()

    # -- connections ---------------------------------------------------------------------------

    async def _setup_replies(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self.replies.watch(channel)
        # Consumed on the underlying aiormq channel: aio-pika's consumer would add a task and an
        # IncomingMessage per reply batch, and there are hundreds of batches a second.
        underlay = await channel.get_underlay_channel()
        await underlay.basic_consume(REPLY_TO, self._on_reply, no_ack=True)
        # Configured models get their queues now: their requests wait there while no worker runs.
        arguments = queue_arguments(self.settings.max_queue_length, self.settings.queue_type)
        for model in sorted(self.registry.configured):
            for express in (False, True):
                await declare_model_queue(connection, queue_name(model, express=express), arguments)
        self._channel, self._underlay = channel, underlay
        self.incarnation = f"{self.name}.{self.replies.connections_made + 1}"
        self._beat.set()  # workers hear of the new incarnation at once, before its first request

    def _replies_lost(self) -> None:
        self._channel = self._underlay = None
        if self.incarnation:
            self._gone.append(self.incarnation)
            self.incarnation = ""
        # Replies for requests in flight were addressed to the old channel: they are lost.
        for inbox in self.pending.values():
            inbox.fail(503, "Lost the connection to the message broker; please retry.")

    async def _setup_control(self, connection: AbstractConnection) -> None:
        channel = await connection.channel()
        self.control.watch(channel)
        control = await channel.declare_exchange(CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        control_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await control_queue.bind(control)
        await control_queue.consume(self._on_control, no_ack=True)
        self._control = control
        await control.publish(aio_pika.Message(control_encoder.encode(Discover())), routing_key="")

    def _control_lost(self) -> None:
        self._control = None

    # -- requests ------------------------------------------------------------------------------

    async def publish(
        self,
        request_id: str,
        model: str,
        body: bytes,
        *,
        priority: int,
        headers: dict[str, aio_pika.abc.FieldValue],
        expiration: float,
        whole: bool = False,
    ) -> Inbox:
        """Queue a request; returns its inbox. Raises APIError when it can't be queued. ``whole``: the
        answer is one JSON body (not streamed), bounded by its size rather than by a reader's pace."""
        channel = self._underlay
        if not self.ready or channel is None:
            raise APIError(503, "The gateway is not connected to the message broker; try again shortly.")
        routing_key = request_queue(model, priority, self.settings.express_priority)  # model checked by then
        inbox = Inbox(
            request_id,
            model,
            max_buffered_bytes=self.settings.max_buffered_bytes,
            max_answer_bytes=self.settings.max_answer_bytes if whole else None,
        )
        self.pending[request_id] = inbox
        # aiormq's publish directly (aio-pika's Message and Exchange.publish cost more than the rest
        # of the publish); the channel has confirms and raises on returns, as aio-pika set it up.
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=1,  # not persistent: an answer is worth nothing after a broker restart
            priority=message_priority(priority, self.settings.queue_type),
            expiration=str(int(expiration * 1000)),
            correlation_id=request_id,
            reply_to=REPLY_TO,
            headers={**headers, H_GATEWAY: self.incarnation},
        )
        try:
            await channel.basic_publish(body, routing_key=routing_key, properties=properties, mandatory=True)
        except PublishError as exc:  # returned: no queue for this model (nobody configured or served it)
            self.pending.pop(request_id, None)
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found") from exc
        except DeliveryError as exc:  # nacked: the queue is full (x-overflow: reject-publish)
            self.pending.pop(request_id, None)
            if self.settings.queue_type == "quorum":
                # A quorum queue also refuses while it has no leader (a node lost): say both.
                raise APIError(
                    503,
                    f"The queue for model `{model}` is full or failing over; retry shortly.",
                    code="queue_unavailable",
                    headers={"Retry-After": "2"},
                ) from exc
            raise APIError(
                429,
                f"The queue for model `{model}` is full; retry later.",
                code="queue_full",
                headers={"Retry-After": "5"},
            ) from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            self.pending.pop(request_id, None)
            raise APIError(503, "Could not queue the request: the message broker is unavailable.") from exc
        except BaseException:  # cancelled (the client left, or too slow): it may be queued anyway
            self.finish(request_id, cancel=True)
            raise
        return inbox

    def fail_all(self, status: int, message: str) -> None:
        """End every open request with an error (a stream gets an error event): the shutdown grace is
        running out. Their relays then cancel the work on the workers."""
        for inbox in list(self.pending.values()):
            inbox.fail(status, message)

    def finish(self, request_id: str, *, cancel: bool) -> None:
        """Forget a request; when it did not complete, tell the workers to drop it."""
        inbox = self.pending.pop(request_id, None)
        if cancel:
            self.send_cancel(request_id, inbox.attempt if inbox is not None else "")

    def send_cancel(self, request_id: str, attempt: str = "") -> None:
        self._spawn(self._publish_control(Cancel(request_id, attempt)))

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_control(self, control: Cancel | Proceed | GatewayAlive | GatewayGone) -> None:
        exchange = self._control
        if exchange is None:
            return
        try:
            await exchange.publish(aio_pika.Message(control_encoder.encode(control)), routing_key="")
        except Exception as exc:  # best effort: a cancel lost with the broker is moot anyway
            log.warning("could not publish a control message: %s", exc)

    async def _on_reply(self, message: DeliveredMessage) -> None:
        # Called for every batch of frames: keep it free of awaits.
        try:
            frames = frames_decoder.decode(message.body)
        except Exception:
            log.error("dropping an undecodable reply message")
            return
        for frame in frames:
            kind = frame.kind
            if kind is Kind.END or kind is Kind.BILLED:
                self.on_billed(frame)
                if kind is Kind.BILLED:  # billing only: never part of the answer
                    continue
            inbox = self.pending.get(frame.request_id)
            if inbox is None:
                # Nobody waits for it any more (client gone, timed out): stop the work, once.
                if frame.kind not in (Kind.END, Kind.ERROR, Kind.REQUEUED) and frame.attempt not in self._orphans:
                    self._orphans[frame.attempt] = None
                    if len(self._orphans) > 10_000:
                        del self._orphans[next(iter(self._orphans))]
                    self.send_cancel(frame.request_id, frame.attempt)
                continue
            for attempt in inbox.feed(frame):
                self.send_cancel(frame.request_id, attempt)
            if kind is Kind.ACCEPTED and frame.data == ASK_PROCEED and inbox.wants(frame.attempt):
                # A redelivered attempt waits for this before calling the server (else feed cancelled it).
                self._spawn(self._publish_control(Proceed(frame.request_id, frame.attempt)))

    def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            control = control_decoder.decode(message.body)
        except Exception:
            return
        if isinstance(control, Announce):
            self.registry.update(control)

    # -- background ----------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            while self._gone and self._control is not None:
                await self._publish_control(GatewayGone(self._gone.pop(0)))
            if self.incarnation and self._channel is not None:
                await self._publish_control(GatewayAlive(self.incarnation, unix_ms(time.time())))
            self._beat.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat.wait(), HEARTBEAT_INTERVAL)

    async def _sweep(self) -> None:
        """End requests whose relay stopped reading (a client gone in a way nobody noticed)."""
        settings = self.settings
        stale_after = 2 * max(settings.idle_timeout, settings.keepalive_interval) + 30
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            horizon = time.monotonic() - stale_after
            for request_id, inbox in list(self.pending.items()):
                if inbox.read_at < horizon:
                    log.warning("abandoning a request nobody reads", extra={"request_id": request_id})
                    if inbox.on_abandon is not None:
                        inbox.on_abandon()
                    else:
                        self.finish(request_id, cancel=not inbox.ended)

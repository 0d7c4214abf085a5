"""One AMQP connection kept alive by our own loop: connect with backoff, set up, notice the loss, repeat.

We do not use aio-pika's robust connection: it restores channels and consumers behind our back,
and the gateway's direct reply-to consumer and the worker's pausable queue consumer must exist
exactly once, on channels we know. Here every (re)connection is a fresh connection on which the
owner's ``setup`` builds everything again, and ``lost`` is told when it goes away, so requests in
flight can be failed or abandoned explicitly. The loop also makes start-up independent of the
broker: a pod may start before RabbitMQ does.

A link is given one or more URLs (the nodes of a cluster, or one load-balanced address) and
moves on to the next one whenever a connection fails or is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from llmdispatch.metrics import broker_metrics

log = logging.getLogger("dispatcher.amqp")

Setup = Callable[[AbstractConnection], Awaitable[None]]

# AMQP heartbeat (s): a link that stalls without closing (a dead peer, a black-holing proxy) is
# noticed after about two of these, rather than the broker's default of 60 s.
HEARTBEAT = 5


def split_urls(urls: str | list[str]) -> list[str]:
    """``DISPATCHER_AMQP_URL`` may list several nodes, comma-separated."""
    if isinstance(urls, str):
        urls = urls.split(",")
    found = [url.strip() for url in urls if url.strip()]
    if not found:
        raise ValueError("no AMQP URL given")
    return found


class BrokerLink:
    def __init__(
        self,
        urls: str | list[str],
        name: str,
        setup: Setup,
        lost: Callable[[], None],
        *,
        min_delay: float = 0.2,
        max_delay: float = 5.0,
        role: str = "other",
    ) -> None:
        """``role``: the metrics' ``link`` label (bounded: a kind of link, not ``name``)."""
        self.urls = split_urls(urls)
        # Spread the processes of a deployment over the nodes; each moves on when its node fails.
        self._next_url = hash(name) % len(self.urls)
        self.name = name
        self.setup = setup
        self.lost = lost
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.connection: AbstractConnection | None = None
        self.connected = asyncio.Event()
        self.connections_made = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._gone: asyncio.Event | None = None
        metrics = broker_metrics()
        self._up = metrics.up.labels(role)
        self._up.inc(0)  # the series exists (at 0) before the first connection
        self._reconnects = metrics.reconnects.labels(role)
        self._counted_up = False

    @property
    def ready(self) -> bool:
        return self.connected.is_set() and self.connection is not None and not self.connection.is_closed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        connection, self.connection = self.connection, None
        self.connected.clear()
        self._count_up(False)
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()

    def watch(self, channel: AbstractChannel) -> None:
        """A channel the owner cannot do without: if the broker closes it, start over."""
        channel.close_callbacks.add(self._on_channel_closed)

    def _on_channel_closed(self, _: object, exc: BaseException | None = None) -> None:
        if self._closing or exc is None:
            return
        log.warning("%s: a channel was closed by the broker (%s); reconnecting", self.name, exc)
        if self._gone is not None:
            self._gone.set()

    async def _run(self) -> None:
        delay = self.min_delay
        while not self._closing:
            gone = asyncio.Event()
            self._gone = gone
            url = self.urls[self._next_url % len(self.urls)]
            try:
                connection = await aio_pika.connect(
                    url, timeout=10, heartbeat=HEARTBEAT, client_properties={"connection_name": self.name}
                )
            except Exception as exc:  # refused, reset, timeout, auth...: all mean "not yet"
                self._next_url += 1
                log.warning("%s: cannot reach the message broker (%s); retrying in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            connection.close_callbacks.add(_setter(gone))
            try:
                await self.setup(connection)
            except Exception as exc:
                self._next_url += 1
                log.warning("%s: setting up the broker connection failed: %s", self.name, exc)
                with contextlib.suppress(Exception):
                    await connection.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            self.connection = connection
            self.connections_made += 1
            delay = self.min_delay
            self.connected.set()
            self._count_up(True)
            if self.connections_made > 1:
                self._reconnects.inc()
                log.info("%s: reconnected to the message broker", self.name)
            await gone.wait()
            self.connected.clear()
            self._count_up(False)
            self.connection = None
            if self._closing:
                return
            self._next_url += 1  # its node may be the one that failed
            log.warning("%s: lost the message broker connection", self.name)
            try:
                self.lost()
            except Exception:
                log.exception("%s: handling the lost connection failed", self.name)
            with contextlib.suppress(Exception):
                await connection.close()
            await asyncio.sleep(delay)

    def _count_up(self, up: bool) -> None:
        if up != self._counted_up:
            self._counted_up = up
            self._up.inc(1 if up else -1)


def _setter(event: asyncio.Event) -> Callable[..., None]:
    return lambda *_: event.set()


async def declare_model_queue(connection: AbstractConnection, name: str, arguments: dict[str, int | str]) -> str:
    """Declare a model queue with our arguments; if it exists with others (a changed length, another
    queue type), use it as it is and say clearly what to do, rather than failing forever."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        log.error(
            "queue %s exists with other arguments than %s (%s): using it as it is. Change its length with "
            "a policy (rabbitmqctl set_policy ... '{\"max-length\": N}' --apply-to queues), or delete it "
            "to change its type.",
            name,
            arguments,
            exc,
        )
        channel = await connection.channel()
        await channel.declare_queue(name, passive=True)
    await channel.close()
    return name


async def delete_model_queue(url: str, model: str) -> None:
    """Remove a model's queues (tests and benchmarks clean up after themselves); no broker, no-op."""
    from llmdispatch.wire import queue_name

    try:
        connection = await aio_pika.connect(split_urls(url)[0])
    except Exception:
        return
    async with connection:
        channel = await connection.channel()
        for express in (False, True):
            await channel.queue_delete(queue_name(model, express=express))

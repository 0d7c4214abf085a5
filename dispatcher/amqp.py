"""One AMQP connection kept alive by our own loop: connect with backoff, set up, notice the loss, repeat.

We do not use aio-pika's robust connection: it restores channels and consumers behind our back,
and the gateway's direct reply-to consumer and the worker's pausable queue consumer must exist
exactly once, on channels we know. Here every (re)connection is a fresh connection on which the
owner's ``setup`` builds everything again, and ``lost`` is told when it goes away, so requests in
flight can be failed or abandoned explicitly. The loop also makes start-up independent of the
broker: a pod may start before RabbitMQ does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

log = logging.getLogger("dispatcher.amqp")

Setup = Callable[[AbstractConnection], Awaitable[None]]


class BrokerLink:
    def __init__(
        self,
        url: str,
        name: str,
        setup: Setup,
        lost: Callable[[], None],
        *,
        min_delay: float = 0.2,
        max_delay: float = 5.0,
    ) -> None:
        self.url = url
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

    @property
    def ready(self) -> bool:
        return self.connected.is_set() and self.connection is not None and not self.connection.is_closed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        connection, self.connection = self.connection, None
        self.connected.clear()
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
            try:
                connection = await aio_pika.connect(
                    self.url, timeout=10, client_properties={"connection_name": self.name}
                )
            except Exception as exc:  # refused, reset, timeout, auth...: all mean "not yet"
                log.warning("%s: cannot reach the message broker (%s); retrying in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            connection.close_callbacks.add(_setter(gone))
            try:
                await self.setup(connection)
            except Exception as exc:
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
            if self.connections_made > 1:
                log.info("%s: reconnected to the message broker", self.name)
            await gone.wait()
            self.connected.clear()
            self.connection = None
            if self._closing:
                return
            log.warning("%s: lost the message broker connection", self.name)
            try:
                self.lost()
            except Exception:
                log.exception("%s: handling the lost connection failed", self.name)
            with contextlib.suppress(Exception):
                await connection.close()
            await asyncio.sleep(delay)


def _setter(event: asyncio.Event) -> Callable[..., None]:
    return lambda *_: event.set()


async def delete_model_queue(url: str, model: str) -> None:
    """Remove a model's queues (tests and benchmarks clean up after themselves); no broker, no-op."""
    from dispatcher.wire import queue_name

    try:
        connection = await aio_pika.connect(url)
    except Exception:
        return
    async with connection:
        channel = await connection.channel()
        for express in (False, True):
            await channel.queue_delete(queue_name(model, express=express))

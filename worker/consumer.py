"""Taking requests off the model's queues, only as many as vLLM can start now.

Flow control uses per-consumer prefetch (RabbitMQ 4.3 denies global QoS): each lane's consumer is
created with a prefetch equal to the room that lane has at that moment, and messages are acked only
when their request has ended, so the broker never hands over more than vLLM can run; everything
else waits in RabbitMQ, where priority order holds. A consumer's prefetch is fixed when it is
created, so when the room grows beyond what the consumer can still take (after a pause, or when
the other lane freed slots) it is replaced by one with the new room.

Two lanes: the normal queue (at most ``max_concurrency - headroom`` running) and the express queue
(any free slot): the headroom is room inside the server's batch that a high priority never waits
for. Beyond it, and with no headroom at all (a worker of one or two slots), a freed slot goes to a
waiting express request before the normal lane: every express priority is above every normal one.
While vLLM is unhealthy, backlogged or we drain, nothing is consumed.

This runs on its own AMQP connection: a broker memory alarm blocks publishing connections, and
must not block our acks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from llmdispatch.amqp import BrokerLink, declare_model_queue
from llmdispatch.metrics import LANES
from llmdispatch.settings import WorkerSettings
from llmdispatch.wire import CONTROL_EXCHANGE, queue_arguments, queue_name

log = logging.getLogger("dispatcher.worker.consumer")

NORMAL, EXPRESS = 0, 1  # lane indexes (Job.lane)

OnMessage = Callable[[AbstractIncomingMessage, int, str], Awaitable[None]]


@dataclass
class Lane:
    queue: AbstractQueue
    cap: int  # at most this many of its requests run at once
    tag: str | None = None  # the current consumer
    prefetch: int = 0  # the current consumer's prefetch
    taken: int = 0  # messages the current consumer delivered that still run
    running: int = 0  # requests of this lane that run (under any consumer)


class Consumer:
    def __init__(
        self,
        settings: WorkerSettings,
        name: str,
        *,
        on_message: OnMessage,
        on_control: Callable[[AbstractIncomingMessage], Awaitable[None]],
        on_connected: Callable[[], None],
        on_lost: Callable[[], None],
        wanted: Callable[[], bool],
        free: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.on_message = on_message
        self.on_control = on_control
        self.on_connected = on_connected
        self.on_lost = on_lost
        self.wanted = wanted  # whether to consume at all (vLLM healthy, not draining...)
        self.free = free  # free slots of the worker as a whole
        self.link = BrokerLink(settings.amqp_url, name, self._setup, self._lost, role="worker-consumer")
        self.lanes: list[Lane] = []
        self._channel: AbstractChannel | None = None
        self._probe_channel: AbstractChannel | None = None
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.link.ready

    def start(self) -> None:
        self.link.start()
        self._task = asyncio.get_running_loop().create_task(self._rebalance_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.link.close()

    async def _setup(self, connection: AbstractConnection) -> None:
        channel = await connection.channel()
        self.link.watch(channel)
        arguments = queue_arguments(self.settings.max_queue_length, self.settings.queue_type)
        names = [
            await declare_model_queue(connection, queue_name(self.settings.model, express=lane), arguments)
            for lane in (False, True)
        ]
        queues = [await channel.get_queue(name, ensure=False) for name in names]
        normal_cap = self.settings.max_concurrency - self.settings.headroom
        control = await channel.declare_exchange(CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        control_queue = await channel.declare_queue(exclusive=True, auto_delete=True)  # exclusive: 4.x allows
        await control_queue.bind(control)
        await control_queue.consume(self.on_control, no_ack=True)
        # The depth probe gets a channel of its own: an RPC timeout there must not close ours.
        self._connection = connection
        self._probe_channel = await connection.channel()
        self._channel = channel
        self.lanes = [Lane(queues[0], normal_cap), Lane(queues[1], self.settings.max_concurrency)]
        self.on_connected()
        self.changed()

    def _lost(self) -> None:
        self._channel = self._probe_channel = self._connection = None
        self.lanes = []
        self.on_lost()

    # -- bookkeeping, called by the worker -----------------------------------------------------

    def taken(self, lane: int, tag: str) -> None:
        if lane < len(self.lanes):
            state = self.lanes[lane]
            state.running += 1
            if tag == state.tag:
                state.taken += 1
        self.changed()

    def released(self, lane: int, tag: str) -> None:
        if lane < len(self.lanes):
            state = self.lanes[lane]
            state.running = max(0, state.running - 1)
            if tag == state.tag:
                state.taken = max(0, state.taken - 1)
        self.changed()

    def changed(self) -> None:
        """Something that decides consuming changed: rebalance soon (coalesced)."""
        self._dirty.set()

    async def _rebalance_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self.rebalance()

    async def rebalance(self) -> None:
        async with self._lock:  # two callers both seeing "no consumer" would start two
            channel = self._channel
            if channel is None or not self.lanes:
                return
            wanted, free = self.wanted(), self.free()
            try:
                rooms = await self._rooms(free) if wanted else (0, 0)
                # The express lane first: when both lanes get a window at once, its consumer is the older.
                for index in (EXPRESS, NORMAL):
                    lane, room = self.lanes[index], rooms[index]
                    window = lane.prefetch - lane.taken
                    # A window larger than the room is tolerated in the express lane (the higher one; a
                    # message beyond the free slots goes straight back), never in the normal lane: it
                    # would take a slot a waiting express request was given.
                    shrunk = index == NORMAL and window > room
                    if lane.tag is not None and (room <= 0 or room > window or shrunk):
                        tag, lane.tag = lane.tag, None
                        await lane.queue.cancel(tag)
                    if room > 0 and lane.tag is None:
                        await channel.set_qos(prefetch_count=room)  # per consumer: for the next one
                        lane.prefetch, lane.taken = room, 0
                        lane.tag = await lane.queue.consume(self._deliver(index))
            except Exception as exc:  # broker down: the next connection starts over
                log.warning("could not change consuming state: %s", type(exc).__name__)

    async def _rooms(self, free: int) -> tuple[int, int]:
        """How many requests each lane may take now (normal, express), never more than the free slots."""
        normal, express = self.lanes
        normal_room = max(0, min(normal.cap - normal.running, free))
        express_room = max(0, min(express.cap - express.running, free))
        if normal_room > 0:
            normal_room -= await self._express_claim(normal_room, express_room)
        return normal_room, express_room

    async def _express_claim(self, normal_room: int, express_room: int) -> int:
        """Of the normal lane's room, the slots that waiting express requests get first.

        Both lanes want every slot the normal lane could take; whichever consumer the broker served
        first would get it, and a normal consumer's window refills on every ack. So while the express
        lane has no window of its own open (its requests would be delivered there at once), the express
        queue is asked how many wait: one round trip per freed slot, under load only. Whatever the
        headroom, 0 included: a slot that frees goes to a waiting express request first.
        """
        express = self.lanes[EXPRESS]
        if express.tag is not None and express.prefetch - express.taken > 0:
            return 0
        try:
            waiting = await self._count(express, timeout=1)
        except Exception as exc:  # no answer at once: nothing reserved, the lanes share as before
            log.debug("could not count the express lane's messages: %s", type(exc).__name__)
            return 0
        exclusive = max(0, express_room - normal_room)  # free slots only the express lane may use
        return min(normal_room, max(0, waiting - exclusive))

    def admits(self, lane: int) -> bool:
        """Whether a request just delivered by this lane fits its cap (a replaced consumer's window may
        have let one more through)."""
        return lane >= len(self.lanes) or self.lanes[lane].running < self.lanes[lane].cap

    def _deliver(self, lane: int) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def deliver(message: AbstractIncomingMessage) -> None:
            await self.on_message(message, lane, message.consumer_tag or "")

        return deliver

    async def depth(self) -> dict[str, int] | None:
        """Ready messages in each lane's queue (normal, express), asked on a channel of its own (a
        timeout closes it, not the consuming channel; it is reopened next time)."""
        if self._connection is None or not self.lanes:
            return None
        return {name: await self._count(lane, timeout=5) for name, lane in zip(LANES, self.lanes, strict=False)}

    async def _count(self, lane: Lane, timeout: float) -> int:
        """Messages ready in one lane's queue (a passive declare on the probe channel)."""
        channel = await self._probe()
        declared = await channel.declare_queue(lane.queue.name, passive=True, timeout=timeout)
        return declared.declaration_result.message_count or 0

    async def _probe(self) -> AbstractChannel:
        assert self._connection is not None
        channel = self._probe_channel
        if channel is None or channel.is_closed:
            channel = self._probe_channel = await self._connection.channel()
        return channel

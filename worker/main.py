"""The worker beside one vLLM server: wires consuming, serving, control messages and announcements.

- ``worker.consumer``: takes requests off the model's queues, only as many as vLLM can start now;
- ``worker.serve``: serves one job and settles its message;
- ``worker.control``: which gateways still listen (heartbeats) and what they cancelled;
- ``worker.replies``: frames back to the gateways, in order.

Two AMQP connections: one consumes (requests, control messages) and acks, one publishes (replies,
announcements), so that a broker memory alarm, which blocks publishers, does not block acks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

import aio_pika
import msgspec
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from llmdispatch.amqp import BrokerLink
from llmdispatch.errors import error_body
from llmdispatch.settings import WorkerSettings
from llmdispatch.wire import (
    CONTROL_EXCHANGE,
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
    is_express,
)
from llmdispatch.worker.accounting import WorkerAccounting
from llmdispatch.worker.backends import Load, make_backend
from llmdispatch.worker.consumer import EXPRESS, Consumer
from llmdispatch.worker.control import GatewayWatch
from llmdispatch.worker.job import Job
from llmdispatch.worker.replies import ReplySender
from llmdispatch.worker.serve import JobRunner
from llmdispatch.worker.usage import UsageLedger
from llmdispatch.worker.vllm import VLLMClient

log = logging.getLogger("dispatcher.worker")

CANCEL_BURST = 0.05  # seconds a request dequeued right after a cancellation waits for its own


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        if not settings.model:
            raise ValueError("the worker needs a model name (--model or DISPATCHER_MODEL)")
        check_model_name(settings.model)  # its queues are named after it
        self.settings = settings
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.vllm = VLLMClient(settings.vllm_url, settings.vllm_api_key, concurrency=settings.max_concurrency)
        self.jobs: dict[str, Job] = {}
        self.cancelled: dict[str, float] = {}  # request id -> when to forget it (cancelled while queued)
        self._last_cancel_at = 0.0  # when a running request was last cancelled
        self.backend = make_backend(settings.backend, settings.vllm_url, priority=settings.vllm_priority)
        self.vllm_healthy = False
        self.vllm_load: Load | None = None  # None: the server reports no load (pull up to max concurrency)
        self.accepting = True
        self.ledger = UsageLedger.from_settings(settings)
        self.accounting = WorkerAccounting(settings.model, self.id, self.ledger)
        self.gateways = GatewayWatch(settings.gateway_liveness_timeout, self._gateway_gone)
        self.replies = ReplySender(
            settings.amqp_url, f"dispatcher-worker-{self.id}", settings.flush_interval, self._frames_lost
        )
        self.runner = JobRunner(
            settings,
            self.vllm,
            self.backend,
            self.replies,
            self.accounting,
            vllm_failed=self._vllm_failed,
            released=self._released,
        )
        self.consumer = Consumer(
            settings,
            f"dispatcher-worker-{self.id}",
            on_message=self._on_message,
            on_control=self._on_control,
            on_connected=lambda: self.gateways.listening(True),
            on_lost=self._consumer_lost,
            wanted=self._should_consume,
            free=lambda: self.free_slots,
        )
        self.publisher = BrokerLink(
            settings.amqp_url,
            f"dispatcher-worker-{self.id}-out",
            self._setup_publisher,
            self._publisher_lost,
            role="worker-publisher",
        )
        self._control: aio_pika.abc.AbstractExchange | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.accounting.bind(self)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return max(0, self.settings.max_concurrency - len(self.jobs))

    @property
    def ready(self) -> bool:
        return self.consumer.ready and self.publisher.ready and self.vllm_healthy and self.accepting

    async def start(self) -> None:
        """Start serving; the broker connections come up in the background (with retries)."""
        self.vllm_healthy = (await self.backend.probe()).healthy
        self.replies.start()
        self.publisher.start()
        self.consumer.start()
        if self.ledger is not None:
            await self.ledger.start()
        self._tasks = [
            asyncio.create_task(self._watch_vllm()),
            asyncio.create_task(self._announce_periodically()),
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._watch_queue_depth()),
            asyncio.create_task(self.gateways.run()),
        ]
        log.info("worker %s serving model %s from %s", self.id, self.settings.model, self.settings.vllm_url)

    async def _setup_publisher(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        self.publisher.watch(channel)
        self._control = await channel.declare_exchange(CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        await self._announce()

    def _publisher_lost(self) -> None:
        self._control = None

    async def drain(self, grace: float) -> None:
        """Stop taking requests and let running ones finish for up to ``grace`` seconds."""
        self.accepting = False
        await self.consumer.rebalance()
        await self._announce()
        running = {job.task for job in self.jobs.values() if job.task is not None}
        if not running:
            return
        _, unfinished = await asyncio.wait(running, timeout=grace)
        for job in list(self.jobs.values()):
            self.runner.stop(job, "drain")
        if unfinished:
            await asyncio.wait(unfinished)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.replies.stop()
        if self.ledger is not None:
            await self.ledger.close()
        await self.consumer.close()
        await self.publisher.close()
        await self.vllm.close()
        await self.backend.aclose()

    def _consumer_lost(self) -> None:
        # The broker requeued our unacked messages: stop their vLLM work; the gateways take the
        # redelivery if nothing reached their clients yet.
        self.gateways.listening(False)
        for job in list(self.jobs.values()):
            job.message = None
            self.runner.stop(job, "lost")

    def _frames_lost(self, frames: list[Frame]) -> None:
        for request_id in {frame.request_id for frame in frames}:
            job = self.jobs.get(request_id)
            if job is not None:
                self.runner.stop(job, "broken")

    # -- taking messages -------------------------------------------------------------------

    def _should_consume(self) -> bool:
        if not (self.accepting and self.vllm_healthy and self.publisher.ready):
            return False
        if self.ledger is not None and self.ledger.full:
            return False  # the usage stream is gone too long: take no request we could not bill
        waiting = self.vllm_load.waiting if self.vllm_load is not None else 0.0
        if waiting == 0 or not self.jobs:
            return True  # an idle worker may always try one request
        # vLLM counts what arrived since its last scheduler step as waiting: under load, requests we
        # handed it in the last second are normally there. More than those is a backlog: pause.
        recent = time.monotonic() - 1.0
        return waiting <= sum(1 for job in self.jobs.values() if job.received_at > recent)

    async def _on_message(self, message: AbstractIncomingMessage, lane: int, tag: str) -> None:
        job = Job.from_message(message, self.id)
        job.lane, job.consumer_tag = lane, tag
        if not self.accepting or len(self.jobs) >= self.settings.max_concurrency or not self.consumer.admits(lane):
            # Draining, or delivered in the moment a lane's consumer was being replaced (beyond the free
            # slots or the lane's cap): back to the queue, at its place (the consumers are paused
            # meanwhile, so it is not handed back to us).
            self.consumer.changed()
            await message.nack(requeue=True)
            return
        self.jobs[job.request_id] = job  # holds the slot while we look at it
        self.consumer.taken(lane, tag)
        if time.monotonic() - self._last_cancel_at < CANCEL_BURST:
            # Clients often hang up together (a process exits): the slot this message got was freed by
            # one cancellation while the message's own cancellation may still be on its way.
            await asyncio.sleep(CANCEL_BURST)
        listening = await self.gateways.settle(job.gateway)
        job.place_in_time(self.gateways.offset(job.gateway))
        if listening == "gone" or self.cancelled.pop(job.request_id, None) is not None:
            why = "its gateway is gone" if listening == "gone" else "it was cancelled while queued"
            log.info("dropping a queued request: %s", why, extra={"request_id": job.request_id})
            await self.runner.settle(job, "cancelled")
            return
        self.replies.open(job.gateway, job.reply_to)  # its gateway listens: connect for the replies
        if lane == EXPRESS and not is_express(job.priority, self.settings.express_priority):
            await self._refuse_lane(job)
            return
        if job.expired():
            await self._refuse(job, 504, error_body(504, "The request timed out waiting in the queue."))
            return
        self.runner.start(job)

    async def _refuse_lane(self, job: Job) -> None:
        """A request in the express queue without an express priority: not published by a gateway of
        this deployment's settings (gateways route by the token's priority alone). Not served from
        the headroom kept for high priorities."""
        express = self.settings.express_priority
        log.error(
            "refusing a request of priority %d from the express queue (express from %d): check that gateways "
            "and workers agree on DISPATCHER_EXPRESS_PRIORITY",
            job.priority,
            express,
            extra={"request_id": job.request_id},
        )
        message = f"Priority {job.priority} does not belong to the express lane (priorities from {express})."
        await self._refuse(job, 403, error_body(403, message, code="lane_not_allowed"))

    async def _refuse(self, job: Job, status: int, body: bytes) -> None:
        """Answer a dequeued request with an error instead of serving it. ACCEPTED first: the gateway
        takes an attempt's frames only after its ACCEPTED."""
        self.runner.send(job, Kind.ACCEPTED)
        self.runner.send(job, Kind.ERROR, body, status)
        await self.runner.settle(job, "error")

    def _released(self, job: Job) -> None:
        if self.jobs.get(job.request_id) is job:
            del self.jobs[job.request_id]
        self.consumer.released(job.lane, job.consumer_tag)

    def _vllm_failed(self, why: str) -> None:
        if self.vllm_healthy:
            log.warning("vLLM failed (%s): pausing the queue until it is healthy", why)
            self.vllm_healthy = False
            self.consumer.changed()

    # -- control messages ------------------------------------------------------------------

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            control = control_decoder.decode(message.body)
        except msgspec.DecodeError:
            return
        if isinstance(control, GatewayAlive):
            self.gateways.alive(control)
        elif isinstance(control, Cancel):
            self._cancel(control)
        elif isinstance(control, Proceed):
            job = self.jobs.get(control.request_id)
            if job is not None and job.attempt.id == control.attempt and job.go_ahead is not None:
                if not job.go_ahead.done():
                    job.go_ahead.set_result(None)
        elif isinstance(control, GatewayGone):
            self.gateways.gone(control.gateway)
        elif isinstance(control, Discover):
            await self._announce()

    def _cancel(self, cancel: Cancel) -> None:
        job = self.jobs.get(cancel.request_id)
        if job is not None and job.task is not None:
            if not cancel.attempt or cancel.attempt == job.attempt.id:
                self._last_cancel_at = time.monotonic()
                self.runner.stop(job, "cancel")
        elif not cancel.attempt or (job is not None and cancel.attempt == job.attempt.id):
            # Still queued, or dequeued and not started yet: dropped before it starts.
            self.cancelled[cancel.request_id] = time.monotonic() + self.settings.queue_timeout + 60

    def _gateway_gone(self, gateway: str) -> None:
        task = asyncio.get_running_loop().create_task(self.replies.forget(gateway))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        stopped = 0
        for job in list(self.jobs.values()):
            if job.gateway == gateway:
                self.runner.stop(job, "gateway")
                stopped += 1
        if stopped:
            log.warning("gateway %s is gone: stopped %d requests nobody can receive", gateway, stopped)

    # -- background loops ------------------------------------------------------------------

    async def _watch_vllm(self, interval: float = 0.5) -> None:
        """Health and load of the inference server. A loading server is not a failed one: requests
        wait in RabbitMQ until it is ready."""
        while True:
            probe = await self.backend.probe()
            if probe.healthy != self.vllm_healthy:
                state = "healthy again" if probe.healthy else f"not ready ({probe.detail}): pausing the queue"
                log.warning("the inference server is %s", state)
                self.vllm_healthy = probe.healthy
                await self._announce()
            self.vllm_load = probe.load
            self.accounting.refresh()
            self.consumer.changed()
            await asyncio.sleep(interval)

    async def _watch_queue_depth(self, interval: float = 2.0) -> None:
        gauge = self.accounting.metrics.queue_depth
        while True:
            try:
                depths = await self.consumer.depth()
                for lane, depth in (depths or {}).items():
                    gauge.labels(self.settings.model, lane).set(depth)
            except Exception as exc:
                log.debug("could not read the queue depth: %s", exc)
            await asyncio.sleep(interval)

    async def _announce_periodically(self, interval: float = 5.0) -> None:
        while True:
            await self._announce()
            await asyncio.sleep(interval)

    async def _announce(self) -> None:
        if self._control is None:
            return
        announce = Announce(self.id, self.settings.model, self.ready)
        try:
            # Not mandatory: with no gateway listening yet it is simply dropped (mandatory, RabbitMQ
            # returns it and aiormq logs the return as an ERROR); gateways ask for one when they start.
            message = aio_pika.Message(control_encoder.encode(announce))
            await self._control.publish(message, routing_key="", mandatory=False)
        except Exception as exc:
            log.debug("could not announce: %s", exc)

    async def _heartbeats(self) -> None:
        """Heartbeat frames while vLLM is silent; abort requests vLLM stopped answering.

        A stream is stalled when no byte came for ``VLLM_STALL_TIMEOUT``. A whole (non-streamed)
        answer comes in one piece at its end, so silence proves nothing there: it is bounded by its
        total time instead (``VLLM_REQUEST_TIMEOUT``), which is no sign of a failed server."""
        interval = self.settings.heartbeat_interval
        stall = self.settings.vllm_stall_timeout
        total = self.settings.vllm_request_timeout
        tick = min(interval / 2, 1.0)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for job in list(self.jobs.values()):
                if job.task is None or job.task.done():
                    continue
                if job.whole:
                    if total and job.called_at and now - job.called_at > total:
                        log.warning("no answer after %.0fs: aborting", total, extra={"request_id": job.request_id})
                        self.runner.stop(job, "timeout")
                    elif now - job.last_sent_at >= interval:
                        self.runner.send(job, Kind.HEARTBEAT)
                elif stall and job.called_at and now - job.last_upstream_at > stall:  # not before the call
                    log.warning("vLLM sent nothing for %.0fs: aborting", stall, extra={"request_id": job.request_id})
                    self.runner.stop(job, "stall")
                elif now - job.last_sent_at >= interval:
                    self.runner.send(job, Kind.HEARTBEAT)
            self.cancelled = {rid: until for rid, until in self.cancelled.items() if until > now}

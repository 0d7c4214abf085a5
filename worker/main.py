"""The worker loop: take a request only when vLLM can start it, stream vLLM's answer back.

Flow control: the channel's prefetch equals ``max_concurrency`` and a message is acked only when
its request has ended, so the broker never hands this worker more than vLLM can run at once;
everything else waits in RabbitMQ, where priority order holds. While vLLM is unhealthy or reports
waiting requests, the worker stops consuming altogether.

Delivery: a worker that dies before acking gets its messages redelivered to another worker. The
gateway accepts the redelivery while no output reached the client, and refuses it (ending the
stream with an error) after, so an answer is never duplicated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any

import aio_pika
import httpx2
import msgspec
import openai
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue

from dispatcher.amqp import BrokerLink
from dispatcher.errors import error_body
from dispatcher.settings import WorkerSettings
from dispatcher.wire import (
    CONTROL_EXCHANGE,
    H_TRACEPARENT,
    Announce,
    Cancel,
    Discover,
    Frame,
    Kind,
    control_decoder,
    control_encoder,
    queue_arguments,
    queue_name,
    vllm_priority,
)
from worker.accounting import TokenClock, WorkerAccounting
from worker.job import Job, Usage, usage_of
from worker.replies import ReplySender
from worker.usage import UsageLedger
from worker.vllm import VLLMClient, sse_events

log = logging.getLogger("dispatcher.worker")

_json = msgspec.json.Decoder(dict[str, Any])
USAGE_ONLY = b'"choices":[]'
CANCEL_BURST = 0.05  # seconds a request dequeued right after a cancellation waits for its own


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        if not settings.model:
            raise ValueError("the worker needs a model name (--model or DISPATCHER_MODEL)")
        self.settings = settings
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.vllm = VLLMClient(settings.vllm_url, settings.vllm_api_key, concurrency=settings.max_concurrency)
        self.jobs: dict[str, Job] = {}
        self.cancelled: dict[str, float] = {}  # request id -> when to forget it
        self._last_cancel_at = 0.0  # when a running request was last cancelled
        self.vllm_healthy = False
        self.vllm_load: dict[str, float] | None = None
        self.accepting = True
        self.link = BrokerLink(
            settings.amqp_url, f"dispatcher-worker-{self.id}", self._setup, self._on_connection_lost
        )
        self._consuming_lock = asyncio.Lock()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queues: list[AbstractQueue] = []  # [normal, express]
        self._consumer_tags: list[str | None] = [None, None]
        self._control: aio_pika.abc.AbstractExchange | None = None
        self.replies: ReplySender | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ledger = (
            UsageLedger(
                settings.usage_stream_url,
                settings.usage_stream_name,
                max_age=settings.usage_max_age,
                max_bytes=settings.usage_max_bytes,
            )
            if settings.usage_stream_url
            else None
        )
        self.accounting = WorkerAccounting(settings.model, self.id, self.ledger)
        self.accounting.bind(self)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return max(0, self.settings.max_concurrency - len(self.jobs))

    @property
    def ready(self) -> bool:
        return self.link.ready and self.vllm_healthy and self.accepting

    async def start(self) -> None:
        """Start serving; the broker connection comes up in the background (with retries)."""
        self.vllm_healthy = await self.vllm.healthy()
        self.link.start()
        if self.ledger is not None:
            await self.ledger.start()
        self._tasks = [
            asyncio.create_task(self._watch_vllm()),
            asyncio.create_task(self._announce_periodically()),
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._watch_queue_depth()),
        ]
        log.info("worker %s serving model %s from %s", self.id, self.settings.model, self.settings.vllm_url)

    async def _setup(self, connection: AbstractConnection) -> None:
        """Build channels, queues and consumers on a fresh broker connection (at start and after a loss)."""
        channel = await connection.channel()
        self.link.watch(channel)
        # The channel as a whole never holds more than max_concurrency requests; each consumer gets
        # its own limit in _update_consuming (normal: max_concurrency - reserved_slots).
        await channel.set_qos(prefetch_count=self.settings.max_concurrency, global_=True)
        arguments = queue_arguments(self.settings.max_queue_length)
        model = self.settings.model
        queues = [
            await channel.declare_queue(queue_name(model, express=lane), durable=True, arguments=arguments)
            for lane in (False, True)
        ]
        control = await channel.declare_exchange(CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        control_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await control_queue.bind(control)
        await control_queue.consume(self._on_control, no_ack=True)
        reply_channel = await connection.channel(publisher_confirms=False)
        self.link.watch(reply_channel)
        if self.replies is None:
            self.replies = ReplySender(reply_channel, self.settings.flush_interval)
        else:
            self.replies.channel = reply_channel
        self._channel, self._queues, self._control, self._consumer_tags = channel, queues, control, [None, None]
        await self._update_consuming()
        await self._announce()

    async def drain(self, grace: float) -> None:
        """Stop taking requests and let running ones finish for up to ``grace`` seconds."""
        self.accepting = False
        await self._update_consuming()
        await self._announce()
        running = {job.task for job in self.jobs.values() if job.task is not None}
        if not running:
            return
        _, unfinished = await asyncio.wait(running, timeout=grace)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.replies is not None:
            await self.replies.flush()
        if self.ledger is not None:
            await self.ledger.close()
        await self.link.close()
        await self.vllm.close()

    def _on_connection_lost(self) -> None:
        # The broker requeued our unacked messages and the gateways failed these requests (their
        # reply addresses died with their connections): stop the vLLM work, without acking.
        self._queues, self._control = [], None
        self._consumer_tags = [None, None]
        for job in list(self.jobs.values()):
            job.message = None  # type: ignore[assignment]
            if job.task is not None:
                job.task.cancel()

    # -- taking messages -------------------------------------------------------------------

    def _should_consume(self) -> bool:
        if not (self.accepting and self.vllm_healthy):
            return False
        waiting = (self.vllm_load or {}).get("vllm:num_requests_waiting", 0.0)
        if waiting == 0 or not self.jobs:
            return True  # an idle worker may always try one request
        # vLLM counts what arrived since its last scheduler step as waiting: under load, requests we
        # handed it in the last second are normally there. More than those is a backlog: pause.
        recent = time.monotonic() - 1.0
        return waiting <= sum(1 for job in self.jobs.values() if job.received_at > recent)

    async def _update_consuming(self) -> None:
        # Serialised: two callers both seeing "no consumer" would start two.
        async with self._consuming_lock:
            channel, queues = self._channel, self._queues
            if channel is None or not queues:
                return
            wanted = self._should_consume()
            normal_limit = max(1, self.settings.max_concurrency - self.settings.reserved_slots)
            try:
                limits = (normal_limit, self.settings.max_concurrency)
                for lane, (queue, limit) in enumerate(zip(queues, limits, strict=True)):
                    tag = self._consumer_tags[lane]
                    if wanted and tag is None:
                        await channel.set_qos(prefetch_count=limit)  # for the consumer created next
                        self._consumer_tags[lane] = await queue.consume(self._on_message)
                    elif not wanted and tag is not None:
                        self._consumer_tags[lane] = None
                        await queue.cancel(tag)
            except Exception as exc:  # broker down: the next connection starts over
                log.warning("could not change consuming state: %s", type(exc).__name__)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        job = Job.from_message(message)
        if not self.accepting:
            await message.nack(requeue=True)
            return
        if time.monotonic() - self._last_cancel_at < CANCEL_BURST:
            # Clients often hang up together (a process exits): the slot this message got was freed by
            # one cancellation while the message's own cancellation may still be on its way.
            await asyncio.sleep(CANCEL_BURST)
        if self.cancelled.pop(job.request_id, None) is not None:
            log.info("skipping a request cancelled while queued", extra={"request_id": job.request_id})
            await message.ack()
            self.accounting.finish(job, outcome="cancelled", status=0, usage=None, stream=False)
            return
        if job.expired():
            self._send(job, Kind.ERROR, error_body(504, "The request timed out waiting in the queue."), 504)
            await message.ack()
            self.accounting.finish(job, outcome="error", status=504, usage=None, stream=False)
            return
        self.jobs[job.request_id] = job
        job.task = asyncio.create_task(self._serve(job))

    # -- serving ---------------------------------------------------------------------------

    def _send(self, job: Job, kind: Kind, data: bytes = b"", status: int = 0, usage: Usage | None = None) -> None:
        assert self.replies is not None
        frame = Frame(job.request_id, kind, data, status, self.id)
        if usage is not None:
            frame.prompt_tokens, frame.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        job.last_sent_at = time.monotonic()
        if status:
            job.status = status
        self.replies.send(job.reply_to, frame)

    def _request_body(self, job: Job) -> tuple[dict[str, Any], bool, bool]:
        """vLLM's request body, whether it streams, and whether the client asked for usage."""
        body = _json.decode(job.message.body)
        stream = bool(body.get("stream")) and job.endpoint != "embeddings"
        wants_usage = True
        if stream:
            options = body.get("stream_options") or {}
            wants_usage = bool(options.get("include_usage"))
            # Always ask for usage, to account for it; the chunk is dropped again if unasked.
            body["stream_options"] = {**options, "include_usage": True}
        if self.settings.vllm_priority:
            body["priority"] = vllm_priority(job.priority)
        return body, stream, wants_usage

    async def _serve(self, job: Job) -> None:
        self._send(job, Kind.ACCEPTED)
        usage: Usage | None = None
        outcome = "ok"
        stream = False
        clock: TokenClock | None = None
        started_at: float | None = None
        try:
            body, stream, wants_usage = self._request_body(job)
            clock = self.accounting.clock()
            started_at = time.monotonic()
            extra_headers = {"X-Request-Id": job.request_id}
            if job.traceparent:
                extra_headers[H_TRACEPARENT] = job.traceparent
            async with self.vllm.open(job.endpoint, body, extra_headers) as upstream:
                job.output_started = True
                self._send(job, Kind.HEAD, upstream.headers.get("content-type", "").encode(), upstream.status_code)
                if stream:
                    async for event in sse_events(upstream):
                        clock.event(event)
                        if b'"usage":{' in event:
                            usage = usage_of(event[event.find(b"{") :]) or usage
                            if not wants_usage and USAGE_ONLY in event:
                                continue
                        self._send(job, Kind.DATA, event)
                else:
                    data = await upstream.read()
                    usage = usage_of(data)
                    self._send(job, Kind.DATA, data)
            self._send(job, Kind.END, usage=usage)
        except openai.APIStatusError as exc:  # vLLM refused it: its status and body, unchanged
            outcome = "error"
            self._send(job, Kind.ERROR, exc.response.content, exc.status_code)
        except openai.APITimeoutError:
            outcome = "error"
            self._send(job, Kind.ERROR, error_body(504, "The inference server timed out."), 504)
        except (openai.APIConnectionError, httpx2.TransportError):  # refused, or dropped mid-answer
            outcome = "error"
            self._send(job, Kind.ERROR, error_body(502, "The inference server is unreachable."), 502)
        except msgspec.DecodeError:
            outcome = "error"
            self._send(job, Kind.ERROR, error_body(400, "The request body is not valid JSON."), 400)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if not self.accepting and job.message is not None and not job.output_started:
                await job.message.nack(requeue=True)  # shutting down: another worker takes it
                job.message = None  # type: ignore[assignment]
            elif not self.accepting:
                self._send(job, Kind.ERROR, error_body(503, "The worker shut down mid-request."), 503)
        except Exception:
            outcome = "error"
            log.exception("request failed", extra={"request_id": job.request_id})
            self._send(job, Kind.ERROR, error_body(500, "The worker failed to process the request."), 500)
        finally:
            self.jobs.pop(job.request_id, None)
            # No message left: the broker requeued the request, whoever serves it next records it.
            requeued = job.message is None
            if job.message is not None:
                try:
                    await job.message.ack()
                except Exception as exc:  # the channel died with the broker: it requeued the message
                    log.warning("could not ack: %s", type(exc).__name__)
            log.info(
                "request done",
                extra={
                    "request_id": job.request_id,
                    "model": self.settings.model,
                    "token": job.token_name,
                    "outcome": outcome,
                    "duration_s": round(time.monotonic() - job.received_at, 4),
                    "requeued": requeued,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None,
                },
            )
            if not requeued:
                self.accounting.finish(
                    job,
                    outcome=outcome,
                    status=job.status,
                    usage=usage,
                    stream=stream,
                    clock=clock,
                    started_at=started_at,
                )

    # -- background loops ------------------------------------------------------------------

    async def _watch_vllm(self, interval: float = 0.5) -> None:
        while True:
            healthy = await self.vllm.healthy()
            if healthy != self.vllm_healthy:
                log.warning("vLLM is %s", "healthy again" if healthy else "unhealthy: pausing the queue")
                self.vllm_healthy = healthy
                await self._announce()
            self.vllm_load = await self.vllm.load() if healthy else None
            await self._update_consuming()
            await asyncio.sleep(interval)

    async def _watch_queue_depth(self, interval: float = 2.0) -> None:
        """The model's ready messages (normal + express queue), for dispatcher_queue_depth (a redeclare
        with the same arguments returns the count; unlike a passive declare it cannot close the channel)."""
        gauge = self.accounting.metrics.queue_depth.labels(self.settings.model)
        while True:
            try:
                counts = [(await queue.declare(timeout=5)).message_count or 0 for queue in self._queues]
                if counts:
                    gauge.set(sum(counts))
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
        announce = Announce(self.id, self.settings.model, self.free_slots, self.settings.max_concurrency, self.ready)
        try:
            await self._control.publish(aio_pika.Message(control_encoder.encode(announce)), routing_key="")
        except Exception as exc:
            log.debug("could not announce: %s", exc)

    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for job in list(self.jobs.values()):
                if now - job.last_sent_at >= interval:
                    self._send(job, Kind.HEARTBEAT)
            horizon = now
            self.cancelled = {rid: until for rid, until in self.cancelled.items() if until > horizon}

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            control = control_decoder.decode(message.body)
        except msgspec.DecodeError:
            return
        if isinstance(control, Cancel):
            if control.worker and control.worker != self.id:
                return
            job = self.jobs.get(control.request_id)
            if job is not None and job.task is not None:
                self._last_cancel_at = time.monotonic()
                job.task.cancel()
            elif not control.worker:
                self.cancelled[control.request_id] = time.monotonic() + self.settings.queue_timeout + 60
        elif isinstance(control, Discover):
            await self._announce()

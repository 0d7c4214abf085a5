"""Serving one job: call vLLM, stream its answer back as frames, settle the message.

How a job ends decides what happens to its message:
- answered, refused by vLLM with a client error, or cancelled: acked (done);
- vLLM refused, reset or died before any output: handed back to the queue (REQUEUED frame, nack),
  and the worker pauses consuming at once rather than at the next health poll;
- its consuming connection was lost: the broker already requeued it;
- output had started: it can't be restarted, so the client gets an error event;
- a redelivered message waits for its gateway's go-ahead (``Proceed``) before vLLM is called: refused
  (``Cancel``: an earlier attempt's output reached the client, or the request ended), it is acked
  and recorded nowhere ("declined": the attempt did no work, the earlier one has the record).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import openai

from llmdispatch.errors import error_body
from llmdispatch.settings import WorkerSettings
from llmdispatch.wire import ASK_PROCEED, H_TRACEPARENT, Kind
from llmdispatch.worker import events
from llmdispatch.worker.accounting import TokenClock, WorkerAccounting
from llmdispatch.worker.backends import Backend
from llmdispatch.worker.events import Usage
from llmdispatch.worker.job import Job
from llmdispatch.worker.replies import ReplySender
from llmdispatch.worker.tenancy import salt_body, salt_key
from llmdispatch.worker.usage import prompt_tokens
from llmdispatch.worker.vllm import VLLMClient

log = logging.getLogger("dispatcher.worker")

_json = msgspec.json.Decoder(dict[str, Any])
# vLLM answers these while it starts or stops: the request did not run, another try may.
RETRYABLE_STATUS = {502, 503}
# A whole answer travels in DATA frames of at most this size: a 40 MB embeddings answer must not be
# one AMQP message (RabbitMQ 4.x refuses messages above 16 MiB by default).
WHOLE_CHUNK = 1 << 20


class RequeueRequest(Exception):
    """vLLM failed before producing any output: give the request back to the queue."""


class NoGoAhead(Exception):
    """A redelivered attempt's gateway did not answer it within the liveness timeout."""


class JobRunner:
    def __init__(
        self,
        settings: WorkerSettings,
        vllm: VLLMClient,
        backend: Backend,
        replies: ReplySender,
        accounting: WorkerAccounting,
        *,
        vllm_failed: Callable[[str], None],
        released: Callable[[Job], None],
    ) -> None:
        self.settings = settings
        self.vllm = vllm
        self.backend = backend
        self.salt_key = salt_key(settings)
        self.replies = replies
        self.accounting = accounting
        self.vllm_failed = vllm_failed  # pause consuming until vLLM is healthy again
        self.released = released  # the job's slot is free

    def send(self, job: Job, kind: Kind, data: bytes = b"", status: int = 0, usage: Usage | None = None) -> None:
        frame = job.attempt.frame(job.request_id, kind, data, status)
        if usage is not None:
            frame.prompt_tokens, frame.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        job.last_sent_at = time.monotonic()
        if status:
            job.status = status
        first_output = kind is Kind.DATA and not job.output_started
        if kind is Kind.DATA:
            job.output_started = True
        self.replies.send(job.reply_to, frame, urgent=first_output)

    def request_body(self, job: Job, raw: bytes) -> tuple[dict[str, Any], bool, bool]:
        """The server's request body, whether it streams, and whether the client asked for usage."""
        body = _json.decode(raw)
        stream = body.get("stream") is True and job.endpoint != "embeddings"
        wants_usage = self.backend.prepare(body, job.priority, stream=stream)
        salt_body(body, job.token_name, self.salt_key)
        return body, stream, wants_usage

    def start(self, job: Job) -> None:
        job.task = asyncio.get_running_loop().create_task(self.run(job))
        # A task cancelled before it ever ran skips run()'s finally: settle it here then.
        job.task.add_done_callback(lambda _: job.settled or asyncio.ensure_future(self.settle(job, "cancelled")))

    def stop(self, job: Job, reason: str) -> None:
        if job.settled:
            return  # its answer is complete and being recorded: nothing left to stop
        if job.task is not None and not job.task.done():
            job.stop_reason = job.stop_reason or reason
            job.task.cancel()

    async def run(self, job: Job) -> None:
        if job.redelivered:
            job.go_ahead = asyncio.get_running_loop().create_future()  # before ACCEPTED: its answer may be quick
        self.send(job, Kind.ACCEPTED, ASK_PROCEED if job.redelivered else b"")
        usage: Usage | None = None
        outcome = "ok"
        stream = False
        clock: TokenClock | None = None
        started_at: float | None = None
        chunks = 0
        answered = False
        try:
            assert job.message is not None
            if job.go_ahead is not None:
                await self._await_go_ahead(job, job.go_ahead)
            body, stream, wants_usage = self.request_body(job, job.message.body)
            job.body = body
            clock = self.accounting.clock(job.priority)
            started_at = job.called_at = time.monotonic()
            job.whole = not stream
            headers = {"X-Request-Id": job.request_id}
            if job.traceparent:
                headers[H_TRACEPARENT] = job.traceparent
            try:
                async with self.vllm.open(job.endpoint, body, headers) as upstream:
                    job.last_upstream_at = time.monotonic()
                    self.send(job, Kind.HEAD, upstream.headers.get("content-type", "").encode(), upstream.status_code)
                    if stream:
                        # One wake-up per network read: every whole event it completed, in order.
                        while (batch := await upstream.events()) is not None:
                            now = job.last_upstream_at = time.monotonic()  # partial events count too
                            for event in batch:
                                info = events.inspect(event)  # decide on parsed JSON; forward the bytes
                                clock.event(info, now)
                                if info.is_done:
                                    job.done_event = event  # sent once the usage record is durable (settle)
                                    continue
                                if info.usage is not None:
                                    usage = info.usage
                                    if info.usage_only and not wants_usage:
                                        continue
                                if info.tokens:
                                    chunks += 1
                                self.send(job, Kind.DATA, event)
                    else:
                        data = await upstream.read()
                        usage = events.body_usage(data)
                        for start in range(0, len(data), WHOLE_CHUNK):  # a small body: itself, no copy
                            self.send(job, Kind.DATA, data[start : start + WHOLE_CHUNK])
            except openai.APIStatusError as exc:
                if exc.status_code in RETRYABLE_STATUS and not job.output_started:
                    raise RequeueRequest(f"vLLM answered {exc.status_code}") from exc
                raise
            except openai.APIConnectionError as exc:  # refused, reset or broken off (see worker.netstream)
                if not isinstance(exc, openai.APITimeoutError) and not job.output_started:
                    raise RequeueRequest(type(exc).__name__) from exc
                raise
            answered = True  # END goes out once its usage record is durable (settle)
        except NoGoAhead:
            # As for a gateway gone quiet: the work is dropped. An error frame all the same, in case it
            # still listens (the client then gets an answer rather than its idle timeout).
            outcome = "error"
            message = "The gateway did not confirm the redelivered request in time; please retry."
            self.send(job, Kind.ERROR, error_body(503, message, code="gateway_unresponsive"), 503)
        except RequeueRequest as exc:
            outcome = "requeued"
            log.warning("vLLM failed before any output (%s): request back to the queue", exc)
            self.vllm_failed(str(exc))
            self.send(job, Kind.REQUEUED)
            await self._hand_back(job)
        except openai.APIStatusError as exc:  # vLLM refused it: its status and body, unchanged
            outcome = "error"
            self.send(job, Kind.ERROR, exc.response.content, exc.status_code)
        except openai.APITimeoutError:
            outcome = "error"
            self.send(job, Kind.ERROR, error_body(504, "The inference server timed out."), 504)
        except openai.APIConnectionError:  # dropped mid-answer
            outcome = "error"
            self.send(job, Kind.ERROR, error_body(502, "The inference server failed mid-answer."), 502)
        except msgspec.DecodeError:
            outcome = "error"
            self.send(job, Kind.ERROR, error_body(400, "The request body is not valid JSON."), 400)
        except asyncio.CancelledError:
            outcome = await self._stopped(job)
        except Exception:
            outcome = "error"
            log.exception("request failed", extra={"request_id": job.request_id})
            self.send(job, Kind.ERROR, error_body(500, "The worker failed to process the request."), 500)
        finally:
            estimated = usage is None and chunks > 0
            if estimated:
                usage = Usage(0, chunks)  # the server reported none (or the client left): counted chunks
            await self.settle(
                job,
                outcome,
                usage=usage,
                stream=stream,
                clock=clock,
                started_at=started_at,
                estimated=estimated,
                answered=answered,
            )

    async def _await_go_ahead(self, job: Job, go_ahead: asyncio.Future[None]) -> None:
        """Wait for the gateway's ``Proceed`` (its ``Cancel`` cancels the task), bounded like its liveness."""
        try:
            async with asyncio.timeout(self.settings.gateway_liveness_timeout):
                await go_ahead
        except TimeoutError:
            log.warning("no go-ahead for a redelivered request", extra={"request_id": job.request_id})
            raise NoGoAhead from None
        job.last_upstream_at = time.monotonic()  # the stall watchdog counts from the call, not the wait

    async def _stopped(self, job: Job) -> str:
        """The job's task was cancelled from outside; ``job.stop_reason`` says why."""
        reason = job.stop_reason
        if reason == "cancel" and job.go_ahead is not None and not job.called_at:
            return "declined"  # refused before the server was called: no work, no record
        if reason == "timeout":  # a whole answer past VLLM_REQUEST_TIMEOUT: this request's fault, not vLLM's
            limit = self.settings.vllm_request_timeout
            message = f"The inference server did not finish the answer within {limit:g} s."
            self.send(job, Kind.ERROR, error_body(504, message, code="inference_timeout"), 504)
            return "error"
        if reason == "stall":
            self.vllm_failed("no bytes from vLLM for too long")
            self.send(job, Kind.ERROR, error_body(504, "The inference server stalled."), 504)
            return "error"
        if reason in ("lost", "drain", "broken") and not job.output_started:
            if reason != "broken":
                self.send(job, Kind.REQUEUED)
            await self._hand_back(job)  # another worker (or this one, reconnected) serves it
            return "requeued"
        if reason == "lost":
            self.send(job, Kind.ERROR, error_body(502, "The worker lost the message broker mid-answer."), 502)
        elif reason == "drain":
            self.send(job, Kind.ERROR, error_body(503, "The worker shut down mid-request."), 503)
        return "cancelled"

    async def _hand_back(self, job: Job) -> None:
        message, job.message = job.message, None
        if message is not None:
            try:
                await message.nack(requeue=True)
            except Exception as exc:  # its channel is gone: the broker requeued it already
                log.debug("could not nack: %s", type(exc).__name__)

    async def settle(
        self,
        job: Job,
        outcome: str,
        *,
        usage: Usage | None = None,
        stream: bool = False,
        clock: TokenClock | None = None,
        started_at: float | None = None,
        estimated: bool = False,
        answered: bool = False,
    ) -> None:
        """Record the job, send its END, ack its message, free its slot: in that order.

        The usage record is confirmed by the ledger before END (the client's ``[DONE]``) and before
        the ack, so an answered request always has its record, whatever fails next; END is on its
        way before the ack: acked and not sent would be a request nobody answers and nobody retries.
        """
        if clock is not None:
            clock.flush()  # the answer's inter-token gaps into the histogram, however it ended
        if job.settled:
            return
        job.settled = True
        try:
            if estimated and not answered and usage is not None and not usage.prompt_tokens:
                # Cut short (the client left, an error after output): its prompt was prefilled too.
                usage.prompt_tokens = await prompt_tokens(self.backend, job.endpoint, job.body)
            if outcome not in ("requeued", "declined"):  # requeued: whoever serves it next records it
                await self.accounting.finish_durably(
                    job,
                    outcome=outcome,
                    status=job.status,
                    usage=usage,
                    stream=stream,
                    clock=clock,
                    started_at=started_at,
                    estimated=estimated,
                )
            if answered:
                if job.done_event:  # the client's [DONE] says the record is durable: only now
                    self.send(job, Kind.DATA, job.done_event)
                self.send(job, Kind.END, usage=usage)
            elif usage is not None and outcome != "requeued":
                self.send(job, Kind.BILLED, usage=usage)  # what the record bills: the gateway's TPM charges it
            await self.replies.sent(job.reply_to)
            message, job.message = job.message, None
            if message is not None:
                try:
                    await message.ack()
                except Exception as exc:  # the channel died with the broker: it requeued the message
                    log.warning("could not ack: %s", type(exc).__name__)
        finally:
            self.released(job)
        log.info(
            "request done",
            extra={
                "request_id": job.request_id,
                "model": self.settings.model,
                "token": job.token_name,
                "outcome": outcome,
                "duration_s": round(time.monotonic() - job.received_at, 4),
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
            },
        )

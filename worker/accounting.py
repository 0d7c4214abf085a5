"""What the worker records about each request: token timings, metrics, and the usage ledger record."""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING

from llmdispatch.metrics import worker_metrics
from llmdispatch.usage import UsageRecord

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from llmdispatch.worker.events import EventInfo, Usage
    from llmdispatch.worker.job import Job
    from llmdispatch.worker.main import Worker
    from llmdispatch.worker.usage import UsageLedger


class TokenClock:
    """Time to first token and inter-token latency of one streamed answer, event by event.

    The first event of any kind is the first token (vLLM sends its role chunk with it); gaps are
    measured between events that carry tokens (not the role chunk, the usage chunk or [DONE]).
    The gaps are kept here and go into the histogram in one go (``flush``: at the end of the answer,
    and every ``_FLUSH_EVERY`` gaps of a long one): ``Histogram.observe`` per token took two locked
    increments each, a noticeable part of the worker's CPU per token.
    """

    __slots__ = ("_gaps", "_itl", "first_at", "last_token_at")

    _FLUSH_EVERY = 256

    def __init__(self, itl: Histogram) -> None:
        self._itl = itl
        self._gaps: list[float] = []
        self.first_at: float | None = None
        self.last_token_at: float | None = None

    def event(self, info: EventInfo, now: float) -> None:
        """One event, as ``worker.events.inspect`` parsed it, received at ``now`` (monotonic): the
        events of one network read share the caller's one clock reading."""
        if self.first_at is None:
            self.first_at = now
        if not info.tokens:  # a role chunk, the usage chunk, [DONE]
            return
        if self.last_token_at is not None:
            self._gaps.append(now - self.last_token_at)
            if len(self._gaps) >= self._FLUSH_EVERY:
                self.flush()
        self.last_token_at = now

    def flush(self) -> None:
        """Put the gaps measured so far into the histogram."""
        gaps, self._gaps = self._gaps, []
        if gaps:
            observe_many(self._itl, gaps)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for each value, as one increment per bucket and one of the sum.

    Uses prometheus_client's bucket internals (stable for years); falls back to ``observe`` where
    they are not there."""
    bounds: list[float] | None = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bound >= value, as observe() picks it
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)
    total.inc(sum(values))


class WorkerAccounting:
    def __init__(self, model: str, worker_id: str, ledger: UsageLedger | None) -> None:
        self.model = model
        self.worker_id = worker_id
        self.ledger = ledger
        self.metrics = worker_metrics()
        self._itl: dict[int, Histogram] = {}
        self._worker: Worker | None = None

    def clock(self, priority: int) -> TokenClock:
        itl = self._itl.get(priority)
        if itl is None:
            itl = self._itl[priority] = self.metrics.inter_token_latency.labels(self.model, str(priority))
        return TokenClock(itl)

    async def finish_durably(
        self,
        job: Job,
        *,
        outcome: str,
        status: int,
        usage: Usage | None,
        stream: bool,
        clock: TokenClock | None = None,
        started_at: float | None = None,
        estimated: bool | None = None,
    ) -> UsageRecord:
        """Count a request that ended here (ok, error or cancelled) and commit its ledger record,
        returning once the stream confirmed it: call it before sending END and before acking.
        ``started_at`` is when vLLM was called (monotonic; None: it never was); ``estimated``: the
        counts were taken from the content chunks. Bounded by ``DISPATCHER_USAGE_COMMIT_TIMEOUT``; past
        it the record stays in the write-ahead log (sent when the stream is back) and the request goes on."""
        record = self._record(job, outcome, status, usage, stream, clock, started_at, estimated)
        if self.ledger is not None:
            await self.ledger.commit(record)
        return record

    def _record(
        self,
        job: Job,
        outcome: str,
        status: int,
        usage: Usage | None,
        stream: bool,
        clock: TokenClock | None,
        started_at: float | None,
        estimated: bool | None,
    ) -> UsageRecord:
        now = time.monotonic()
        # Publish time comes from the gateway's wall clock; the rest is measured on this one.
        queue_wait = (
            None if job.enqueued_at is None else max(0.0, time.time() - job.enqueued_at - (now - job.received_at))
        )
        offset = (queue_wait or 0.0) - job.received_at  # monotonic -> seconds since publish
        first_at = None if clock is None else clock.first_at
        metrics = self.metrics
        metrics.requests.labels(self.model, job.token_name, outcome).inc()
        if usage is not None:
            metrics.prompt_tokens.labels(self.model, job.token_name).inc(usage.prompt_tokens)
            metrics.completion_tokens.labels(self.model, job.token_name).inc(usage.completion_tokens)
        if first_at is not None and started_at is not None:
            metrics.time_to_first_token.labels(self.model, str(job.priority)).observe(first_at - started_at)
        if estimated is None:
            estimated = bool(getattr(usage, "estimated", False))
        return UsageRecord(
            request_id=job.request_id,
            token=job.token_name,
            model=self.model,
            priority=job.priority,
            endpoint=job.endpoint,
            stream=stream,
            outcome=outcome,
            status=status,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            usage_reported=usage is not None,
            estimated=estimated and usage is not None,
            queue_wait=None if queue_wait is None else round(queue_wait, 6),
            ttft=None if first_at is None else round(first_at + offset, 6),
            duration=round(now + offset, 6),
            worker=self.worker_id,
            time=time.time(),
        )

    def bind(self, worker: Worker) -> None:
        """The worker whose state ``refresh`` copies into the gauges."""
        self._worker = worker
        self.refresh()

    def refresh(self) -> None:
        """Set the state gauges from the worker: before every scrape, and by the worker every probe
        (0.5 s). Not ``Gauge.set_function``: prometheus_client's multiprocess mode (``--processes N``)
        ignores it, and every process's gauge then read 0."""
        worker = self._worker
        if worker is None:
            return
        metrics, model, load = self.metrics, self.model, worker.vllm_load
        metrics.in_flight.labels(model).set(len(worker.jobs))
        metrics.free_slots.labels(model).set(worker.free_slots)
        metrics.vllm_running.labels(model).set(getattr(load, "running", None) or 0.0)
        metrics.vllm_waiting.labels(model).set(getattr(load, "waiting", None) or 0.0)
        metrics.vllm_kv_cache.labels(model).set(getattr(load, "kv_usage", None) or 0.0)

"""Continuous-batching scheduler of the vLLM simulator.

One asyncio task drives every sequence: each step it admits waiting sequences up to ``max_num_seqs``,
sleeps for the simulated step time and gives every running sequence one token. Consumers are woken
through one future per sequence, so the token rate is set by simulated time, not by CPU, and no
per-token timers or tasks exist.

Scheduling follows vLLM's V1 scheduler (vllm/v1/core/sched/scheduler.py, request_queue.py):
- ``policy="fcfs"``: the waiting queue is arrival order; ``"priority"``: ordered by the request's
  ``priority`` (lower first), ties by arrival.
- A waiting request never displaces a running one: when ``max_num_seqs`` run, it waits for one to end
  (vLLM's waiting loop breaks on ``len(running) == max_num_running_reqs``; issue vllm#40004).
- Preemption happens only under KV-cache pressure (``kv_cache_tokens``; off by default = unlimited):
  when the running sequences' next tokens do not fit, the victim is the last admitted (fcfs) or the
  one with the largest (priority, arrival) (priority). It goes back to the waiting queue (fcfs: at its
  head) keeping the tokens it already streamed, and is prefilled again when re-admitted. No request
  is admitted in a step that preempted.
Differences from vLLM: KV usage is counted in tokens (prompt + generated), not 16-token blocks; no
prefix caching, chunked-prefill budget or swap; a preempted request's re-prefill costs one prefill
like a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from typing import Any

logger = logging.getLogger(__name__)

WAITING = 0
RUNNING = 1
FINISHED = 2
ABORTED = 3

POLICIES = ("fcfs", "priority")


class Sequence:
    """One request inside the engine; ``generated`` counts the tokens produced so far."""

    __slots__ = (
        "_waiter",
        "arrival",
        "generated",
        "max_tokens",
        "preemptions",
        "priority",
        "prompt_tokens",
        "request_id",
        "state",
        "stream",
        "traceparent",
        "user",
    )

    def __init__(
        self,
        request_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int,
        priority: int = 0,
        user: str | None = None,
        stream: bool = True,
        traceparent: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.traceparent = traceparent  # W3C trace context as received, for tests of its propagation
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.priority = priority
        self.user = user
        # Non-streaming consumers only need the end: waking them per token would cost CPU for nothing.
        self.stream = stream
        self.generated = 0
        self.preemptions = 0  # times the engine took it off the batch for KV space (vLLM: recomputed later)
        self.state = WAITING
        self.arrival = -1
        self._waiter: asyncio.Future[None] | None = None

    @property
    def done(self) -> bool:
        return self.state >= FINISHED

    async def wait(self, seen: int) -> None:
        """Return once more than ``seen`` tokens exist (streaming) or the sequence has ended."""
        if self.state >= FINISHED or (self.stream and self.generated > seen):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None

    async def finished(self) -> None:
        """Return when the sequence has finished or been aborted."""
        while self.state < FINISHED:
            await self.wait(self.generated)

    def _wake(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)


class Engine:
    """The simulated vLLM engine: a priority waiting queue and a running batch of bounded size."""

    def __init__(
        self,
        max_num_seqs: int = 16,
        *,
        decode_ms: float = 10.0,
        decode_ms_per_seq: float = 0.25,
        prefill_ms: float = 5.0,
        log_size: int = 10_000,
        policy: str = "priority",
        kv_cache_tokens: int | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if kv_cache_tokens is not None and kv_cache_tokens < 1:
            raise ValueError("kv_cache_tokens must be >= 1 (or None: unlimited)")
        self.max_num_seqs = max_num_seqs
        self.policy = policy
        self.kv_cache_tokens = kv_cache_tokens
        self.decode_ms = decode_ms
        self.decode_ms_per_seq = decode_ms_per_seq
        self.prefill_ms = prefill_ms
        # One heap for both policies: (priority or 0, order, seq). fcfs puts preempted sequences in front
        # with negative orders, as vLLM's FCFS queue prepends them.
        self._waiting: list[tuple[int, int, Sequence]] = []
        self._num_waiting = 0
        self._front = itertools.count(-1, -1)
        # Keyed by arrival number; dicts keep insertion order, so the batch order is admission order.
        self._running: dict[int, Sequence] = {}
        self._arrivals = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self.log: deque[dict[str, Any]] = deque(maxlen=log_size)
        # Resettable counters for /sim/stats.
        self.started = 0
        self.finished = 0
        self.aborted = 0
        self.preempted = 0
        self.generated_tokens = 0
        self.tokenized = 0  # POST /tokenize requests
        # Monotonic counters for /metrics (Prometheus counters never go back).
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_total = 0
        self.preemptions_total = 0
        self.steps = 0  # engine steps so far (never reset): per-step figures do not depend on CPU speed
        self.admitting_steps = 0  # of those, steps that admitted a sequence (and paid prefill_ms)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def kv_cache_usage(self) -> float:
        """Share of the KV cache in use (vLLM's kv_cache_usage_perc); running / max_num_seqs if unlimited."""
        if self.kv_cache_tokens is None:
            return len(self._running) / self.max_num_seqs
        return min(1.0, sum(s.prompt_tokens + s.generated for s in self._running.values()) / self.kv_cache_tokens)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; it is started by the engine loop in (priority, arrival) order."""
        self._ensure_loop()
        self.enqueue(seq)
        assert self._wakeup is not None
        self._wakeup.set()

    def _enqueue(self, seq: Sequence, order: int) -> None:
        seq.state = WAITING
        heapq.heappush(self._waiting, (seq.priority if self.policy == "priority" else 0, order, seq))
        self._num_waiting += 1

    def abort(self, seq: Sequence) -> None:
        """Remove ``seq`` at once (no more tokens); a running one frees its slot for the next step."""
        if seq.state == WAITING:
            # The heap entry is skipped lazily at admission; the count is exact now.
            self._num_waiting -= 1
        elif seq.state == RUNNING:
            del self._running[seq.arrival]
        else:
            return
        seq.state = ABORTED
        self.aborted += 1
        self.record("aborted", seq)
        seq._wake()

    def reset_stats(self) -> None:
        self.started = self.finished = self.aborted = self.preempted = self.generated_tokens = self.tokenized = 0
        self.log.clear()

    def stats(self, *, log: bool = True) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": self.finished,
            "aborted": self.aborted,
            "preempted": self.preempted,
            "policy": self.policy,
            "running": self.num_running,
            "waiting": self.num_waiting,
            "generated_tokens": self.generated_tokens,
            "tokenized": self.tokenized,
            "steps": self.steps,
            "admitting_steps": self.admitting_steps,
            **({"log": list(self.log)} if log else {}),
        }

    async def aclose(self) -> None:
        """Stop the loop and abort whatever is still queued or running."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for seq in list(self._running.values()):
            self.abort(seq)
        for _, _, seq in self._waiting:
            self.abort(seq)
        self._waiting.clear()

    def record(self, event: str, seq: Sequence) -> None:
        self.log.append(
            {
                "event": event,
                "request_id": seq.request_id,
                "user": seq.user,
                "priority": seq.priority,
                "traceparent": seq.traceparent,
                "t": time.monotonic(),
            }
        )

    def _ensure_loop(self) -> None:
        # Started lazily so the engine works with or without ASGI lifespan, on whichever loop serves it.
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._run(), name="simulator-engine")

    def _kv_needed(self, seq: Sequence) -> int:
        # Tokens whose KV the next step holds for seq: its prompt, its output so far and the new token.
        return seq.prompt_tokens + seq.generated + 1

    def _preempt(self) -> bool:
        """Free KV for the running sequences' next tokens, as vLLM's running loop does; True if any went."""
        if self.kv_cache_tokens is None:
            return False
        used = sum(self._kv_needed(s) for s in self._running.values())
        preempted = False
        while used > self.kv_cache_tokens and self._running:
            if self.policy == "priority":
                victim = max(self._running.values(), key=lambda s: (s.priority, s.arrival))
            else:
                victim = next(reversed(self._running.values()))  # the last admitted
            del self._running[victim.arrival]
            used -= self._kv_needed(victim)
            victim.preemptions += 1
            self._enqueue(victim, victim.arrival if self.policy == "priority" else next(self._front))
            self.preempted += 1
            self.preemptions_total += 1
            self.record("preempted", victim)
            preempted = True
        return preempted

    def _admit(self) -> int:
        new = 0
        if self._preempt():
            return 0  # vLLM schedules no waiting request in a step that preempted
        budget = self.kv_cache_tokens
        used = sum(self._kv_needed(s) for s in self._running.values()) if budget is not None else 0
        while self._waiting and len(self._running) < self.max_num_seqs:
            _, _, seq = self._waiting[0]
            if seq.state != WAITING:
                heapq.heappop(self._waiting)
                continue  # aborted while waiting
            if budget is not None:
                if used + self._kv_needed(seq) > budget:
                    break  # the head does not fit: vLLM stops admitting, it does not skip ahead
                used += self._kv_needed(seq)
            heapq.heappop(self._waiting)
            self._num_waiting -= 1
            seq.state = RUNNING
            self._running[seq.arrival] = seq
            new += 1
            if seq.preemptions:
                self.record("resumed", seq)  # its streamed tokens stay; only its KV is computed again
                continue
            self.started += 1
            self.prompt_tokens_total += seq.prompt_tokens
            self.record("started", seq)
        return new

    def plan_step(self) -> float:
        """Admit what the rules allow; the next step's duration in seconds (0.0: nothing to run).

        With ``finish_step`` this is the whole engine without a clock: the asyncio loop below sleeps in
        between, a discrete-event model (loadtest/priority_model.py) advances virtual time instead.
        """
        new = self._admit()
        n = len(self._running)
        if not n:
            return 0.0
        self.admitting_steps += bool(new)
        # Prefill of newly admitted sequences is folded into this step (like chunked prefill).
        return (self.decode_ms + self.decode_ms_per_seq * n + (self.prefill_ms if new else 0.0)) / 1000

    def finish_step(self) -> list[Sequence]:
        """Give every running sequence its token; returns that batch (finished ones are FINISHED now)."""
        batch = list(self._running.values())
        done: list[Sequence] = []
        for seq in batch:
            seq.generated += 1
            if seq.generated >= seq.max_tokens:
                done.append(seq)
            elif seq.stream:
                seq._wake()
        n = len(batch)
        self.steps += 1
        self.generated_tokens += n
        self.generation_tokens_total += n
        for seq in done:
            del self._running[seq.arrival]
            seq.state = FINISHED
            self.finished += 1
            self.success_total += 1
            self.record("finished", seq)
            seq._wake()
        return batch

    def enqueue(self, seq: Sequence) -> None:
        """Queue ``seq`` without starting the asyncio loop (for a caller that drives the steps itself)."""
        seq.arrival = next(self._arrivals)
        self._enqueue(seq, seq.arrival)
        self.record("queued", seq)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup
        assert wakeup is not None
        target = loop.time()
        while True:
            if not self._running and not self._num_waiting:
                wakeup.clear()
                await wakeup.wait()
                target = loop.time()
            step = self.plan_step()
            if not step:
                continue
            target += step
            now = loop.time()
            if target < now - step:
                # CPU-starved by more than a step: restart the clock instead of bursting catch-up steps.
                target = now
            await asyncio.sleep(max(0.0, target - now))
            try:
                self.finish_step()
            except Exception:  # pragma: no cover - a bug here must not kill every stream silently
                logger.exception("simulator engine step failed")

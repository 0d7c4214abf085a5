"""The priority load test in virtual time: the simulator's own engine, RabbitMQ lanes and a worker, no CPU.

``python -m llmdispatch.loadtest.priority_model [--candidate NAME ...]`` runs the scenario of loadtest/priority_load.py
(48 closed-loop low users, one high request every 0.4 s on average, 16 sequences, 25 ms decode steps)
as a discrete-event model, so the figures depend on the scheduling rules only, not on how busy the
machine's CPU is. The engine is ``simulator.engine.Engine`` itself, stepped by ``plan_step`` /
``finish_step``; around it:

- RabbitMQ: a normal and an express queue, each ordered by priority (higher first), FIFO within one;
- the worker: at most ``worker_slots`` requests at once; the normal lane at most ``worker_slots -
  reserved``; when a slot frees and both queues hold requests, either may get it (coin flip), as with
  the worker's two consumers under one channel-wide limit;
- fixed latencies: client to queue, queue to vLLM (dequeue, worker, HTTP), vLLM to client, and the time
  from a request's end to the next delivery (ack + delivery) - calibrated so that the unloaded TTFT of
  the model matches the measured stack's order of magnitude (about 50 ms); each hop draws its
  latency uniformly within +-50% of these (``--jitter``), as real hops vary.

Not modelled: the worker's pause when vLLM reports waiting requests (workers that overcommit, the
``c`` candidates, would need it relaxed anyway), CPU contention, network jitter.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmdispatch.loadtest.priority_load import CANDIDATES, DISTRIBUTIONS, Candidate, lengths, percentile
from llmdispatch.simulator.engine import Engine, Sequence


@dataclass(frozen=True)
class Latency:
    to_queue: float = 0.005  # client -> gateway -> published
    to_vllm: float = 0.010  # broker delivery -> worker -> vLLM's HTTP server
    to_client: float = 0.005  # vLLM's token -> worker -> gateway -> client
    next_delivery: float = 0.004  # a request ends -> the worker acks -> the broker delivers the next


@dataclass
class Request:
    high: bool
    max_tokens: int
    sent_at: float
    express: bool = False
    first_token_at: float | None = None


class Clock:
    """Virtual time: a heap of (time, order, action); ``run`` executes actions in time order."""

    def start_clock(self, seed: int, jitter: float) -> None:
        self.rng = random.Random(seed)
        self.jitter = jitter
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def hop(self, latency: float) -> float:
        """One hop's latency, drawn uniformly within +-jitter of ``latency``."""
        return latency * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def at(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (self.now + delay, next(self._order), action))

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            self.now, _, action = heapq.heappop(self._events)
            action()
        self.now = until


@dataclass
class Model(Clock):
    cand: Candidate
    distribution: str
    args: argparse.Namespace
    latency: Latency = field(default_factory=Latency)

    def __post_init__(self) -> None:
        a = self.args
        self.start_clock(a.seed, a.jitter)
        self.engine = Engine(
            self.cand.server_seqs,
            decode_ms=a.decode_ms,
            decode_ms_per_seq=a.decode_ms_per_seq,
            prefill_ms=a.prefill_ms,
            policy=self.cand.policy,
            log_size=1,
        )
        self.queues: tuple[list[tuple[int, int, Request]], list[tuple[int, int, Request]]] = ([], [])
        self.in_worker = [0, 0]  # requests held by the worker, per lane
        self.engine_busy = False
        self.requests: dict[int, Request] = {}  # id(seq) -> request
        self.low_tokens: list[float] = []  # times low tokens reach their client
        self.high_done: list[Request] = []

    # -- clients -----------------------------------------------------------------------------

    def send(self, high: bool) -> None:
        request = Request(high, lengths(self.distribution, self.args.max_tokens, self.rng), self.now)
        request.express = high and self.cand.reserved > 0
        self.at(self.hop(self.latency.to_queue), lambda: self.publish(request))

    def low_user(self) -> None:
        self.send(high=False)

    def high_arrivals(self, end: float) -> None:
        def arrive() -> None:
            self.send(high=True)
            gap = self.rng.expovariate(1 / self.args.high_interval)
            if self.now + gap < end:
                self.at(gap, arrive)

        self.at(self.rng.expovariate(1 / self.args.high_interval), arrive)

    # -- broker and worker ---------------------------------------------------------------------

    def publish(self, request: Request) -> None:
        priority = self.args.high_priority if request.high else self.args.low_priority
        heapq.heappush(self.queues[request.express], (-priority, next(self._order), request))
        self.deliver()

    def lane_limit(self, lane: int) -> int:
        return self.cand.worker_slots if lane else max(1, self.cand.worker_slots - self.cand.reserved)

    def deliver(self) -> None:
        while sum(self.in_worker) < self.cand.worker_slots:
            ready = [lane for lane in (0, 1) if self.queues[lane] and self.in_worker[lane] < self.lane_limit(lane)]
            if not ready:
                return
            lane = ready[0] if len(ready) == 1 else self.rng.choice(ready)
            _, _, request = heapq.heappop(self.queues[lane])
            self.in_worker[lane] += 1
            self.at(self.hop(self.latency.to_vllm), lambda r=request: self.to_engine(r))

    def to_engine(self, request: Request) -> None:
        vllm_priority = 0
        if self.cand.vllm_priority:
            vllm_priority = 10 - (self.args.high_priority if request.high else self.args.low_priority)
        seq = Sequence(str(next(self._order)), prompt_tokens=5, max_tokens=request.max_tokens, priority=vllm_priority)
        self.requests[id(seq)] = request
        self.engine.enqueue(seq)
        if not self.engine_busy:
            self.step()

    # -- engine ------------------------------------------------------------------------------

    def step(self) -> None:
        duration = self.engine.plan_step()
        self.engine_busy = duration > 0
        if self.engine_busy:
            self.at(duration, self.step_done)

    def step_done(self) -> None:
        for seq in self.engine.finish_step():
            request = self.requests[id(seq)]
            if seq.generated == 1:
                request.first_token_at = self.now + self.hop(self.latency.to_client)
            if not request.high:
                self.low_tokens.append(self.now + self.latency.to_client)  # a constant shift: rates unchanged
            if seq.done:
                del self.requests[id(seq)]
                self.at(self.hop(self.latency.next_delivery), lambda r=request: self.slot_freed(r))
                if request.high:
                    self.high_done.append(request)
                else:
                    self.at(self.hop(self.latency.to_client), self.low_user)  # the closed loop: the next question
        self.step()

    def slot_freed(self, request: Request) -> None:
        self.in_worker[request.express] -= 1
        self.deliver()


def unloaded_ttft(cand: Candidate, args: argparse.Namespace) -> float:
    model = Model(cand, "identical", args)
    ttfts = []
    for _ in range(3):
        model.send(high=True)
        model.run(model.now + 5.0)
        request = model.high_done[-1]
        assert request.first_token_at is not None
        ttfts.append(request.first_token_at - request.sent_at)
    return ttfts[-1]


def run(cand: Candidate, distribution: str, args: argparse.Namespace) -> dict[str, object]:
    """Low users throughout; low tokens/s without high traffic, then with it; high TTFTs."""
    model = Model(cand, distribution, args)
    for i in range(args.low_users):
        model.at(i * 0.001, model.low_user)
    quiet_from, busy_from = args.warmup, args.warmup + args.duration
    busy_to = busy_from + args.duration
    model.run(busy_from)
    model.high_arrivals(busy_to)
    model.run(busy_to + 30.0)
    tokens = deque(sorted(model.low_tokens))

    def rate(start: float, stop: float) -> float:
        return sum(1 for t in tokens if start <= t < stop) / (stop - start)

    ttfts = [r.first_token_at - r.sent_at for r in model.high_done if r.first_token_at is not None]
    without, with_high = rate(quiet_from, busy_from), rate(busy_from, busy_to)
    return {
        "distribution": distribution,
        "high_requests": len(ttfts),
        "high_ttft_p50": round(percentile(ttfts, 0.5), 4),
        "high_ttft_p99": round(percentile(ttfts, 0.99), 4),
        "low_tokens_per_s_without_high": round(without, 1),
        "low_tokens_per_s_with_high": round(with_high, 1),
        "low_with_over_without": round(with_high / without, 3),
    }


def report(name: str, args: argparse.Namespace) -> dict[str, object]:
    cand = CANDIDATES[name]
    reference = unloaded_ttft(cand, args)
    runs = []
    for distribution in args.distributions:
        result = run(cand, distribution, args)
        for q in ("p50", "p99"):
            result[f"high_{q}_over_unloaded"] = round(float(result[f"high_ttft_{q}"]) / reference, 2)  # type: ignore[arg-type]
        runs.append(result)
    return {"candidate": name, "note": cand.note, "unloaded_ttft": round(reference, 4), "runs": runs}


def table(reports: list[dict[str, object]], baseline: dict[str, float]) -> list[str]:
    """Markdown rows; ``baseline``: low tokens/s of candidate ``a`` without high traffic, per distribution."""
    rows = [
        "| candidate | lengths | unloaded TTFT | high p50 (x unloaded) | high p99 (x unloaded) "
        "| low tok/s without / with high (ratio) | low tok/s with high vs a without |",
        "|---|---|---|---|---|---|---|",
    ]
    for rep in reports:
        for r in rep["runs"]:  # type: ignore[attr-defined]
            base = baseline.get(r["distribution"])
            vs_a = f"{r['low_tokens_per_s_with_high'] / base:.3f}" if base else "-"
            rows.append(
                f"| {rep['candidate']} | {r['distribution']} | {rep['unloaded_ttft']} | "
                f"{r['high_ttft_p50']} ({r['high_p50_over_unloaded']}x) | {r['high_ttft_p99']} "
                f"({r['high_p99_over_unloaded']}x) | {r['low_tokens_per_s_without_high']} / "
                f"{r['low_tokens_per_s_with_high']} ({r['low_with_over_without']}) | {vs_a} |"
            )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", nargs="+", choices=sorted(CANDIDATES), default=["a"])
    parser.add_argument("--decode-ms", type=float, default=25.0)
    parser.add_argument("--decode-ms-per-seq", type=float, default=0.25)
    parser.add_argument("--prefill-ms", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--low-users", type=int, default=48)
    parser.add_argument("--high-interval", type=float, default=0.4)
    parser.add_argument("--high-priority", type=int, default=9)
    parser.add_argument("--low-priority", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=600.0, help="virtual seconds per window")
    parser.add_argument("--distributions", nargs="+", choices=DISTRIBUTIONS, default=list(DISTRIBUTIONS))
    parser.add_argument("--jitter", type=float, default=0.5, help="each hop's latency varies by +-this fraction")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    results = [report(name, arguments) for name in arguments.candidate]
    if arguments.json:
        print(json.dumps(results, indent=2))
    else:
        base_rep = report("a", arguments) if "a" not in arguments.candidate else results[arguments.candidate.index("a")]
        base = {str(r["distribution"]): float(r["low_tokens_per_s_without_high"]) for r in base_rep["runs"]}  # type: ignore[attr-defined]
        print("\n".join(table(results, base)))

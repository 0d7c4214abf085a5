"""Priority under load: two token classes at 3x the capacity of a simulated vLLM; TTFT per class.

``python -m loadtest.priority_load`` (from the repository root; it starts its own simulator, worker
and gateway with tests/stack.py, against the local RabbitMQ and Redis).

1. unloaded: one streamed request at a time, TTFT p50 (the reference);
2. capacity: a closed loop of 2 x max-num-seqs clients, completed requests per second;
3. load: open-loop Poisson arrivals at ``--load`` x capacity, ``--high-share`` of them with the
   high-priority token, the rest with the low one, for ``--duration`` seconds. TTFT p50/p99 per
   class over requests sent during that window; low requests still waiting at the end are counted
   (they waited at least that long) and then cancelled.

The per-token queued cap is switched off here so that the low class absorbs the wait instead of
being refused; the worker passes priorities to the simulator's vLLM ``priority`` field.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from loadtest.load import raise_fd_limit
from loadtest.sse_client import StreamingClient, StreamResult


@dataclass
class Sample:
    sent_at: float
    ttft: float | None = None
    status: int = 0


@dataclass
class Klass:
    name: str
    token: str
    samples: list[Sample] = field(default_factory=list)


def body(model: str, max_tokens: int) -> dict[str, object]:
    return {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Say something about queues."}]}  # fmt: skip


async def streamed(url: str, token: str, payload: dict[str, object], sample: Sample) -> None:
    """One streamed request on its own connection; TTFT is the first event that carries generated text.

    The cheap client of the benchmark (loadtest/sse_client.py): with thousands of streams open, httpx's
    own CPU would delay the very events whose timing we measure.
    """
    client = StreamingClient(url, token)
    result = StreamResult(time.perf_counter())
    try:
        await client.post(msgspec.json.encode(payload), _ignore_token, result)
    finally:
        client.close()
        sample.status = result.status
        if result.first_token_at is not None:
            sample.ttft = result.first_token_at - result.sent_at


def _ignore_token(at: float, gap: float) -> None:
    pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def unloaded(url: str, token: str, payload: dict[str, object], n: int) -> float:
    ttfts = []
    for _ in range(n):
        sample = Sample(time.monotonic())
        await streamed(url, token, payload, sample)
        assert sample.ttft is not None, sample.status
        ttfts.append(sample.ttft)
    return statistics.median(ttfts[2:])  # the first ones warm connections and caches


async def capacity(url: str, token: str, payload: dict[str, object], users: int) -> float:
    done = 0
    stop = time.monotonic() + 6.0
    measure_from = time.monotonic() + 1.0

    async def user() -> None:
        nonlocal done
        while time.monotonic() < stop:
            sample = Sample(time.monotonic())
            await streamed(url, token, payload, sample)
            if time.monotonic() >= measure_from:
                done += 1

    await asyncio.gather(*(user() for _ in range(users)))
    return done / (stop - measure_from)


def vary_length(payload: dict[str, object], spread: float) -> dict[str, object]:
    """Answers of varied length, as real ones are: uniform within +-spread of max_tokens (same mean).

    With identical lengths, requests that start together end together, so slots free up in waves
    and a high-priority request waits for the next wave: a lock-step no real workload has.
    """
    mean = int(payload["max_tokens"])  # type: ignore[call-overload]
    low, high = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return {**payload, "max_tokens": random.randint(low, high)}


async def offered_load(
    url: str,
    payload: dict[str, object],
    classes: list[tuple[Klass, float]],
    duration: float,
    spread: float,
) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def arrivals(klass: Klass, rate: float) -> None:
        if rate <= 0:
            return
        end = time.monotonic() + duration
        next_at = time.monotonic()
        while True:
            next_at += random.expovariate(rate)
            if next_at >= end:
                return
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            sample = Sample(time.monotonic())
            klass.samples.append(sample)
            task = asyncio.create_task(streamed(url, klass.token, vary_length(payload, spread), sample))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    await asyncio.gather(*(arrivals(klass, rate) for klass, rate in classes))
    # Let the high class finish; whatever still waits after a grace period is counted and cancelled.
    await asyncio.sleep(3.0)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def summary(klass: Klass, end: float) -> dict[str, object]:
    served = [s.ttft for s in klass.samples if s.ttft is not None]
    unserved = [end - s.sent_at for s in klass.samples if s.ttft is None]
    result: dict[str, object] = {"sent": len(klass.samples), "served": len(served), "unserved": len(unserved)}
    if served:
        result.update(ttft_p50=round(percentile(served, 0.5), 4), ttft_p99=round(percentile(served, 0.99), 4))
    if unserved:
        result["unserved_min_wait_s"] = round(min(unserved), 2)
    return result


async def main(args: argparse.Namespace) -> None:
    from tests.stack import Stack

    raise_fd_limit(20_000)  # every waiting request holds a connection
    with tempfile.TemporaryDirectory() as tmp:
        env = {"DISPATCHER_MAX_QUEUED_PER_TOKEN": "0", "DISPATCHER_LOG_LEVEL": "warning"}
        if args.reserved_slots:
            env.update(DISPATCHER_EXPRESS_PRIORITY=str(args.high_priority),
                       DISPATCHER_RESERVED_SLOTS=str(args.reserved_slots))  # fmt: skip
        stack = Stack(Path(tmp), env=env)
        try:
            stack.start_simulator(max_num_seqs=args.max_num_seqs, decode_ms=args.decode_ms)
            stack.start_worker(args.max_num_seqs, "--vllm-priority")
            stack.start_gateway()
            high = Klass("high", stack.add_token("load-high", priority=args.high_priority))
            low = Klass("low", stack.add_token("load-low", priority=args.low_priority))
            url = stack.gateway_url + "/v1/chat/completions"
            payload = body(stack.model, args.max_tokens)
            reference = await unloaded(url, high.token, payload, args.unloaded_requests)
            served_per_s = await capacity(url, high.token, payload, 2 * args.max_num_seqs)
            offered = args.load * served_per_s
            rates = [(high, offered * args.high_share), (low, offered * (1 - args.high_share))]
            started = time.monotonic()
            await offered_load(url, payload, rates, args.duration, args.length_spread)
            end = time.monotonic()
        finally:
            stack.close()
    report = {
        "setup": {
            "max_num_seqs": args.max_num_seqs,
            "decode_ms": args.decode_ms,
            "max_tokens": args.max_tokens,
            "capacity_req_per_s": round(served_per_s, 1),
            "offered_req_per_s": round(offered, 1),
            "high_req_per_s": round(rates[0][1], 1),
            "low_req_per_s": round(rates[1][1], 1),
            "duration_s": round(end - started, 1),
        },
        "unloaded_ttft_p50": round(reference, 4),
        "high": summary(high, end),
        "low": summary(low, end),
    }
    high_p50 = report["high"].get("ttft_p50")  # type: ignore[attr-defined]
    if high_p50 is not None:
        report["high_p50_over_unloaded"] = round(high_p50 / reference, 2)
    print(json.dumps(report, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the simulator's batch size (capacity)")
    parser.add_argument("--decode-ms", type=float, default=25.0, help="the simulator's decode step")
    parser.add_argument("--max-tokens", type=int, default=12, help="mean answer length under load")
    parser.add_argument("--length-spread", type=float, default=0.9,
                        help="answer lengths vary uniformly within +-this fraction of --max-tokens")  # fmt: skip
    parser.add_argument("--load", type=float, default=3.0, help="offered load, in multiples of the capacity")
    parser.add_argument("--high-share", type=float, default=0.1, help="share of the offered load that is high")
    parser.add_argument("--high-priority", type=int, default=9)
    parser.add_argument("--reserved-slots", type=int, default=12,
                        help="worker slots only the high class may use (express threshold = its priority)")  # fmt: skip
    parser.add_argument("--low-priority", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of offered load")
    parser.add_argument("--unloaded-requests", type=int, default=22)
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))

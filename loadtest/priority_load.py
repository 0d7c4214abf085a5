"""Priority under overload: high-priority TTFT and low-priority throughput, per answer-length distribution.

``python -m llmdispatch.loadtest.priority_load`` (from the repository root; it starts its own simulator, worker
and gateway with tests/stack.py, against the local RabbitMQ and Redis). Default settings: the
simulator runs ``--max-num-seqs 16`` (25 ms decode steps), one worker with 16 slots and the worker's
own defaults (whatever ``DISPATCHER_*`` settings say; nothing is overridden).

1. unloaded: one streamed high-priority request at a time, TTFT p50 (the reference);
2. for each length distribution (``identical``: every answer ``--max-tokens`` long, the worst case,
   slots free in waves; ``longtail``: lognormal lengths with the same mean, clipped to 1..512):
   ``--low-users`` closed-loop low-priority users stream answers without pause (48 users = 3x the
   16 slots). After ``--warmup`` s, low tokens/s is counted for ``--duration`` s without high traffic,
   then for ``--duration`` s more while one high-priority request arrives every ``--high-interval`` s
   on average (Poisson arrivals, open loop; high answers follow the same length distribution).

Printed per distribution: unloaded TTFT; high TTFT p50/p99 and their ratios to unloaded; low tokens/s
without and with the high class and their ratio. ``--candidate`` runs a named configuration of the
issue-14 study instead of the defaults (see CANDIDATES); ``--table`` prints one Markdown row per
distribution. The load client shares the machine's cores with everything it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import msgspec

from llmdispatch.loadtest.load import raise_fd_limit
from llmdispatch.loadtest.sse_client import StreamingClient, StreamResult

if TYPE_CHECKING:
    from tests.stack import Stack

DISTRIBUTIONS = ("identical", "longtail")
LONGTAIL_SIGMA = 1.0  # lognormal shape: median ~0.6x the mean, 1 in 20 answers over ~3x the mean
MAX_LENGTH = 512


@dataclass(frozen=True)
class Candidate:
    """One deployment: the server's limit and policy, and how the worker fills it."""

    server_seqs: int = 16  # the simulator's --max-num-seqs
    worker_slots: int = 16  # the worker's max_concurrency
    reserved: int = 0  # DISPATCHER_RESERVED_SLOTS (express lane = the high priority)
    policy: str = "fcfs"  # the simulator's --scheduling-policy (vLLM's default: fcfs)
    vllm_priority: bool = False  # DISPATCHER_VLLM_PRIORITY
    note: str = ""


CANDIDATES: dict[str, Candidate] = {
    "defaults": Candidate(policy="priority", note="worker defaults, nothing overridden"),
    "a": Candidate(reserved=0, note="today's explicit defaults"),
    **{
        f"b{h}": Candidate(reserved=h, note=f"normal lane {16 - h} of vLLM's 16, high lane {h}")
        for h in (1, 2, 4, 6, 8)
    },
    **{
        f"c{k}": Candidate(
            worker_slots=16 + k,
            policy="priority",
            vllm_priority=True,
            note=f"{16 + k} slots on vLLM's 16, vLLM priority scheduling",
        )
        for k in (2, 4)
    },
    **{
        f"v{h}": Candidate(
            server_seqs=16 + h,
            worker_slots=16 + h,
            reserved=h,
            note=f"vLLM runs {16 + h}: normal lane 16, high lane {h}",
        )
        for h in (2, 4, 6, 8)
    },
}


@dataclass
class Phase:
    """What the high class saw in the window with high traffic."""

    high_results: dict[str, StreamResult] = field(default_factory=dict)  # filled in as the streams go
    high_sent_at: dict[str, float] = field(default_factory=dict)  # user name -> when sent (CLOCK_MONOTONIC)
    high_sent: int = 0

    def ttfts(self, now: float) -> tuple[list[float], int, int]:
        """TTFTs; a request without a first token by ``now`` counts with its wait so far (a lower bound).
        Also returns how many had no first token (unserved) and how many of those failed."""
        values, unserved, failed = [], 0, 0
        for result in self.high_results.values():
            if result.first_token_at is not None:
                values.append(result.first_token_at - result.sent_at)
            else:
                unserved += 1
                failed += result.finished_at is not None or bool(result.error)
                values.append(now - result.sent_at)
        return values, unserved, failed


def body(model: str, max_tokens: int, user: str | None = None) -> bytes:
    payload: dict[str, object] = {"model": model, "stream": True, "max_tokens": max_tokens,
                                  "messages": [{"role": "user", "content": "Say something about queues."}]}  # fmt: skip
    if user is not None:
        payload["user"] = user  # names the request in the simulator's event log
    return msgspec.json.encode(payload)


def lengths(distribution: str, mean: int, rng: random.Random) -> int:
    if distribution == "identical":
        return mean
    # lognormal with the given mean: mu = ln(mean) - sigma^2 / 2
    mu = math.log(mean) - LONGTAIL_SIGMA**2 / 2
    return max(1, min(MAX_LENGTH, round(rng.lognormvariate(mu, LONGTAIL_SIGMA))))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def unloaded(url: str, token: str, payload: bytes, n: int) -> float:
    client = StreamingClient(url, token)
    ttfts = []
    try:
        for _ in range(n):
            result = await client.post(payload, _ignore)
            assert result.ok and result.first_token_at is not None, result.error
            ttfts.append(result.first_token_at - result.sent_at)
            await asyncio.sleep(0.05)  # an idle engine between requests
    finally:
        client.close()
    return statistics.median(ttfts[2:])  # the first ones warm connections and caches


def _ignore(at: float, gap: float) -> None:
    pass


async def engine_steps(sim_url: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        return int((await client.get(sim_url + "/sim/stats")).json()["steps"])


async def engine_log(sim_url: str) -> list[dict[str, object]]:
    async with httpx.AsyncClient(timeout=10) as client:
        return list((await client.get(sim_url + "/sim/stats")).json()["log"])


def split_waits(phase: Phase, log: list[dict[str, object]]) -> dict[str, float]:
    """Where high requests' time went: before vLLM (gateway, RabbitMQ, worker), inside it until a step
    admitted them (the running step's end, or a batch slot), that step until their first output, and
    the way back to the client.

    The simulator logs ``time.monotonic()``; the client's clock is the same system-wide CLOCK_MONOTONIC.
    """
    at: dict[str, dict[str, float]] = {}
    for event in log:
        user = event.get("user")
        if isinstance(user, str) and user in phase.high_sent_at:
            at.setdefault(user, {})[str(event["event"])] = float(event["t"])  # type: ignore[arg-type]
    before = [e["queued"] - phase.high_sent_at[u] for u, e in at.items() if "queued" in e]
    inside = [e["started"] - e["queued"] for e in at.values() if "queued" in e and "started" in e]
    # The step that admitted it, until its first output was written (the simulator's share), then the way
    # back to the client (the stack's). perf_counter is CLOCK_MONOTONIC too on Linux.
    step = [e["first_output"] - e["started"] for e in at.values() if "first_output" in e and "started" in e]
    first = {u: r.first_token_at for u, r in phase.high_results.items()}
    back = [f - e["first_output"] for u, e in at.items() if "first_output" in e and (f := first.get(u)) is not None]
    out: dict[str, float] = {}
    for name, values in (("to_vllm", before), ("in_vllm", inside), ("in_step", step), ("back", back)):
        if values:
            out[f"high_wait_{name}_p50"] = round(percentile(values, 0.5), 4)
            out[f"high_wait_{name}_p99"] = round(percentile(values, 0.99), 4)
    return out


async def run_distribution(
    urls: tuple[str, str],
    models: tuple[str, str],
    low_token: str,
    high_token: str,
    distribution: str,
    args: argparse.Namespace,
) -> dict[str, object]:
    """One distribution: low users throughout, high arrivals in the second window.

    Besides tokens/s (wall clock), low tokens per engine step: the low class's share of the batch,
    which does not depend on how fast a CPU shared with other work runs the simulator's steps.
    """
    url, sim_url = urls
    model, twin_model = models
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    busy = Phase()
    bins: Counter[int] = Counter()

    def count_token(at: float, gap: float) -> None:
        bins[int((at - t0) * 10)] += 1

    stop = asyncio.Event()

    async def low_user(delay: float) -> None:
        await asyncio.sleep(delay)
        client = StreamingClient(url, low_token)
        try:
            while not stop.is_set():
                await client.post(body(model, lengths(distribution, args.max_tokens, rng)), count_token)
        finally:
            client.close()

    async def high_request(phase: Phase, name: str) -> None:
        client = StreamingClient(url, high_token)
        phase.high_sent_at[name] = time.monotonic()
        result = phase.high_results[name] = StreamResult(time.perf_counter())
        try:
            await client.post(body(model, lengths(distribution, args.max_tokens, rng), name), _ignore, result)
        finally:
            client.close()

    twin_ttfts: list[float] = []

    async def idle_twin() -> None:
        """High requests one at a time to the idle twin model while the high class runs."""
        client = StreamingClient(url, high_token)
        try:
            while True:
                result = await client.post(body(twin_model, lengths(distribution, args.max_tokens, rng)), _ignore)
                if result.ok and result.first_token_at is not None:
                    twin_ttfts.append(result.first_token_at - result.sent_at)
                await asyncio.sleep(args.high_interval)
        finally:
            client.close()

    users = [asyncio.create_task(low_user(i * 0.02)) for i in range(args.low_users)]
    highs: list[asyncio.Task[None]] = []
    try:
        quiet_from = args.warmup
        busy_from = quiet_from + args.duration
        busy_to = busy_from + args.duration
        await asyncio.sleep(quiet_from - (time.perf_counter() - t0))
        steps = [await engine_steps(sim_url)]
        await asyncio.sleep(busy_from - (time.perf_counter() - t0))
        steps.append(await engine_steps(sim_url))
        highs.append(asyncio.create_task(idle_twin()))
        next_at = time.perf_counter()
        end = t0 + busy_to
        while True:
            next_at += rng.expovariate(1 / args.high_interval)
            if next_at >= end:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            busy.high_sent += 1
            highs.append(asyncio.create_task(high_request(busy, f"high-{distribution}-{busy.high_sent}")))
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        steps.append(await engine_steps(sim_url))
        highs[0].cancel()
        if highs[1:]:
            await asyncio.wait(highs[1:], timeout=30)  # a grace period; what has no first token by then counts
        high_end = time.perf_counter()
        log = await engine_log(sim_url)
    finally:
        stop.set()
        for task in users + highs:
            task.cancel()
        await asyncio.gather(*users, *highs, return_exceptions=True)

    def rate(start: float, stop_at: float) -> float:
        return sum(n for b, n in bins.items() if start * 10 <= b < stop_at * 10) / (stop_at - start)

    low_quiet, low_busy = rate(quiet_from, busy_from), rate(busy_from, busy_to)
    steps_quiet, steps_busy = steps[1] - steps[0], steps[2] - steps[1]
    per_step_quiet = low_quiet * args.duration / max(1, steps_quiet)
    per_step_busy = low_busy * args.duration / max(1, steps_busy)
    ttfts, unserved, failed = busy.ttfts(high_end)
    result: dict[str, object] = {
        "distribution": distribution,
        "low_tokens_per_s_without_high": round(low_quiet, 1),
        "low_tokens_per_s_with_high": round(low_busy, 1),
        "low_with_over_without": round(low_busy / low_quiet, 3) if low_quiet else None,
        "low_tokens_per_step_without_high": round(per_step_quiet, 2),
        "low_tokens_per_step_with_high": round(per_step_busy, 2),
        "low_per_step_with_over_without": round(per_step_busy / per_step_quiet, 3) if per_step_quiet else None,
        "step_ms_without_high": round(1000 * args.duration / max(1, steps_quiet), 1),
        "step_ms_with_high": round(1000 * args.duration / max(1, steps_busy), 1),
        "high_sent": busy.high_sent,
        "high_without_first_token": unserved,
        "high_failed": failed,
    }
    result.update(split_waits(busy, log))
    if twin_ttfts:
        result["idle_twin_ttft_p50"] = round(percentile(twin_ttfts, 0.5), 4)
    if ttfts:
        result.update(high_ttft_p50=round(percentile(ttfts, 0.5), 4), high_ttft_p99=round(percentile(ttfts, 0.99), 4))
    return result


async def main(args: argparse.Namespace) -> dict[str, object]:
    from llmdispatch.amqp import delete_model_queue
    from tests.stack import Stack, free_port, wait_http

    cand = CANDIDATES[args.candidate]
    if args.server_seqs or args.worker_slots:
        cand = dataclasses.replace(
            cand, server_seqs=args.server_seqs or cand.server_seqs, worker_slots=args.worker_slots or cand.worker_slots
        )
    raise_fd_limit(10_000)
    env = {
        "DISPATCHER_MAX_QUEUED_PER_TOKEN": "0",
        "DISPATCHER_MAX_STREAMS_PER_TOKEN": "0",
        "DISPATCHER_LOG_LEVEL": "warning",
    }
    if args.candidate != "defaults":
        env.update(
            DISPATCHER_RESERVED_SLOTS=str(cand.reserved), DISPATCHER_VLLM_PRIORITY=str(cand.vllm_priority).lower()
        )
        env.update(DISPATCHER_EXPRESS_PRIORITY=str(args.high_priority if cand.reserved else 11))
    if args.log_dir:
        env["DISPATCHER_LOG_LEVEL"] = "info"
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(args.log_dir or tmp), env=env)
        reference_model = stack.model + "-ref"
        try:
            stack.simulator_url = spawn_simulator(stack, stack.model, cand.server_seqs, cand.policy, args.decode_ms)
            stack.start_worker(cand.worker_slots)
            # An idle twin (own simulator and worker, same gateway and broker): its TTFT, measured while the
            # load runs, is what "unloaded" costs on a machine as busy as it is then.
            reference_sim = spawn_simulator(stack, reference_model, cand.server_seqs, cand.policy, args.decode_ms)
            worker_port = free_port()
            stack.spawn(
                "worker", "worker", "--model", reference_model, "--vllm-url", reference_sim + "/v1",
                "--max-concurrency", "16", "--http-port", str(worker_port),
            )  # fmt: skip
            wait_http(f"http://127.0.0.1:{worker_port}/ready")
            stack.start_gateway()
            wait_model(stack.gateway_url, reference_model)
            high = stack.add_token("load-high", priority=args.high_priority)
            low = stack.add_token("load-low", priority=args.low_priority)
            url = stack.gateway_url + "/v1/chat/completions"
            reference = await unloaded(url, high, body(stack.model, args.max_tokens), args.unloaded_requests)
            runs = []
            for distribution in args.distributions:
                urls = (url, stack.simulator_url)
                run = await run_distribution(urls, (stack.model, reference_model), low, high, distribution, args)
                for q in ("p50", "p99"):
                    value = run.get(f"high_ttft_{q}")
                    if isinstance(value, float):
                        run[f"high_{q}_over_unloaded"] = round(value / reference, 2)
                        twin = run.get("idle_twin_ttft_p50")
                        if isinstance(twin, float):
                            run[f"high_{q}_over_idle_twin"] = round(value / twin, 2)
                runs.append(run)
        finally:
            stack.close()
            await delete_model_queue(stack.amqp_url, reference_model)
    return {
        "candidate": args.candidate,
        "config": {
            **cand.__dict__,
            "decode_ms": args.decode_ms,
            "low_users": args.low_users,
            "max_tokens_mean": args.max_tokens,
            "high_interval_s": args.high_interval,
            "duration_s": args.duration,
        },
        "unloaded_ttft_p50": round(reference, 4),
        "runs": runs,
    }


def spawn_simulator(stack: Stack, model: str, seqs: int, policy: str, decode_ms: float) -> str:
    from tests.stack import free_port, wait_http

    port = free_port()
    stack.spawn(
        "simulator", "simulate", "--model", model, "--port", str(port), "--max-num-seqs", str(seqs),
        "--decode-ms", str(decode_ms), "--scheduling-policy", policy,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return url


def wait_model(gateway_url: str, model: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(gateway_url + "/ready", timeout=2) as response:
            if model.encode() in response.read():
                return
        time.sleep(0.1)
    raise TimeoutError(f"the gateway never saw a worker for {model}")


TABLE_HEADER = (
    "| candidate | lengths | unloaded TTFT | idle twin TTFT | high p50 (/unloaded; /twin) "
    "| high p99 (/unloaded; /twin) "
    "| low tok/s without / with high | low tok/step without / with | step ms "
    "| high p50: to vLLM / waiting in vLLM / first step / back |"
)


def table_rows(report: dict[str, object]) -> list[str]:
    """One Markdown row per distribution (columns of TABLE_HEADER)."""
    rows = []
    for run in report["runs"]:  # type: ignore[attr-defined]
        g = run.get
        cells = [
            report["candidate"],
            g("distribution"),
            report["unloaded_ttft_p50"],
            g("idle_twin_ttft_p50"),
            f"{g('high_ttft_p50')} ({g('high_p50_over_unloaded')}x; {g('high_p50_over_idle_twin')}x)",
            f"{g('high_ttft_p99')} ({g('high_p99_over_unloaded')}x; {g('high_p99_over_idle_twin')}x)",
            f"{g('low_tokens_per_s_without_high')} / {g('low_tokens_per_s_with_high')} ({g('low_with_over_without')})",
            f"{g('low_tokens_per_step_without_high')} / {g('low_tokens_per_step_with_high')} "
            f"({g('low_per_step_with_over_without')})",
            f"{g('step_ms_without_high')} / {g('step_ms_with_high')}",
            " / ".join(str(g(f"high_wait_{part}_p50")) for part in ("to_vllm", "in_vllm", "in_step", "back")),
        ]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), default="defaults")
    parser.add_argument("--server-seqs", type=int, help="override the simulator's --max-num-seqs (vLLM's limit)")
    parser.add_argument("--worker-slots", type=int, help="override the worker's --max-concurrency")
    parser.add_argument("--decode-ms", type=float, default=25.0, help="the simulator's decode step")
    parser.add_argument("--max-tokens", type=int, default=32, help="mean answer length")
    parser.add_argument("--low-users", type=int, default=48, help="closed-loop low-priority users")
    parser.add_argument("--high-interval", type=float, default=0.4, help="mean seconds between high requests")
    parser.add_argument("--high-priority", type=int, default=9)
    parser.add_argument("--low-priority", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase (without, with high)")
    parser.add_argument("--distributions", nargs="+", choices=DISTRIBUTIONS, default=list(DISTRIBUTIONS))
    parser.add_argument("--unloaded-requests", type=int, default=22)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--table", action="store_true", help="also print Markdown table rows")
    parser.add_argument("--log-dir", help="keep the processes' logs (at info level) in this directory")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    summary = asyncio.run(main(arguments))
    print(json.dumps(summary, indent=2))
    if arguments.table:
        print("\n".join([TABLE_HEADER, *table_rows(summary)]))

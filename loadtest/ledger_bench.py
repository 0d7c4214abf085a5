"""What the durable usage ledger adds at the end of a stream: the commit round trip, measured.

``N`` simulated streams run at once; each "generates" for a random time, then commits its usage
record (``Ledger.commit``: written to the write-ahead log, sent, confirmed by the stream) and starts
again. Prints the commit latency percentiles (the time the END frame waits), records per publish frame
(how well concurrent commits share a frame) and throughput. Needs the stream plugin (port 5552).

    python -m llmdispatch.loadtest.ledger_bench --streams 64 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from rstream import Producer

from llmdispatch.ledger import Ledger
from llmdispatch.loadtest.sse_client import StreamingClient, StreamResult
from llmdispatch.usage import StreamAddress, UsageRecord, percentile

DEFAULT_URL = os.environ.get("DISPATCHER_USAGE_STREAM_URL", "rabbitmq-stream://guest:guest@127.0.0.1:5552/")


def _record(n: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{uuid.uuid4().hex}", token=f"tenant-{n % 8}", model="bench-model", priority=n % 10,
        endpoint="chat/completions", stream=True, outcome="ok", status=200, prompt_tokens=120,
        completion_tokens=256, usage_reported=True, queue_wait=0.004, ttft=0.05, duration=2.5,
        worker="bench-worker-0123456789", time=time.time(),
    )  # fmt: skip


async def run(
    url: str, streams: int, seconds: float, stream_ms: tuple[float, float], wal: str | None
) -> dict[str, float]:
    """Commit latencies of ``streams`` concurrent streams for ``seconds``; returns the figures."""
    name = "ledger-bench-" + uuid.uuid4().hex[:8]
    ledger = Ledger(url, name, wal=wal, max_age="1h")
    await ledger.start()
    await ledger.commit(_record(0))  # connect first: the first commit of a process includes it
    frames_before = ledger.frames
    latencies: list[float] = []
    late = 0
    deadline = time.monotonic() + seconds

    async def stream(n: int) -> None:
        nonlocal late
        while time.monotonic() < deadline:
            await asyncio.sleep(random.uniform(*stream_ms) / 1000)
            started = time.monotonic()
            if await ledger.commit(_record(n)):
                latencies.append(time.monotonic() - started)
            else:
                late += 1

    started = time.monotonic()
    await asyncio.gather(*(stream(n) for n in range(streams)))
    elapsed = time.monotonic() - started
    frames = ledger.frames - frames_before
    await ledger.close()
    await _delete(url, name)
    return {
        "commits": len(latencies),
        "late": late,
        "commits_per_s": len(latencies) / elapsed,
        "records_per_frame": len(latencies) / max(1, frames),
        "p50_ms": 1000 * (percentile(latencies, 0.5) or 0),
        "p90_ms": 1000 * (percentile(latencies, 0.9) or 0),
        "p99_ms": 1000 * (percentile(latencies, 0.99) or 0),
        "max_ms": 1000 * max(latencies, default=0),
        "mean_ms": 1000 * (statistics.fmean(latencies) if latencies else 0),
    }


async def _delete(url: str, name: str) -> None:
    address = StreamAddress.parse(url)
    producer = Producer(address.host, **address.connect_kwargs())  # type: ignore[arg-type]
    await producer.start()
    try:
        await producer.delete_stream(name, missing_ok=True)
    finally:
        await producer.close()


def e2e(streams: int, seconds: float) -> dict[str, dict[str, float]]:
    """Through the whole stack (simulator, worker, gateway): the gap between a stream's last token and
    the end of its answer, with the ledger off and on; the difference is what the durable commit adds."""
    from tests.stack import Stack  # the test kit's process runner (a dev dependency, like this benchmark)

    figures: dict[str, dict[str, float]] = {}
    for mode in ("off", "on"):
        name = "ledger-bench-" + uuid.uuid4().hex[:8]
        with tempfile.TemporaryDirectory() as tmp:
            env = {"DISPATCHER_USAGE_WAL": str(Path(tmp) / "usage.wal"), "DISPATCHER_USAGE_STREAM_NAME": name}
            if mode == "on":
                env["DISPATCHER_USAGE_STREAM_URL"] = DEFAULT_URL
            stack = Stack(Path(tmp), env=env)
            try:
                stack.serve(max_num_seqs=streams, max_concurrency=streams, token="ledger-bench", decode_ms=10)
                results = asyncio.run(_load(stack.gateway_url, stack.model, stack.token, streams, seconds))
            finally:
                stack.close()
        if mode == "on":
            asyncio.run(_delete(DEFAULT_URL, name))
        tails = [r.finished_at - r.last_token_at for r in results if r.ok and r.finished_at and r.last_token_at]
        errors = collections.Counter(r.error[:60] or f"HTTP {r.status}" for r in results if not r.ok)
        if errors:
            print(f"  ledger {mode}: failed streams: {dict(errors.most_common(3))}")
        figures[mode] = {
            "streams_done": len(tails),
            "failed": sum(not r.ok for r in results),
            "tail_p50_ms": 1000 * (percentile(tails, 0.5) or 0),
            "tail_p99_ms": 1000 * (percentile(tails, 0.99) or 0),
        }
    return figures


async def _load(gateway_url: str, model: str, token: str, streams: int, seconds: float) -> list[StreamResult]:
    url = gateway_url + "/v1/chat/completions"
    body = b'{"model":"%s","messages":[{"role":"user","content":"tell me"}],"max_tokens":24,"stream":true}' % (
        model.encode()
    )
    warm_up = StreamingClient(url, token)  # the token is looked up once, not by 64 requests at once
    await warm_up.post(body, lambda *_: None)
    warm_up.close()
    results: list[StreamResult] = []
    deadline = time.monotonic() + seconds

    async def user() -> None:
        client = StreamingClient(url, token)
        try:
            while time.monotonic() < deadline:
                results.append(await client.post(body, lambda *_: None))
        finally:
            client.close()

    await asyncio.gather(*(user() for _ in range(streams)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--stream-ms", type=float, nargs=2, default=(20.0, 200.0), help="a stream's length range")
    parser.add_argument("--no-wal", action="store_true", help="memory only (shows what the log costs)")
    parser.add_argument("--e2e", action="store_true", help="also through the stack: end-of-stream gap, ledger off/on")
    args = parser.parse_args()
    if args.e2e:
        for streams in args.streams:
            figures = e2e(streams, args.seconds)
            for mode, f in figures.items():
                print(
                    f"e2e {streams:>4} streams, ledger {mode:>3}: {f['streams_done']:>6.0f} answers "
                    f"({f['failed']:.0f} failed), last token -> end of answer p50 {f['tail_p50_ms']:.1f} ms, "
                    f"p99 {f['tail_p99_ms']:.1f} ms"
                )
        return
    with tempfile.TemporaryDirectory() as tmp:
        wal = None if args.no_wal else str(Path(tmp) / "bench.wal")
        print(f"usage ledger commit latency ({'no log' if wal is None else 'write-ahead log'}, {os.cpu_count()} CPUs)")
        print(f"{'streams':>7} {'commits':>8} {'/s':>7} {'rec/frame':>9} {'p50 ms':>7} {'p90 ms':>7} "
              f"{'p99 ms':>7} {'max ms':>7} {'late':>5}")  # fmt: skip
        for streams in args.streams:
            r = asyncio.run(run(args.url, streams, args.seconds, tuple(args.stream_ms), wal))  # type: ignore[arg-type]
            print(
                f"{streams:>7} {r['commits']:>8.0f} {r['commits_per_s']:>7.0f} {r['records_per_frame']:>9.1f} "
                f"{r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['max_ms']:>7.1f} {r['late']:>5.0f}"
            )


if __name__ == "__main__":
    main()

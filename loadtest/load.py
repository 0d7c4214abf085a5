"""Closed-loop streaming load against one OpenAI-compatible URL; prints one JSON summary.

``python -m llmdispatch.loadtest.load --url http://127.0.0.1:8080/v1/chat/completions --model M --concurrency 64``

Each of ``concurrency`` users sends one streamed chat completion after another over its own
keep-alive connection. Figures count only what happens inside the measurement window (after the
warm-up), or, with ``--requests-per-user``, the whole run. The window's edges are printed as
``#window start`` / ``#window end`` lines before the JSON summary, so that a parent can read the
CPU time of the processes under test over exactly that window. The bench runs this in its own process so
that the client's CPU is not charged to what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from dataclasses import dataclass, field

from llmdispatch.loadtest.sse_client import StreamingClient, StreamResult


@dataclass
class LoadConfig:
    url: str
    model: str
    token: str = ""
    concurrency: int = 16
    max_tokens: int = 128
    prompt: str = "Write a story about a queue of requests waiting for a GPU."
    warmup: float = 3.0
    duration: float = 10.0
    ramp: float = 1.0  # users start spread over this many seconds
    requests_per_user: int = 0  # > 0: a fixed amount of work instead of a time window

    def body(self) -> bytes:
        message = {"role": "user", "content": self.prompt}
        payload = {"model": self.model, "messages": [message], "max_tokens": self.max_tokens, "stream": True}
        return json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class LoadRun:
    config: LoadConfig
    window_start: float = 0.0
    window_end: float = float("inf")
    tokens: int = 0
    gaps: array[float] = field(default_factory=lambda: array("d"))
    results: list[StreamResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    open_streams: int = 0
    peak_open_streams: int = 0

    def on_token(self, now: float, gap: float) -> None:
        if self.window_start <= now <= self.window_end:
            self.tokens += 1
            if gap >= 0:
                self.gaps.append(gap)

    def record_error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < 5:
            self.errors.append(message)

    async def user(self, index: int) -> None:
        config = self.config
        await asyncio.sleep(config.ramp * index / max(1, config.concurrency))
        client = StreamingClient(config.url, config.token)
        body = config.body()
        done = 0
        try:
            while config.requests_per_user <= 0 or done < config.requests_per_user:
                self.open_streams += 1
                self.peak_open_streams = max(self.peak_open_streams, self.open_streams)
                result = StreamResult(time.perf_counter())
                self.results.append(result)
                try:
                    await client.post(body, self.on_token, result)
                except OSError as exc:
                    result.error = f"connect: {exc}"
                finally:
                    self.open_streams -= 1
                done += 1
                if not result.ok:
                    self.record_error(result.error or f"HTTP {result.status}")
                    await asyncio.sleep(0.2)  # don't spin on a server that refuses
        finally:
            client.close()

    async def run(self) -> dict[str, object]:
        config = self.config
        started = time.perf_counter()
        if config.requests_per_user > 0:
            self.window_start = started
        else:
            self.window_start = started + config.warmup
            self.window_end = self.window_start + config.duration
        users = [asyncio.create_task(self.user(i)) for i in range(config.concurrency)]
        if config.requests_per_user > 0:
            mark("start")
            await asyncio.gather(*users)
            self.window_end = time.perf_counter()
            mark("end")
        else:
            await asyncio.sleep(self.window_start - started)
            mark("start")
            await asyncio.sleep(self.window_end - time.perf_counter())
            mark("end")
            for task in users:
                task.cancel()
            await asyncio.gather(*users, return_exceptions=True)
        return self.summary()

    def summary(self) -> dict[str, object]:
        start, end = self.window_start, self.window_end
        seconds = end - start
        in_window = [r for r in self.results if r.finished_at is not None and start <= r.finished_at <= end]
        completed = [r for r in in_window if r.ok]
        ttft = [
            r.first_token_at - r.sent_at
            for r in self.results
            if r.first_token_at is not None and start <= r.sent_at <= end
        ]
        per_stream = [
            (r.tokens - 1) / (r.last_token_at - r.first_token_at)
            for r in completed
            if r.tokens > 1
            and r.first_token_at is not None
            and r.last_token_at is not None
            and r.last_token_at > r.first_token_at
        ]
        return {
            "concurrency": self.config.concurrency,
            "max_tokens": self.config.max_tokens,
            "seconds": seconds,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / seconds,
            "requests": len(completed),
            "requests_per_s": len(completed) / seconds,
            "errors": self.error_count,
            "error_samples": self.errors,
            "peak_open_streams": self.peak_open_streams,
            "ttft_ms": percentiles(ttft, 1000.0),
            "itl_ms": percentiles(self.gaps, 1000.0),
            "stream_tokens_per_s": percentiles(per_stream, 1.0),
            "client_cpu_s": time.process_time(),
        }


WINDOW_MARK = "#window "


def mark(edge: str) -> None:
    """Tell the parent (the bench) that the measurement window starts or ends: it reads CPU times then."""
    sys.stdout.write(f"{WINDOW_MARK}{edge}\n")
    sys.stdout.flush()


def percentiles(values: object, scale: float) -> dict[str, float | int]:
    import numpy

    data = numpy.asarray(values, dtype=float) * scale
    if data.size == 0:
        return {"n": 0, "p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    p50, p90, p99 = numpy.percentile(data, [50, 90, 99])
    return {"n": int(data.size), "p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(data.mean())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmdispatch.loadtest.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="full URL of the chat completions endpoint")
    parser.add_argument("--model", required=True)
    parser.add_argument("--token", default="", help="bearer token (none for a bare vLLM)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt", default=LoadConfig.prompt)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--ramp", type=float, default=1.0)
    parser.add_argument("--requests-per-user", type=int, default=0)
    return parser


def raise_fd_limit(needed: int) -> None:
    """Lift the soft open-files limit towards the hard one: 1,000 streams need more than the usual 1,024."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise_fd_limit(args.concurrency + 256)
    config = LoadConfig(**{k: v for k, v in vars(args).items()})
    try:
        import uvloop

        summary = uvloop.run(LoadRun(config).run())
    except ImportError:
        summary = asyncio.run(LoadRun(config).run())
    json.dump(summary, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

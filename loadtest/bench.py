"""The performance benchmark: the same streaming load direct to the simulator and through the stack.

``python -m loadtest.bench --quick`` (or ``dispatcher bench --quick``): 64 streams direct, then
through gateway + RabbitMQ + worker, in one run; prints both token rates and their ratio (< 1 min).

``python -m loadtest.bench --report docs/benchmark.md``: 16, 64 and 256 streams, a long-stream case
(1,000 tokens per answer) and a many-connections case (1,000 streams open on one gateway); writes a
Markdown report with PNG plots next to it.

Everything shares this machine's cores: simulator, RabbitMQ, gateway, worker and the load client,
which runs in its own process so that its CPU is not charged to the gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.load import raise_fd_limit
from loadtest.services import Sampler, Services

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@dataclass
class Case:
    group: str  # "sweep" | "long" | "many"
    target: str  # "direct" | "stack"
    concurrency: int
    max_tokens: int
    warmup: float
    duration: float
    ramp: float = 1.0
    requests_per_user: int = 0


def run_case(services: Services, case: Case) -> dict[str, Any]:
    """One load run in its own process while the services' CPU and memory are measured."""
    services.check_alive()
    _wait_idle(services.simulator_url)
    direct = case.target == "direct"
    base = services.simulator_url if direct else services.gateway_url
    command = [
        sys.executable, "-m", "loadtest.load",
        "--url", base + "/v1/chat/completions", "--model", services.model,
        "--token", "" if direct else services.token,
        "--concurrency", str(case.concurrency), "--max-tokens", str(case.max_tokens),
        "--warmup", str(case.warmup), "--duration", str(case.duration), "--ramp", str(case.ramp),
        "--requests-per-user", str(case.requests_per_user),
    ]  # fmt: skip
    label = f"{case.group}: {case.concurrency} streams x {case.max_tokens} tokens, {case.target}"
    print(f"  {label} ...", end="", flush=True)
    with Sampler(services.pids()) as sampler:
        finished = subprocess.run(command, capture_output=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"the load client failed: {finished.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(finished.stdout)
    result["case"] = asdict(case)
    result["usage"] = {name: asdict(usage) for name, usage in sampler.usage().items()}
    print(
        f" {result['tokens_per_s']:.0f} tokens/s, TTFT p50 {result['ttft_ms']['p50']:.1f} ms, "
        f"inter-token p99 {result['itl_ms']['p99']:.1f} ms, errors {result['errors']}",
        flush=True,
    )
    return result


def _wait_idle(simulator_url: str, timeout: float = 30.0) -> None:
    """Until the simulator runs nothing (streams cut at the end of the previous case are aborted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(simulator_url + "/sim/stats", timeout=5) as response:
            stats = json.loads(response.read())
        if stats["running"] == 0 and stats["waiting"] == 0:
            time.sleep(0.5)
            return
        time.sleep(0.25)


def plan(args: argparse.Namespace) -> list[Case]:
    if args.quick:
        return [
            Case("sweep", target, 64, args.max_tokens, warmup=3, duration=10)
            for target in ("direct", "stack")
        ]
    cases = [
        Case("sweep", target, concurrency, args.max_tokens, warmup=args.warmup, duration=args.duration)
        for concurrency in args.concurrency
        for target in ("direct", "stack")
    ]
    if args.long_tokens:
        cases += [
            Case("long", target, args.long_concurrency, args.long_tokens, 0, 0, ramp=0.5, requests_per_user=1)
            for target in ("direct", "stack")
        ]
    if args.many:
        # Ramp over a few seconds (1,000 connects at once is a SYN flood, not a streaming test).
        cases += [
            Case("many", target, args.many, args.many_tokens, warmup=8, duration=args.duration, ramp=5)
            for target in ("direct", "stack")
        ]
    return cases


def environment(args: argparse.Namespace, services: Services) -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "decode_ms": args.decode_ms,
        "max_num_seqs": args.max_num_seqs,
        "worker_concurrency": args.max_num_seqs,
        "redis": bool(services.redis_url),
        "git": _git_head(),
        # Other work on the machine skews latency tails: say how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _git_head() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _redis_reachable(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatcher bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 streams direct vs through the stack; print the ratio")
    parser.add_argument("--report", type=Path, help="write the Markdown report here (plots beside it)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this directory")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 256])
    parser.add_argument("--max-tokens", type=int, default=100, help="tokens per answer in the sweep")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds measured per case")
    parser.add_argument("--decode-ms", type=float, default=20.0, help="simulator decode step (ms)")
    parser.add_argument("--max-num-seqs", type=int, default=1024, help="simulator batch and worker concurrency")
    parser.add_argument("--long-tokens", type=int, default=1000, help="tokens per answer in the long case (0: skip)")
    parser.add_argument("--long-concurrency", type=int, default=16)
    parser.add_argument("--many", type=int, default=1000, help="streams in the many-connections case (0: skip)")
    parser.add_argument("--many-tokens", type=int, default=50)
    parser.add_argument("--amqp-url", default=None, help=f"RabbitMQ (DISPATCHER_AMQP_URL, default {DEFAULT_AMQP})")
    parser.add_argument("--redis-url", default=None, help=f"Redis, used when reachable (default {DEFAULT_REDIS})")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    amqp_url = args.amqp_url or os.environ.get("DISPATCHER_AMQP_URL") or DEFAULT_AMQP
    redis_url = args.redis_url or os.environ.get("DISPATCHER_REDIS_URL") or DEFAULT_REDIS
    if not _redis_reachable(redis_url):
        redis_url = ""
    cases = plan(args)
    # The gateway, worker and simulator inherit it: each holds a socket per stream.
    raise_fd_limit(max(case.concurrency for case in cases) * 2 + 256)
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        services = Services(logs, amqp_url, redis_url)
        try:
            services.start(
                max_num_seqs=args.max_num_seqs, decode_ms=args.decode_ms, worker_concurrency=args.max_num_seqs
            )
            print(f"simulator (decode {args.decode_ms} ms/step), gateway and worker are up; {len(cases)} runs:")
            env = environment(args, services)
            results = [run_case(services, case) for case in cases]
        finally:
            services.close()
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    if args.quick:
        direct, stack = results
        ratio = stack["tokens_per_s"] / direct["tokens_per_s"]
        print(f"direct to the simulator: {direct['tokens_per_s']:.0f} tokens/s")
        print(f"through the stack:       {stack['tokens_per_s']:.0f} tokens/s")
        print(f"ratio: {ratio:.3f} (target >= 0.9)")
    if args.report:
        from loadtest.report import write_report

        write_report(args.report, env, results)
        print(f"report written to {args.report}")


if __name__ == "__main__":
    main()

"""The performance benchmark: the same streaming load direct to the simulator and through the stack.

``dispatcher bench --quick``: 64 streams at the high rate (10 ms decode steps, no slowdown per
sequence: 100 tokens/s per stream, 64-token answers) and 64 streams at the low rate, each direct
then through gateway + RabbitMQ + worker; prints the comparison and the issue-11 targets table
(about 2 minutes).

``dispatcher bench --report docs/benchmark.md``: high rate at 64 and 256 streams and with 512-token
answers, the same with ``--workers 2`` gateway processes, and the low-rate sweep, long and 1,000-stream
cases; writes a Markdown report with PNG plots next to it. ``--py-spy DIR`` records profiles of the
gateway and the worker during every stack run.

Everything shares this machine's cores: simulator, RabbitMQ, gateway, worker and the load client,
which runs in its own process so that its CPU is not charged to the gateway. CPU per request and per
token is each process tree's CPU time over the measurement window (the load client marks its edges).
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

from llmdispatch.loadtest.calibration import machine_speed
from llmdispatch.loadtest.load import WINDOW_MARK, raise_fd_limit
from llmdispatch.loadtest.services import Sampler, Services

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Profile:
    """One simulator speed and gateway size; each profile gets its own fresh set of processes."""

    name: str  # "high-rate" | "low-rate" | "high-rate-2gw"
    decode_ms: float
    decode_ms_per_seq: float
    gateway_workers: int = 1

    @property
    def label(self) -> str:
        rate = f"{self.decode_ms:g} ms/step + {self.decode_ms_per_seq:g} ms/sequence"
        return f"{self.name} ({rate}, {self.gateway_workers} gateway process{'es' if self.gateway_workers > 1 else ''})"


# A real GPU's rate: an 8B model decodes about 100 tokens/s per stream, whatever the batch (10 ms steps).
HIGH = Profile("high-rate", 10.0, 0.0)
HIGH_2GW = Profile("high-rate-2gw", 10.0, 0.0, gateway_workers=2)
# The older, gentler setting: 20 ms steps slowing down with the batch (a quarter of the token rate).
LOW = Profile("low-rate", 20.0, 0.25)


@dataclass
class Case:
    profile: str
    group: str  # "sweep" | "long" | "many"
    target: str  # "direct" | "stack"
    concurrency: int
    max_tokens: int
    warmup: float
    duration: float
    ramp: float = 1.0
    requests_per_user: int = 0


def run_case(
    services: Services, case: Case, spy: Path | None = None, baseline: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One load run in its own process while the services' CPU and memory are measured."""
    services.check_alive()
    _wait_idle(services.simulator_url)
    direct = case.target == "direct"
    base = services.simulator_url if direct else services.gateway_url
    command = [
        sys.executable, "-m", "llmdispatch.loadtest.load",
        "--url", base + "/v1/chat/completions", "--model", services.model,
        "--token", "" if direct else services.token,
        "--concurrency", str(case.concurrency), "--max-tokens", str(case.max_tokens),
        "--warmup", str(case.warmup), "--duration", str(case.duration), "--ramp", str(case.ramp),
        "--requests-per-user", str(case.requests_per_user),
    ]  # fmt: skip
    label = f"{case.profile} {case.group}: {case.concurrency} streams x {case.max_tokens} tokens, {case.target}"
    print(f"  {label} ...", end="", flush=True)
    spies: list[subprocess.Popen[bytes]] = []
    with Sampler(services.pids()) as sampler:
        load = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert load.stdout is not None
        summary = b""
        engine: list[dict[str, Any]] = []  # the simulator's counters at the window's edges
        for line in load.stdout:
            if line.startswith(WINDOW_MARK.encode()):
                sampler.mark()
                engine.append(_engine_counters(services.simulator_url))
                if spy is not None and not direct and line.strip().endswith(b"start"):
                    spies = start_spies(services, spy, case)
            else:
                summary += line
        stderr = load.stderr.read() if load.stderr else b""
        load.wait()
    for process in spies:
        process.wait()
    if load.returncode != 0:
        raise RuntimeError(f"the load client failed: {stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(summary)
    result["case"] = asdict(case)
    result["usage"] = {name: asdict(usage) for name, usage in sampler.usage().items()}
    if len(engine) == 2:  # how the simulator spent the window: batch size, and steps that paid a prefill
        delta = {key: engine[1][key] - engine[0][key] for key in ("steps", "admitting_steps", "generated_tokens")}
        steps = max(1, delta["steps"])
        result["engine_tokens_per_step"] = round(delta["generated_tokens"] / steps, 1)
        result["engine_admitting_share"] = round(delta["admitting_steps"] / steps, 3)
    if baseline is not None:
        from llmdispatch.loadtest.report import subtract_broker_baseline

        subtract_broker_baseline([baseline, result])
    costs = cpu_costs(result)
    extra = ""
    if not direct:
        extra = ", CPU/request: " + ", ".join(f"{name} {costs[name]['per_request_ms']:.2f} ms" for name in costs)
    if "engine_admitting_share" in result:
        extra += f", steps admitting: {100 * result['engine_admitting_share']:.0f}%"
    print(
        f" {result['tokens_per_s']:.0f} tokens/s, TTFT p50 {result['ttft_ms']['p50']:.1f} ms, "
        f"inter-token p99 {result['itl_ms']['p99']:.1f} ms, errors {result['errors']}{extra}",
        flush=True,
    )
    return result


def _engine_counters(simulator_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(simulator_url + "/sim/stats?log=0", timeout=10) as response:
        return dict(json.loads(response.read()))


def cpu_costs(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """CPU milliseconds per answer and microseconds per token of each measured process, over the window."""
    from llmdispatch.loadtest.report import cpu_per_request_ms, cpu_per_token_us

    return {
        name: {"per_request_ms": cpu_per_request_ms(result, name), "per_token_us": cpu_per_token_us(result, name)}
        for name in ("gateway", "worker", "rabbitmq")
        if name in result["usage"]
    }


def start_spies(services: Services, directory: Path, case: Case) -> list[subprocess.Popen[bytes]]:
    """py-spy on the gateway and the worker over the measurement window (raw folded stacks)."""
    directory.mkdir(parents=True, exist_ok=True)
    pids = services.pids()
    spies = []
    for name in ("gateway", "worker"):
        out = directory / f"{name}-{case.profile}-{case.concurrency}x{case.max_tokens}.txt"
        command = ["py-spy", "record", "--nonblocking", "--subprocesses", "--threads", "-f", "raw", "-o", str(out),
                   "-d", str(max(1, int(case.duration))), "-p", str(pids[name])]  # fmt: skip
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


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


def _pair(profile: Profile, group: str, concurrency: int, tokens: int, **timing: float) -> list[Case]:
    return [Case(profile.name, group, target, concurrency, tokens, **timing) for target in ("direct", "stack")]  # type: ignore[arg-type]


def plan(args: argparse.Namespace) -> list[tuple[Profile, list[Case]]]:
    """The runs, grouped by profile (each profile starts its own simulator, gateway and worker)."""
    if args.quick:
        return [
            (HIGH, _pair(HIGH, "sweep", 64, 64, warmup=3, duration=10)),
            (LOW, _pair(LOW, "sweep", 64, 100, warmup=3, duration=8)),
        ]
    timing = {"warmup": args.warmup, "duration": args.duration}
    high = [case for c in args.concurrency for case in _pair(HIGH, "sweep", c, args.max_tokens, **timing)]
    if args.long_tokens:
        # 512 tokens at 100 tokens/s: about 5 s per answer. Two answers per user, the whole run measured (a
        # time window would see few answers start, so no TTFT).
        high += _pair(HIGH, "long", 64, args.long_tokens, warmup=0, duration=0, ramp=1.0, requests_per_user=2)
    plans = [(HIGH, high)]
    if args.gateway_workers > 1:
        two = Profile(HIGH_2GW.name, HIGH.decode_ms, HIGH.decode_ms_per_seq, args.gateway_workers)
        plans.append((two, [c for n in args.concurrency for c in _pair(two, "sweep", n, args.max_tokens, **timing)]))
    low = [case for c in args.low_concurrency for case in _pair(LOW, "sweep", c, 100, **timing)]
    low += _pair(LOW, "long", 16, 1000, warmup=0, duration=0, ramp=0.5, requests_per_user=1)
    if args.many:
        # Ramp over a few seconds (1,000 connects at once is a SYN flood, not a streaming test).
        low += _pair(LOW, "many", args.many, 50, warmup=8, duration=args.duration, ramp=5)
    plans.append((LOW, low))
    return plans


def environment(args: argparse.Namespace, profiles: list[Profile]) -> dict[str, Any]:
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
        "profiles": {p.name: asdict(p) | {"label": p.label} for p in profiles},
        "max_num_seqs": args.max_num_seqs,
        "worker_concurrency": args.max_num_seqs,
        "git": _git_head(),
        # Other work on the machine skews latency tails: say how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()],
        # CPU per request differs between machines of one kind: these make two runs comparable.
        "speed": machine_speed(),
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
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--quick", action="store_true", help="64 streams high-rate and low-rate, direct vs stack")
    parser.add_argument("--report", type=Path, help="write the Markdown report here (plots beside it)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--logs", type=Path, help="keep the processes' logs in this directory")
    parser.add_argument("--py-spy", type=Path, help="record py-spy profiles of gateway and worker here (stack runs)")
    parser.add_argument("--concurrency", type=ints, default=[64, 256], help="high-rate streams")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer in the high-rate sweep")
    parser.add_argument("--long-tokens", type=int, default=512, help="tokens per answer, high-rate long case (0: skip)")
    parser.add_argument("--gateway-workers", type=int, default=2, help="gateway processes, extra profile (1: skip)")
    parser.add_argument("--low-concurrency", type=ints, default=[16, 64, 256], help="low-rate streams")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds measured per case")
    parser.add_argument("--max-num-seqs", type=int, default=1024, help="simulator batch and worker concurrency")
    parser.add_argument("--many", type=int, default=1000, help="streams in the many-connections case (0: skip)")
    parser.add_argument("--profiles", type=lambda s: s.split(","), help="only these: high-rate,high-rate-2gw,low-rate")
    parser.add_argument("--amqp-url", default=None, help=f"RabbitMQ (DISPATCHER_AMQP_URL, default {DEFAULT_AMQP})")
    parser.add_argument("--redis-url", default=None, help=f"Redis, used when reachable (default {DEFAULT_REDIS})")
    return parser


def run_profile(
    profile: Profile, cases: list[Case], args: argparse.Namespace, amqp_url: str, redis_url: str, logs: Path
) -> list[dict[str, Any]]:
    services = Services(logs / profile.name, amqp_url, redis_url)
    services.tmp.mkdir(parents=True, exist_ok=True)
    try:
        services.start(
            max_num_seqs=args.max_num_seqs,
            decode_ms=profile.decode_ms,
            decode_ms_per_seq=profile.decode_ms_per_seq,
            worker_concurrency=args.max_num_seqs,
            gateway_workers=profile.gateway_workers,
        )
        print(f"{profile.label}: simulator, gateway and worker are up; {len(cases)} runs:", flush=True)
        results: list[dict[str, Any]] = []
        for case in cases:
            results.append(run_case(services, case, args.py_spy, results[-1] if case.target == "stack" else None))
    finally:
        services.close()
    for result in results:
        result["redis"] = bool(redis_url)
    return results


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    amqp_url = args.amqp_url or os.environ.get("DISPATCHER_AMQP_URL") or DEFAULT_AMQP
    redis_url = args.redis_url or os.environ.get("DISPATCHER_REDIS_URL") or DEFAULT_REDIS
    if not _redis_reachable(redis_url):
        redis_url = ""
    plans = [(profile, cases) for profile, cases in plan(args) if not args.profiles or profile.name in args.profiles]
    # The gateway, worker and simulator inherit it: each holds a socket per stream.
    raise_fd_limit(max(case.concurrency for _, cases in plans for case in cases) * 2 + 256)
    env = environment(args, [profile for profile, _ in plans])
    env["redis"] = bool(redis_url)
    speed = env["speed"]
    print(
        f"machine: {env['cpu']}, {env['cores']} cores; Python reference loop {speed['python_loop_ms']} ms, "
        f"loopback round trip {speed['loopback_round_trip_us']} us (loadtest/calibration.py)"
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
        logs = args.logs or Path(tmp)
        for profile, cases in plans:
            results += run_profile(profile, cases, args, amqp_url, redis_url, logs)
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    from llmdispatch.loadtest.report import subtract_broker_baseline, targets_text

    subtract_broker_baseline(results)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print()
    print(targets_text(results))
    if args.report:
        from llmdispatch.loadtest.report import write_report

        write_report(args.report, env, results)
        print(f"report written to {args.report}")


if __name__ == "__main__":
    main()

"""The benchmark's Markdown report and its PNG plots, from the results of ``loadtest.bench``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Result = dict[str, Any]

# The targets (#11), checked on every high-rate configuration, and at 1,000 streams for memory.
TARGET_RATIO = 0.95
TARGET_TTFT_P50_MS = 5.0
TARGET_TTFT_P99_MS = 20.0
TARGET_ITL_P99_MS = 5.0
TARGET_CPU_PER_REQUEST_MS = 3.0
TARGET_RSS_MB = 300.0


def _pairs(results: list[Result], group: str, profile: str | None = None) -> list[tuple[Result, Result]]:
    """(direct, stack) result pairs of one group (and profile), by concurrency and answer length."""

    def pick(target: str) -> dict[tuple[str, int, int], Result]:
        return {
            (r["case"]["profile"], r["concurrency"], r["max_tokens"]): r
            for r in results
            if r["case"]["group"] == group
            and r["case"]["target"] == target
            and (profile is None or r["case"]["profile"] == profile)
        }

    direct, stack = pick("direct"), pick("stack")
    return [(direct[k], stack[k]) for k in sorted(direct, key=lambda k: (k[0], k[1], k[2])) if k in stack]


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def cpu_per_request_ms(result: Result, name: str) -> float:
    """CPU per answer: per token times the tokens of one answer.

    Counting the answers that completed inside the window instead would miss the work of those cut at
    its edges (with 512-token answers, most of it).
    """
    return cpu_per_token_us(result, name) * result["max_tokens"] / 1000


def cpu_per_token_us(result: Result, name: str) -> float:
    usage = result["usage"].get(name) or {}
    cpu = usage.get("window_cpu_s", float("nan"))
    # The broker may serve others too (other tests, other apps): take off its rate during the direct run.
    cpu -= usage.get("baseline_cpu_per_s", 0.0) * result["seconds"]
    return cpu * 1e6 / result["tokens"] if result["tokens"] else float("nan")


def subtract_broker_baseline(results: list[Result]) -> None:
    """Give each stack run the RabbitMQ CPU rate of its direct run (which sends nothing through it)."""
    for group in ("sweep", "long", "many"):
        for direct, stack in _pairs(results, group):
            base = direct["usage"].get("rabbitmq", {}).get("window_cpu_s")
            if base is not None and "rabbitmq" in stack["usage"] and direct["seconds"] > 0:
                stack["usage"]["rabbitmq"]["baseline_cpu_per_s"] = max(0.0, base / direct["seconds"])


def _row(result: Result, ratio: float | None) -> str:
    usage = result["usage"]
    stack = result["case"]["target"] == "stack"

    def cost(name: str) -> str:
        if not stack:
            return "-"
        return f"{_f(cpu_per_request_ms(result, name), 2)} / {_f(cpu_per_token_us(result, name), 0)}"

    cells = [
        str(result["concurrency"]),
        str(result["max_tokens"]),
        result["case"]["target"],
        _f(result["tokens_per_s"], 0),
        _f(result["requests_per_s"], 1),
        _f(result["ttft_ms"]["p50"]),
        _f(result["ttft_ms"]["p99"]),
        _f(result["itl_ms"]["p50"]),
        _f(result["itl_ms"]["p99"]),
        cost("gateway"),
        cost("worker"),
        cost("rabbitmq"),
        _f(usage.get("gateway", {}).get("peak_rss_mb"), 0) if stack else "-",
        _f(usage.get("worker", {}).get("peak_rss_mb"), 0) if stack else "-",
        _f(usage.get("simulator", {}).get("window_cpu_s"), 2),
        _f(result.get("client_cpu_s"), 2),
        str(result["errors"]),
        "" if ratio is None else f"{ratio:.2f}x",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| streams | tokens/answer | path | tokens/s | requests/s | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms "
    "| inter-token p99 ms | gateway CPU ms/req / µs/token | worker CPU ms/req / µs/token "
    "| RabbitMQ CPU ms/req / µs/token | gateway peak RSS MB | worker peak RSS MB | simulator CPU s "
    "| load client CPU s | errors | tokens/s vs direct |\n" + "|---" * 18 + "|"
)


def _table(pairs: list[tuple[Result, Result]]) -> str:
    lines = [HEADER]
    for direct, stack in pairs:
        lines.append(_row(direct, None))
        lines.append(_row(stack, stack["tokens_per_s"] / direct["tokens_per_s"]))
    return "\n".join(lines)


def target_rows(results: list[Result]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every high-rate configuration in the results, and the memory target."""
    rows: list[tuple[str, str, bool]] = []
    high = _pairs(results, "sweep", "high-rate") + _pairs(results, "long", "high-rate")
    for direct, stack in high:
        where = f"{stack['concurrency']} streams x {stack['max_tokens']} tokens"
        ratio = stack["tokens_per_s"] / direct["tokens_per_s"]
        added50 = stack["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"]
        added99 = stack["ttft_ms"]["p99"] - direct["ttft_ms"]["p99"]
        added_itl = stack["itl_ms"]["p99"] - direct["itl_ms"]["p99"]
        gateway, worker = cpu_per_request_ms(stack, "gateway"), cpu_per_request_ms(stack, "worker")
        rows += [
            (f"{where}: tokens/s >= {TARGET_RATIO}x direct", f"{ratio:.2f}x", ratio >= TARGET_RATIO),
            (f"{where}: added TTFT p50 <= {TARGET_TTFT_P50_MS:g} ms", f"{added50:+.1f} ms",
             added50 <= TARGET_TTFT_P50_MS),
            (f"{where}: added TTFT p99 <= {TARGET_TTFT_P99_MS:g} ms", f"{added99:+.1f} ms",
             added99 <= TARGET_TTFT_P99_MS),
            (f"{where}: inter-token p99 within {TARGET_ITL_P99_MS:g} ms", f"{added_itl:+.1f} ms",
             added_itl <= TARGET_ITL_P99_MS),
            (f"{where}: gateway CPU/request <= {TARGET_CPU_PER_REQUEST_MS:g} ms", f"{gateway:.2f} ms",
             gateway <= TARGET_CPU_PER_REQUEST_MS),
            (f"{where}: worker CPU/request <= {TARGET_CPU_PER_REQUEST_MS:g} ms", f"{worker:.2f} ms",
             worker <= TARGET_CPU_PER_REQUEST_MS),
        ]  # fmt: skip
    for _, stack in _pairs(results, "many"):
        rss = stack["usage"].get("gateway", {}).get("peak_rss_mb", float("nan"))
        open_streams = stack["peak_open_streams"]
        rows.append((
            f"{stack['concurrency']:,} concurrent streams on one gateway: no errors",
            f"{stack['errors']} errors, {open_streams:,} open at once",
            stack["errors"] == 0 and open_streams >= stack["concurrency"],
        ))  # fmt: skip
        rows.append((f"... and gateway RSS < {TARGET_RSS_MB:.0f} MB", f"{rss:.0f} MB peak", rss < TARGET_RSS_MB))
    return rows


def _targets(results: list[Result]) -> str:
    lines = ["| target (high-rate: 100 tokens/s per stream) | measured | |", "|---|---|---|"]
    for name, measured, ok in target_rows(results):
        verdict = "not measured" if "nan" in measured else "met" if ok else "**missed**"
        lines.append(f"| {name} | {measured} | {verdict} |")
    return "\n".join(lines)


def summary_rows(results: list[Result]) -> list[list[str]]:
    """One line per (direct, stack) pair of every profile: the figures `dispatcher bench` prints."""
    rows = []
    for group in ("sweep", "long", "many"):
        for direct, stack in _pairs(results, group):
            rows.append([
                stack["case"]["profile"], f"{stack['concurrency']}x{stack['max_tokens']}",
                f"{stack['tokens_per_s'] / direct['tokens_per_s']:.2f}x",
                f"{stack['ttft_ms']['p50'] - direct['ttft_ms']['p50']:+.1f}",
                f"{stack['ttft_ms']['p99'] - direct['ttft_ms']['p99']:+.1f}",
                f"{stack['itl_ms']['p99'] - direct['itl_ms']['p99']:+.1f}",
                *(f"{_f(cpu_per_request_ms(stack, n), 2)}/{_f(cpu_per_token_us(stack, n), 0)}"
                  for n in ("gateway", "worker", "rabbitmq")),
                str(stack["errors"]),
            ])  # fmt: skip
    return rows


def targets_text(results: list[Result]) -> str:
    """The plain-text tables `dispatcher bench` prints at the end."""
    head = ["profile", "streams x tokens", "tok/s ratio", "+TTFT p50", "+TTFT p99", "+ITL p99",
            "gateway ms/req/us/tok", "worker ms/req/us/tok", "rabbitmq ms/req/us/tok", "errors"]  # fmt: skip
    rows = [head, *summary_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = ["stack vs direct (added latencies in ms; CPU over the measurement window):"]
    out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    targets = target_rows(results)
    if targets:
        out += ["", "targets:"]
        width = max(len(t[0]) for t in targets)
        for name, measured, ok in targets:
            verdict = "not measured" if "nan" in measured else "met" if ok else "MISSED"
            out.append(f"  {name.ljust(width)}  {measured:>12}  {verdict}")
    return "\n".join(out)


def plot(results: list[Result], ttft_path: Path, throughput_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "high-rate": _pairs(results, "sweep", "high-rate"),
        "low-rate": _pairs(results, "sweep", "low-rate") + _pairs(results, "many", "low-rate"),
    }
    colors = {("high-rate", 0): "tab:blue", ("high-rate", 1): "tab:orange",
              ("low-rate", 0): "tab:green", ("low-rate", 1): "tab:red"}  # fmt: skip
    names = ("direct", "through the stack")
    ticks = sorted({d["concurrency"] for pairs in series.values() for d, _ in pairs})

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for profile, pairs in series.items():
        xs = [d["concurrency"] for d, _ in pairs]
        for index in (0, 1):
            color = colors[(profile, index)]
            label = f"{profile}, {names[index]}"
            ax.plot(xs, [p[index]["ttft_ms"]["p50"] for p in pairs], marker="o", color=color, label=f"{label}, p50")
            ax.plot(xs, [p[index]["ttft_ms"]["p99"] for p in pairs], marker="s", color=color, linestyle="--",
                    label=f"{label}, p99")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="time to first token (ms)",
           title="Time to first token")  # fmt: skip
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ttft_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for profile, pairs in series.items():
        xs = [d["concurrency"] for d, _ in pairs]
        for index in (0, 1):
            ax.plot(xs, [p[index]["tokens_per_s"] for p in pairs], marker="o", color=colors[(profile, index)],
                    label=f"{profile}, {names[index]}")  # fmt: skip
    ax.set(xscale="log", xlabel="concurrent streams", ylabel="tokens per second (all streams)",
           title="Streaming throughput")  # fmt: skip
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(throughput_path)
    plt.close(fig)


def _gateway_processes(results: list[Result]) -> str:
    """1 against N gateway processes, same load, each against its own direct run."""
    lines = [
        "| gateway processes | streams x tokens | tokens/s vs direct | added TTFT p50 / p99 ms "
        "| inter-token p99 added ms | gateway CPU ms/request | gateway peak RSS MB (all processes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for profile in ("high-rate", "high-rate-2gw"):
        for direct, stack in _pairs(results, "sweep", profile):
            processes = "1" if profile == "high-rate" else "2"
            lines.append(
                f"| {processes} | {stack['concurrency']} x {stack['max_tokens']} "
                f"| {stack['tokens_per_s'] / direct['tokens_per_s']:.2f}x "
                f"| {stack['ttft_ms']['p50'] - direct['ttft_ms']['p50']:+.1f} / "
                f"{stack['ttft_ms']['p99'] - direct['ttft_ms']['p99']:+.1f} "
                f"| {stack['itl_ms']['p99'] - direct['itl_ms']['p99']:+.1f} "
                f"| {cpu_per_request_ms(stack, 'gateway'):.2f} "
                f"| {_f(stack['usage'].get('gateway', {}).get('peak_rss_mb'), 0)} |"
            )
    return "\n".join(lines)


def _admitting_text(results: list[Result]) -> str:
    """The share of steps that admitted a sequence, direct and through the stack, at 64 x 64 high-rate."""
    share = {
        r["case"]["target"]: r["engine_admitting_share"]
        for r in results
        if r["case"]["profile"] == "high-rate"
        and r["case"]["concurrency"] == 64
        and r["case"]["max_tokens"] == 64
        and "engine_admitting_share" in r
    }
    if len(share) < 2:
        return ""
    stack, direct = 100 * share["stack"], 100 * share["direct"]
    return f" (64 x 64 high-rate: {stack:.0f}% of steps admit, against {direct:.0f}% direct)"


def _speed_text(env: dict[str, Any]) -> str:
    speed = env.get("speed")
    if not speed:
        return ""
    return (
        "Its speed (`python -m llmdispatch.loadtest.calibration`): "
        f"a reference Python loop in {speed['python_loop_ms']} ms, "
        f"a loopback round trip between two event loops' protocols in {speed['loopback_round_trip_us']} us; "
        "CPU per request scales with these between machines (the same code took 4.4 ms of gateway CPU per "
        "request on one 2-core machine of this kind and 2.4 ms on another). "
    )


def _busy_warning(env: dict[str, Any]) -> list[str]:
    """A busy machine (other work than the benchmark's) makes latencies and ratios measure contention."""
    loads = [*env.get("load_average", [])[:1], *env.get("load_average_end", [])[:1]]
    cores = env.get("cores") or 1
    if not loads or max(loads) <= cores:
        return []
    return [
        f"**Caution: this run shared the machine with other work** (1-minute load average up to {max(loads):g} on "
        f"{cores} cores, the benchmark's own processes included). Every hop waited for a core, so token rates, "
        "ratios and latencies below measure that contention more than the stack; the CPU per request and per "
        "token (each process's own CPU time) are the figures to compare, and they too run high when caches "
        "and cores are shared. Re-run on an idle machine for the stack's own figures.",
        "",
    ]


def write_report(path: Path, env: dict[str, Any], results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ttft_png = path.with_name(path.stem + "-ttft.png")
    throughput_png = path.with_name(path.stem + "-throughput.png")
    plot(results, ttft_png, throughput_png)
    profiles = env.get("profiles", {})
    redis = (
        "Redis on (token cache, rate-limit counters: the per-token queue cap is raised out of reach but its "
        "check runs for every request)"
        if env["redis"]
        else "no Redis"
    )
    parts = [
        "# Benchmark: streaming through dispatcher vs direct to the inference server",
        "",
        f"Generated by `dispatcher bench --report {path}` on {env['date']} (commit `{env['git']}`): "
        "every figure below comes from that one run. Re-run it to reproduce; `dispatcher bench --quick` "
        "prints the 64-stream comparisons alone in about two minutes.",
        "",
        *_busy_warning(env),
        "## Setup",
        "",
        f"- Machine: {env['cpu']}, **{env['cores']} cores**, {env['memory_gb']} GB RAM, Python {env['python']}. "
        + _speed_text(env)
        + "The simulator, RabbitMQ, Redis, the gateway, the worker and the load client all share these cores: "
        "that is the honest test, every hop costs CPU that the others then lack. "
        f"Load average when the run started: {', '.join(map(str, env.get('load_average', [])))}"
        + (f"; when it ended: {', '.join(map(str, env['load_average_end']))}." if "load_average_end" in env else "."),
        "- Inference server: the vLLM simulator (`dispatcher simulate`), continuous batching. Two speeds, each "
        "with its own fresh processes:",
        "  - **high-rate**: a 10 ms decode step that does not slow down with the batch, so every stream gets "
        "100 tokens/s, about what one GPU serving an 8B model gives each stream. This is the configuration "
        "the targets are checked on: it is where the stack's per-token and per-request CPU shows.",
        "  - **low-rate** (the earlier benchmark's setting, kept for comparison): a 20 ms step + 0.25 ms per "
        "running sequence, about a quarter of that rate, with 100-token answers.",
        f"  Both with `--max-num-seqs {env['max_num_seqs']}` (+ 5 ms per step that admits sequences). The token "
        "rate is set by simulated time, not by CPU, so the ratio measures what the stack loses. One effect "
        "favours the stack: requests that reach the simulator together share one step's 5 ms, and through the "
        "stack they arrive in small bunches, so fewer steps pay it"
        + _admitting_text(results)
        + ". A ratio above 1.00x is that, not a gain; read 0.95x and up as no loss.",
        f"- Stack: one gateway process unless said otherwise (uvicorn, uvloop + httptools), RabbitMQ 3.10 on this "
        f"machine, one worker with `--max-concurrency {env['worker_concurrency']}` so that no case is a queueing "
        f"test; tokens in SQLite, {redis}; default settings otherwise (5 ms reply flush interval).",
        "- Load: `python -m llmdispatch.loadtest.load` in its own process "
        "(so its CPU is not charged to the gateway): closed "
        "loop, each user streams one chat completion after another over a keep-alive connection, with a raw "
        "asyncio HTTP client that only splits SSE events. TTFT is the time from sending the request to the first "
        "content token; inter-token latency is every gap between consecutive tokens of a stream as the client "
        "reads them; tokens/s counts tokens received in the measurement window (after a warm-up).",
        "- CPU per request and per token: the CPU time (user + system, psutil) each process tree used during the "
        "measurement window, divided by the tokens received in that window; per request is that times the "
        "tokens of one answer (every answer has exactly that many). "
        "RabbitMQ's is that of the whole local node (`beam.smp`), less its CPU rate during the direct run "
        "(other users of the broker). Peak RSS covers the whole run.",
        "",
        "## Targets",
        "",
        _targets(results),
        "",
        "For comparison, LiteLLM's proxy measured here with the low-rate kind of load reached 0.21x direct at "
        "64 streams, with 1.9 s added TTFT.",
        "",
    ]
    titles = (("high-rate", "High rate (100 tokens/s per stream)"), ("low-rate", "Low rate (earlier setting)"))
    for name, title in titles:
        sweep, long = _pairs(results, "sweep", name), _pairs(results, "long", name)
        if not sweep and not long:
            continue
        label = profiles.get(name, {}).get("label", name)
        parts += [f"## {title}", "", f"Profile: {label}. CPU cells: milliseconds per request / microseconds per "
                  "token.", "", _table(sweep + long), ""]  # fmt: skip
        if name == "low-rate" and long:
            parts += [f"The {long[0][0]['max_tokens']:,}-token case: {long[0][0]['concurrency']} users each stream "
                      "one answer; the whole run is measured.", ""]  # fmt: skip
    if _pairs(results, "sweep", "high-rate-2gw"):
        parts += [
            "## One gateway process against two (high rate)",
            "",
            "`dispatcher gateway --workers 2`: two processes on one port (SO_REUSEPORT), each with its own AMQP "
            "connections. Both runs have their own direct baseline; gateway CPU and RSS are summed over the processes.",
            "",
            _gateway_processes(results),
            "",
        ]
    many = _pairs(results, "many")
    if many:
        d, s = many[0]
        parts += [
            f"## Many connections ({d['concurrency']:,} concurrent streams, {d['max_tokens']} tokens per answer, "
            "low rate)",
            "",
            f"{d['concurrency']:,} users (ramped up over 5 s) hold streams open at once on one gateway process; "
            f"peak open streams seen by the client: {s['peak_open_streams']:,}. The simulator runs all of them in "
            "one batch (0.25 ms per sequence makes its steps long, hence the low per-stream rate), and the worker "
            "takes them all at once, so this measures holding connections, not queueing.",
            "",
            _table(many),
            "",
        ]
    parts += [
        f"![Time to first token against concurrency]({ttft_png.name})",
        "",
        f"![Throughput against concurrency]({throughput_png.name})",
        "",
        "## Reading the figures",
        "",
        "- *tokens/s vs direct* is the stack's token rate over the direct one at the same concurrency.",
        "- Added TTFT is the difference between the stack's and the direct percentile at the same concurrency.",
        "- Errors count failed requests (non-200 status, error events, broken streams) during the whole run; "
        "streams cut at the end of a measurement window are not errors.",
        "",
    ]
    path.write_text("\n".join(parts))

"""The benchmark's Markdown report and its PNG plots, from the results of ``loadtest.bench``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Result = dict[str, Any]

# The targets, checked at 64 streams (and 1,000 streams for the memory one).
TARGET_RATIO = 0.9
TARGET_TTFT_P50_MS = 15.0
TARGET_TTFT_P99_MS = 50.0
TARGET_ITL_P99_MS = 10.0
TARGET_RSS_MB = 300.0


def _pairs(results: list[Result], group: str) -> list[tuple[Result, Result]]:
    """(direct, stack) result pairs of one group, by concurrency."""
    direct = {r["concurrency"]: r for r in results if r["case"]["group"] == group and r["case"]["target"] == "direct"}
    stack = {r["concurrency"]: r for r in results if r["case"]["group"] == group and r["case"]["target"] == "stack"}
    return [(direct[c], stack[c]) for c in sorted(direct) if c in stack]


def _f(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def _row(result: Result, ratio: float | None) -> str:
    usage = result["usage"]
    gateway, worker = usage.get("gateway", {}), usage.get("worker", {})
    stack = result["case"]["target"] == "stack"
    cells = [
        str(result["concurrency"]),
        result["case"]["target"],
        _f(result["tokens_per_s"], 0),
        _f(result["requests_per_s"], 1),
        _f(result["ttft_ms"]["p50"]),
        _f(result["ttft_ms"]["p99"]),
        _f(result["itl_ms"]["p50"]),
        _f(result["itl_ms"]["p99"]),
        _f(gateway.get("cpu_s"), 2) if stack else "-",
        _f(gateway.get("peak_rss_mb"), 0) if stack else "-",
        _f(worker.get("cpu_s"), 2) if stack else "-",
        _f(worker.get("peak_rss_mb"), 0) if stack else "-",
        _f(usage.get("simulator", {}).get("cpu_s"), 2),
        _f(usage.get("rabbitmq", {}).get("cpu_s"), 2) if stack else "-",
        _f(result.get("client_cpu_s"), 2),
        str(result["errors"]),
        "" if ratio is None else f"{ratio:.2f}x",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| streams | path | tokens/s | requests/s | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | inter-token p99 ms "
    "| gateway CPU s | gateway peak RSS MB | worker CPU s | worker peak RSS MB | simulator CPU s | RabbitMQ CPU s "
    "| load client CPU s | errors | tokens/s vs direct |\n" + "|---" * 17 + "|"
)


def _table(pairs: list[tuple[Result, Result]]) -> str:
    lines = [HEADER]
    for direct, stack in pairs:
        lines.append(_row(direct, None))
        lines.append(_row(stack, stack["tokens_per_s"] / direct["tokens_per_s"]))
    return "\n".join(lines)


def _targets(results: list[Result]) -> str:
    lines = ["| target | measured | |", "|---|---|---|"]

    def check(name: str, measured: str, ok: bool) -> None:
        lines.append(f"| {name} | {measured} | {'met' if ok else '**missed**'} |")

    at64 = [p for p in _pairs(results, "sweep") if p[0]["concurrency"] == 64]
    if at64:
        direct, stack = at64[0]
        ratio = stack["tokens_per_s"] / direct["tokens_per_s"]
        check("tokens/s through the stack >= 0.9x direct at 64 streams", f"{ratio:.2f}x", ratio >= TARGET_RATIO)
        added50 = stack["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"]
        added99 = stack["ttft_ms"]["p99"] - direct["ttft_ms"]["p99"]
        check("added TTFT p50 < 15 ms (64 streams)", f"{added50:+.1f} ms", added50 < TARGET_TTFT_P50_MS)
        check("added TTFT p99 < 50 ms (64 streams)", f"{added99:+.1f} ms", added99 < TARGET_TTFT_P99_MS)
        added_itl = stack["itl_ms"]["p99"] - direct["itl_ms"]["p99"]
        itl_ok = added_itl <= TARGET_ITL_P99_MS
        check("inter-token p99 within 10 ms of direct (64 streams)", f"{added_itl:+.1f} ms", itl_ok)
    for _, stack in _pairs(results, "many"):
        rss = stack["usage"].get("gateway", {}).get("peak_rss_mb", float("nan"))
        check(
            f"{stack['concurrency']:,} concurrent streams on one gateway: no errors",
            f"{stack['errors']} errors, {stack['peak_open_streams']:,} streams open at once",
            stack["errors"] == 0 and stack["peak_open_streams"] >= stack["concurrency"],
        )
        check(f"... and gateway RSS < {TARGET_RSS_MB:.0f} MB", f"{rss:.0f} MB peak", rss < TARGET_RSS_MB)
    return "\n".join(lines)


def plot(results: list[Result], ttft_path: Path, throughput_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(results, "sweep") + _pairs(results, "many")
    xs = [d["concurrency"] for d, _ in pairs]
    styles = {"direct": ("tab:blue", "o"), "stack": ("tab:orange", "s")}

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for index, target in enumerate(("direct", "stack")):
        color, marker = styles[target]
        label = "direct to the simulator" if target == "direct" else "through gateway + RabbitMQ + worker"
        ax.plot(xs, [p[index]["ttft_ms"]["p50"] for p in pairs], marker=marker, color=color, label=f"{label}, p50")
        ax.plot(xs, [p[index]["ttft_ms"]["p99"] for p in pairs], marker=marker, color=color, linestyle="--",
                label=f"{label}, p99")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="time to first token (ms)",
           title="Time to first token")  # fmt: skip
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ttft_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for index, target in enumerate(("direct", "stack")):
        color, marker = styles[target]
        label = "direct to the simulator" if target == "direct" else "through gateway + RabbitMQ + worker"
        ax.plot(xs, [p[index]["tokens_per_s"] for p in pairs], marker=marker, color=color, label=label)
    ax.set(xscale="log", xlabel="concurrent streams", ylabel="tokens per second (all streams)",
           title="Streaming throughput")  # fmt: skip
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(throughput_path)
    plt.close(fig)


def write_report(path: Path, env: dict[str, Any], results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ttft_png = path.with_name(path.stem + "-ttft.png")
    throughput_png = path.with_name(path.stem + "-throughput.png")
    plot(results, ttft_png, throughput_png)
    sweep, long, many = _pairs(results, "sweep"), _pairs(results, "long"), _pairs(results, "many")
    sweep_tokens = sweep[0][0]["max_tokens"] if sweep else 0
    parts = [
        "# Benchmark: streaming through dispatcher vs direct to the inference server",
        "",
        f"Generated by `dispatcher bench --report {path}` on {env['date']} (commit `{env['git']}`): "
        "every figure below comes from that one run. Re-run it to reproduce; `dispatcher bench --quick` "
        "prints the 64-stream comparison alone in under a minute.",
        "",
        "## Setup",
        "",
        f"- Machine: {env['cpu']}, **{env['cores']} cores**, {env['memory_gb']} GB RAM, Python {env['python']}. "
        "The simulator, RabbitMQ, Redis, the gateway, the worker and the load client all share these cores: "
        "that is the honest test, every hop costs CPU that the others then lack. "
        f"Load average when the run started: {', '.join(map(str, env.get('load_average', [])))}.",
        f"- Inference server: the vLLM simulator (`dispatcher simulate`), continuous batching with a decode step "
        f"of {env['decode_ms']:g} ms + 0.25 ms per running sequence (+ 5 ms when sequences are admitted), "
        f"`--max-num-seqs {env['max_num_seqs']}`. Its token rate is set by simulated time, not by CPU: direct "
        "throughput is the simulator's own ceiling (its CPU seconds are in the tables, far below the wall time), "
        "so the ratio measures what the stack loses, not what the load client or the simulator cost.",
        f"- Stack: one gateway process (uvicorn, uvloop + httptools), RabbitMQ 3.10 on this machine, one worker "
        f"with `--max-concurrency {env['worker_concurrency']}` so that no case is a queueing test; tokens in "
        f"SQLite, {'Redis on (token cache, rate-limit counters: the per-token queue cap is raised out of reach but its check runs for every request)' if env['redis'] else 'no Redis'}; "  # noqa: E501
        "default settings otherwise (5 ms reply flush interval).",
        "- Load: `python -m loadtest.load` in its own process (so its CPU is not charged to the gateway): closed "
        "loop, each user streams one chat completion after another over a keep-alive connection, with a raw "
        "asyncio HTTP client that only splits SSE events (the `openai` client would measure itself at these rates). "
        "TTFT is the time from sending the request to the first content token; inter-token latency is every gap "
        "between consecutive tokens of a stream as the client reads them; tokens/s counts tokens received in the "
        "measurement window (after a warm-up), across all streams.",
        "- CPU seconds and peak RSS are measured with psutil on the processes' PIDs over each run (warm-up "
        "included); RabbitMQ's are those of the whole local node (`beam.smp`), the load client's its own.",
        "",
        "## Targets",
        "",
        _targets(results),
        "",
        "For comparison, LiteLLM's proxy measured here with the same kind of load reached 0.21x direct at "
        "64 streams, with 1.9 s added TTFT.",
        "",
        f"## Concurrency sweep ({sweep_tokens} tokens per answer)",
        "",
        _table(sweep),
        "",
        f"![Time to first token against concurrency]({ttft_png.name})",
        "",
        f"![Throughput against concurrency]({throughput_png.name})",
        "",
    ]
    if long:
        d = long[0][0]
        parts += [
            f"## Long streams ({d['max_tokens']:,} tokens per answer)",
            "",
            f"{d['concurrency']} users each stream one answer of {d['max_tokens']:,} tokens; the whole run is "
            "measured.",
            "",
            _table(long),
            "",
        ]
    if many:
        d, s = many[0]
        parts += [
            f"## Many connections ({d['concurrency']:,} concurrent streams, {d['max_tokens']} tokens per answer)",
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
        "## Reading the figures",
        "",
        "- *tokens/s vs direct* is the stack's token rate over the direct one at the same concurrency.",
        "- Added TTFT is the difference between the stack's and the direct percentile at the same concurrency.",
        "- Errors count failed requests (non-200 status, error events, broken streams) during the whole run; "
        "streams cut at the end of a measurement window are not errors.",
        "",
    ]
    path.write_text("\n".join(parts))

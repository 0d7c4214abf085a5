"""Prometheus text exposition of the simulator's vLLM metrics (written by hand, no registry)."""

from __future__ import annotations

from llmdispatch.simulator.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(engine: Engine, model: str) -> str:
    """Return the /metrics body with the gauges and counters the worker reads."""
    lbl = f'{{model_name="{_label(model)}"}}'
    running = engine.num_running
    rows: list[tuple[str, str, str, str, float]] = [
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", "", running),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            "",
            engine.num_waiting,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            "",
            running / engine.max_num_seqs,
        ),
        (
            "vllm:prompt_tokens",
            "counter",
            "Number of prefill tokens processed.",
            "_total",
            engine.prompt_tokens_total,
        ),
        (
            "vllm:generation_tokens",
            "counter",
            "Number of generation tokens processed.",
            "_total",
            engine.generation_tokens_total,
        ),
    ]
    out: list[str] = []
    for name, kind, help_, suffix, value in rows:
        out.append(f"# HELP {name}{suffix} {help_}")
        out.append(f"# TYPE {name}{suffix} {kind}")
        out.append(f"{name}{suffix}{lbl} {float(value)!r}")
    name = "vllm:request_success_total"
    out.append(f"# HELP {name} Count of successfully processed requests.")
    out.append(f"# TYPE {name} counter")
    out.append(f'{name}{{finished_reason="length",model_name="{_label(model)}"}} {float(engine.success_total)!r}')
    return "\n".join(out) + "\n"

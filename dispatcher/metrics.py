"""Prometheus metrics of the gateway and of the worker, in one place.

Each process creates only its own set (``gateway_metrics()`` or ``worker_metrics()``), so the
gateway's ``/metrics`` does not list the worker's series and vice versa. Labels are bounded: model
(served models only), token *name* (never the secret), outcome, priority (0..10).

Outcomes: ``ok`` (answered), ``error`` (vLLM, the worker or a timeout failed it), ``cancelled``
(the client left), and at the gateway ``rejected`` (refused before it was queued: auth, validation,
unknown model, full queue, rate limit).
"""

from __future__ import annotations

import functools

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Queue wait spans milliseconds (idle) to minutes (a backlog behind a queue timeout of 300 s).
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

OUTCOMES = ("ok", "error", "cancelled", "rejected")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "dispatcher_requests",
            "Requests the gateway finished, by model, token name and outcome.",
            ["model", "token", "outcome"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "dispatcher_queue_wait_seconds",
            "Time from publishing a request to a worker accepting it.",
            ["model", "priority"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "dispatcher_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first token written to the client (queue wait included).",
            ["model", "priority"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "dispatcher_request_duration_seconds",
            "Time from a request's arrival to its end, by model and outcome.",
            ["model", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "dispatcher_prompt_tokens", "Prompt tokens vLLM reported, by model and token name.", ["model", "token"],
            registry=registry,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "dispatcher_completion_tokens",
            "Completion tokens vLLM reported, by model and token name.",
            ["model", "token"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "dispatcher_requests_in_flight",
            "Requests queued or running, seen from this gateway.",
            ["model"],
            registry=registry,
        )


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            "dispatcher_worker_requests",
            "Requests this worker finished, by model, token name and outcome.",
            ["model", "token", "outcome"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "dispatcher_worker_time_to_first_token_seconds",
            "Time from calling vLLM to its first token (queue wait excluded).",
            ["model", "priority"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "dispatcher_inter_token_latency_seconds",
            "Time between two consecutive token events of a streamed answer, as the worker receives them.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "dispatcher_worker_prompt_tokens",
            "Prompt tokens vLLM reported to this worker.",
            ["model", "token"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "dispatcher_worker_completion_tokens",
            "Completion tokens vLLM reported to this worker.",
            ["model", "token"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "dispatcher_worker_requests_in_flight", "Requests this worker is running.", ["model"], registry=registry
        )
        self.free_slots = Gauge(
            "dispatcher_worker_free_slots", "Requests this worker could take now.", ["model"], registry=registry
        )
        self.vllm_running = Gauge(
            "dispatcher_worker_vllm_requests_running",
            "vLLM's running requests (vllm:num_requests_running) as this worker last read them.",
            ["model"],
            registry=registry,
        )
        self.vllm_waiting = Gauge(
            "dispatcher_worker_vllm_requests_waiting",
            "vLLM's waiting requests (vllm:num_requests_waiting) as this worker last read them.",
            ["model"],
            registry=registry,
        )
        self.vllm_kv_cache = Gauge(
            "dispatcher_worker_vllm_kv_cache_usage_ratio",
            "vLLM's KV-cache usage, 0..1 (vllm:kv_cache_usage_perc).",
            ["model"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "dispatcher_queue_depth",
            "Messages ready in the model's RabbitMQ queue (every worker of a model reports it: use max).",
            ["model"],
            registry=registry,
        )
        self.usage_records = Counter(
            "dispatcher_usage_records",
            "Usage ledger records: sent to the stream, or dropped (stream unreachable, buffer full).",
            ["result"],
            registry=registry,
        )


@functools.cache
def gateway_metrics() -> GatewayMetrics:
    return GatewayMetrics()


@functools.cache
def worker_metrics() -> WorkerMetrics:
    return WorkerMetrics()

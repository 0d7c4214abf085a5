"""Prometheus metrics of the gateway and of the worker, in one place.

Each process creates only its own set (``gateway_metrics()`` or ``worker_metrics()``), so the
gateway's ``/metrics`` does not list the worker's series and vice versa. Labels are bounded: model
(served models only; a name no worker serves counts as ``unknown``), token *name* (never the secret;
``""`` when ``DISPATCHER_PER_TOKEN_METRICS=false``), outcome, priority (0..10).

Outcomes: ``ok`` (answered), ``error`` (vLLM, the worker or a timeout failed it), ``cancelled``
(the client left), and at the gateway ``rejected`` (refused before it was queued: auth, validation,
unknown model, full queue, rate limit). Lanes: ``normal`` and ``express`` (priorities at or above
``DISPATCHER_EXPRESS_PRIORITY``). Stream end reasons: ``STREAM_END_REASONS``.

The dashboard (deploy/helm/dispatcher/dashboards/) and the alert rules
(deploy/helm/dispatcher/templates/prometheus-rules.yaml) read these names: tests/test_prometheus.py
checks every query of both against a real Prometheus scraping a real stack.
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from llmdispatch.settings import CommonSettings

# Queue wait spans milliseconds (idle) to minutes (a backlog behind a queue timeout of 300 s).
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

OUTCOMES = ("ok", "error", "cancelled", "rejected")
LANES = ("normal", "express")

# Why a stream ended (dispatcher_streams_ended_total{reason}); a small fixed set:
# completed (END), client_left, upstream_error (vLLM or the worker sent an error), queue_timeout,
# idle (the worker stopped sending, even heartbeats), gap (frames lost in transit), attempt_lost
# (the attempt that began the answer died after its first byte), overflow (the client read too
# slowly), broker_lost (the gateway lost its broker connection).
STREAM_END_REASONS = (
    "completed", "client_left", "upstream_error", "queue_timeout", "idle", "gap", "attempt_lost", "overflow",
    "broker_lost",
)  # fmt: skip


@functools.cache
def _express_priority() -> int:
    return CommonSettings().express_priority


def lane_of(priority: int | None) -> str:
    """The lane (queue) a priority is published to, as the gateway routes it."""
    return "express" if priority is not None and priority >= _express_priority() else "normal"


# The model label of requests for a model no worker serves: the name itself would let any client
# create series at will. The gateway's log line carries the name asked for.
UNKNOWN_MODEL = "unknown"


class TokenLabelled:
    """A metric labelled (model, token, ...) whose token label is blanked when per-token metrics are off.

    Token names are tenant names: an operator who exposes metrics more widely than the tenants may
    want them gone, and many tenants multiply the series.
    """

    def __init__(self, metric: Counter, per_token: bool) -> None:
        self.metric = metric
        self.per_token = per_token

    @classmethod
    def counter(cls, per_token: bool, name: str, documentation: str, labels: list[str], **kwargs: Any) -> TokenLabelled:
        return cls(Counter(name, documentation, labels, **kwargs), per_token)

    def labels(self, model: str, token: str, *rest: str) -> Any:
        return self.metric.labels(model, token if self.per_token else "", *rest)


def _per_token() -> bool:
    return CommonSettings().per_token_metrics


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY, per_token: bool | None = None) -> None:
        per_token = _per_token() if per_token is None else per_token
        self.requests = TokenLabelled.counter(
            per_token,
            "dispatcher_requests",
            "Requests the gateway finished, by model, token name and outcome.",
            ["model", "token", "outcome"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "dispatcher_queue_wait_seconds",
            "Time from publishing a request to a worker accepting it, by model, lane and priority.",
            ["model", "lane", "priority"],
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
        self.prompt_tokens = TokenLabelled.counter(
            per_token,
            "dispatcher_prompt_tokens", "Prompt tokens vLLM reported, by model and token name.", ["model", "token"],
            registry=registry,
        )  # fmt: skip
        self.completion_tokens = TokenLabelled.counter(
            per_token,
            "dispatcher_completion_tokens",
            "Completion tokens vLLM reported, by model and token name.",
            ["model", "token"],
            registry=registry,
        )
        self.token_lookups = Counter(
            "dispatcher_token_lookups",
            "Token lookups by where they were answered: cache, negative_cache (a recently unknown token), "
            "redis, sql, refused (the per-gateway SQL lookup budget for unknown tokens was spent), or stale "
            "(the database was degraded: a token seen valid, served from its last-known row).",
            ["source"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "dispatcher_requests_in_flight",
            "Requests queued or running, seen from this gateway.",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.streams_ended = Counter(
            "dispatcher_streams_ended",
            "Streamed requests that ended, by model and reason (completed, client_left, upstream_error, "
            "queue_timeout, idle, gap, attempt_lost, overflow, broker_lost).",
            ["model", "reason"],
            registry=registry,
        )
        self.cancels = Counter(
            "dispatcher_cancels",
            "Requests the client left before their end, by model and stage: queued (no worker had it yet) "
            "or running (its worker was told to stop).",
            ["model", "stage"],
            registry=registry,
        )
        dependency_metrics()  # the gateway is where Redis and SQL are used: their series exist at 0


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY, per_token: bool | None = None) -> None:
        per_token = _per_token() if per_token is None else per_token
        self.requests = TokenLabelled.counter(
            per_token,
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
            ["model", "priority"],
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = TokenLabelled.counter(
            per_token,
            "dispatcher_worker_prompt_tokens",
            "Prompt tokens vLLM reported to this worker.",
            ["model", "token"],
            registry=registry,
        )
        self.completion_tokens = TokenLabelled.counter(
            per_token,
            "dispatcher_worker_completion_tokens",
            "Completion tokens vLLM reported to this worker.",
            ["model", "token"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "dispatcher_worker_requests_in_flight",
            "Requests this worker is running.",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.free_slots = Gauge(
            "dispatcher_worker_free_slots",
            "Requests this worker could take now.",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.vllm_running = Gauge(
            "dispatcher_worker_vllm_requests_running",
            "vLLM's running requests (vllm:num_requests_running) as this worker last read them.",
            ["model"],
            registry=registry,
            multiprocess_mode="livemax",  # the same server (queue) read by every process
        )
        self.vllm_waiting = Gauge(
            "dispatcher_worker_vllm_requests_waiting",
            "vLLM's waiting requests (vllm:num_requests_waiting) as this worker last read them.",
            ["model"],
            registry=registry,
            multiprocess_mode="livemax",  # the same server (queue) read by every process
        )
        self.vllm_kv_cache = Gauge(
            "dispatcher_worker_vllm_kv_cache_usage_ratio",
            "vLLM's KV-cache usage, 0..1 (vllm:kv_cache_usage_perc).",
            ["model"],
            registry=registry,
            multiprocess_mode="livemax",  # the same server (queue) read by every process
        )
        self.queue_depth = Gauge(
            "dispatcher_queue_depth",
            "Messages ready in the model's RabbitMQ queue of each lane (every worker of a model reports it: use max).",
            ["model", "lane"],
            registry=registry,
            multiprocess_mode="livemax",  # the same server (queue) read by every process
        )


class BrokerMetrics:
    """The AMQP links of a process (dispatcher/amqp.py), gateway and worker alike. ``link`` is the
    link's role (gateway-replies, gateway-control, worker-consumer, worker-publisher, worker-replies:
    one per gateway it answers), never a connection name."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.up = Gauge(
            "dispatcher_broker_link_up",
            "Connected AMQP links of this role in this process (1 for every role but worker-replies, "
            "which has one link per gateway it answers).",
            ["link"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.reconnects = Counter(
            "dispatcher_broker_reconnects",
            "Connections made again after a link's first one (a lost broker connection, a node failover).",
            ["link"],
            registry=registry,
        )


@functools.cache
def broker_metrics() -> BrokerMetrics:
    return BrokerMetrics()


@functools.cache
def gateway_metrics() -> GatewayMetrics:
    return GatewayMetrics()


@functools.cache
def worker_metrics() -> WorkerMetrics:
    return WorkerMetrics()


# -- dependency health (Redis, SQL): the degraded mode of dispatcher.dependency ---------------------


DEPENDENCIES = ("redis", "sql")


class DependencyMetrics:
    """Whether this process is serving without a dependency, and how often it did."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.degraded = Gauge(
            "dispatcher_dependency_degraded",
            "1 while this process serves without the dependency (redis, sql): it failed or timed out, "
            "and a background probe has not reached it since.",
            ["dependency"],
            registry=registry,
            multiprocess_mode="livemax",  # any process degraded: the service is degraded
        )
        self.fallbacks = Counter(
            "dispatcher_dependency_fallbacks",
            "Calls answered without the dependency (from in-process caches or limits, or refused) "
            "because it failed, timed out or was known to be degraded.",
            ["dependency"],
            registry=registry,
        )
        for dependency in DEPENDENCIES:  # the series exist (at 0) before anything degrades: dashboards, alerts
            self.degraded.labels(dependency).set(0)
            self.fallbacks.labels(dependency)


@functools.cache
def dependency_metrics() -> DependencyMetrics:
    return DependencyMetrics()

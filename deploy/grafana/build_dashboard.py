"""Build the Grafana dashboard of dispatcher from the panel list below.

Usage: python deploy/grafana/build_dashboard.py  (rewrites deploy/helm/dispatcher/dashboards/dispatcher.json;
deploy/grafana/dispatcher-dashboard.json is a link to it, for importing by hand).

Every panel says what a bad value means and what to do, with a link to its runbook entry in
docs/operations.md. tests/test_prometheus.py runs every query against a real Prometheus scraping a real
stack; tests/test_helm_chart.py checks that the file is this script's output and well formed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "helm" / "dispatcher" / "dashboards" / "dispatcher.json"
DOCS = "https://github.com/centralesupelec/aristote-dispatcher/blob/main/docs/operations.md"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
RI = "$__rate_interval"


def q(quantile: float, metric: str, by: str, matchers: str = M) -> str:
    return f"histogram_quantile({quantile}, sum by (le, {by}) (rate({metric}_bucket{{{matchers}}}[{RI}])))"


@dataclass
class Panel:
    title: str
    description: str  # what a bad value means and what to do
    targets: list[tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    runbook: str = ""  # anchor in docs/operations.md
    kind: str = "timeseries"
    width: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Traffic and errors",
        [
            Panel(
                "Requests/s by model and outcome",
                "Requests the gateways finished. A rise of `error` or `rejected` is the first sign of trouble: "
                "see the panels below for why.",
                [(f"sum by (model, outcome) (rate(dispatcher_requests_total{{{M}}}[{RI}]))", "{{model}} {{outcome}}")],
                unit="reqps",
                runbook="dispatchererrorratiohigh",
            ),
            Panel(
                "Error ratio",
                "Errors over answered requests (rejections excluded). Above the alert's ratio for 5 minutes "
                "DispatcherErrorRatioHigh fires: look at the stream end reasons and the worker and vLLM logs.",
                [
                    (
                        f'sum by (model) (rate(dispatcher_requests_total{{{M},outcome="error"}}[{RI}])) / '
                        "clamp_min(sum by (model) "
                        f'(rate(dispatcher_requests_total{{{M},outcome!="rejected"}}[{RI}])), 1e-9)',
                        "{{model}}",
                    )
                ],
                unit="percentunit",
                runbook="dispatchererrorratiohigh",
            ),
            Panel(
                "Streams ended, by reason",
                "Why streamed answers ended: completed is normal, client_left is the client's choice. "
                "upstream_error: vLLM or the worker failed; idle: a worker went silent; attempt_lost: a worker "
                "died mid-stream; gap: replies lost in the broker; overflow: a client read too slowly; "
                "queue_timeout: no worker took it in time; broker_lost: a gateway lost RabbitMQ.",
                [(f"sum by (reason) (rate(dispatcher_streams_ended_total{{{M}}}[{RI}]))", "{{reason}}")],
                unit="reqps",
                runbook="stream-end-reasons",
            ),
            Panel(
                "Cancels by stage",
                "Requests whose client left: queued ones never cost GPU time; running ones were aborted on "
                "the worker. Many running cancels: clients time out before answers end (raise their "
                "timeout, or look at TTFT).",
                [(f"sum by (model, stage) (rate(dispatcher_cancels_total{{{M}}}[{RI}]))", "{{model}} {{stage}}")],
                unit="reqps",
                runbook="stream-end-reasons",
            ),
            Panel(
                "Tokens per second",
                "Prompt and completion tokens vLLM reported, through the gateways. A drop with steady "
                "requests/s means shorter answers or failing requests.",
                [
                    (f"sum by (model) (rate(dispatcher_completion_tokens_total{{{M}}}[{RI}]))", "{{model}} completion"),
                    (f"sum by (model) (rate(dispatcher_prompt_tokens_total{{{M}}}[{RI}]))", "{{model}} prompt"),
                ],
                unit="short",
            ),
            Panel(
                "Requests in flight (gateways) and running (workers)",
                "In flight at the gateways = queued + running. In flight well above running: requests wait "
                "in RabbitMQ (see Queues and lanes).",
                [
                    (f"sum by (model) (dispatcher_requests_in_flight{{{M}}})", "{{model}} in flight"),
                    (f"sum by (model) (dispatcher_worker_requests_in_flight{{{M}}})", "{{model}} running"),
                ],
                runbook="dispatcherrequestswaiting",
            ),
        ],
    ),
    (
        "Latency by priority",
        [
            Panel(
                "Time to first token by priority (p50, p95)",
                "From the request's arrival at a gateway to its first token, queue wait included. Low "
                "priorities wait first under load; a high priority's TTFT growing means the model lacks "
                "capacity even for it: add pods or reserved slots.",
                [
                    (q(0.5, "dispatcher_time_to_first_token_seconds", "priority"), "p50 priority {{priority}}"),
                    (q(0.95, "dispatcher_time_to_first_token_seconds", "priority"), "p95 priority {{priority}}"),
                ],
                unit="s",
                runbook="dispatcherttftbudgetburnfast",
            ),
            Panel(
                "First tokens slower than the objective",
                "Share of streamed requests whose first token came later than the objective (the variable "
                "`TTFT objective`, a bucket bound). The TTFT burn-rate alerts page when this share spends "
                "the error budget 14.4x (1 h) or 6x (6 h) too fast.",
                [
                    (
                        "1 - sum by (model) (rate(dispatcher_time_to_first_token_seconds_bucket"
                        f'{{{M},le="$ttft_objective"}}[{RI}])) / clamp_min(sum by (model) '
                        f"(rate(dispatcher_time_to_first_token_seconds_count{{{M}}}[{RI}])), 1e-9)",
                        "{{model}}",
                    )
                ],
                unit="percentunit",
                runbook="dispatcherttftbudgetburnfast",
            ),
            Panel(
                "Inter-token latency by priority (p50, p95)",
                "Gaps between tokens as the worker receives them from vLLM. Growing with load: vLLM's batch "
                "is too large for its GPU (lower maxConcurrency); low priorities only: vLLM's priority "
                "scheduling at work.",
                [
                    (q(0.5, "dispatcher_inter_token_latency_seconds", "priority"), "p50 priority {{priority}}"),
                    (q(0.95, "dispatcher_inter_token_latency_seconds", "priority"), "p95 priority {{priority}}"),
                ],
                unit="s",
                runbook="size-maxconcurrency-against-vllms---max-num-seqs",
            ),
            Panel(
                "vLLM time to first token (worker side, p95)",
                "From the worker calling vLLM to the first token: queue wait excluded. High here but not in "
                "the queue wait: vLLM itself is slow to start requests (long prompts, a full KV cache).",
                [(q(0.95, "dispatcher_worker_time_to_first_token_seconds", "priority"), "p95 priority {{priority}}")],
                unit="s",
                runbook="size-maxconcurrency-against-vllms---max-num-seqs",
            ),
        ],
    ),
    (
        "Queues and lanes",
        [
            Panel(
                "Queue depth by lane",
                "Messages ready in each model's RabbitMQ queue, normal and express lane. Growing while "
                "workers have no free slot: the model needs more pods; growing with free slots: workers "
                "are paused (vLLM not ready or backlogged).",
                [(f"max by (model, lane) (dispatcher_queue_depth{{{M}}})", "{{model}} {{lane}}")],
                runbook="dispatcherrequestswaiting",
            ),
            Panel(
                "Queue wait by lane (p95)",
                "From publishing a request to a worker accepting it. Above the alert's threshold for 5 minutes "
                "DispatcherRequestsWaiting fires. Express high while normal is low: the reserved slots are "
                "too few for the express traffic.",
                [(q(0.95, "dispatcher_queue_wait_seconds", "model, lane"), "{{model}} {{lane}}")],
                unit="s",
                runbook="dispatcherrequestswaiting",
            ),
            Panel(
                "Queue wait by priority (p95)",
                "Priorities are strict: under load the lowest wait longest. All priorities waiting: capacity, "
                "not priority, is short.",
                [(q(0.95, "dispatcher_queue_wait_seconds", "priority"), "priority {{priority}}")],
                unit="s",
                runbook="dispatcherrequestswaiting",
            ),
        ],
    ),
    (
        "Workers and inference servers",
        [
            Panel(
                "Worker slots busy and free",
                "Requests the workers run and could take now. Free 0 with a queue: add pods. Free > 0 with a "
                "queue: the workers do not consume (vLLM not ready or backlogged, usage ledger full).",
                [
                    (f"sum by (model) (dispatcher_worker_requests_in_flight{{{M}}})", "{{model}} busy"),
                    (f"sum by (model) (dispatcher_worker_free_slots{{{M}}})", "{{model}} free"),
                ],
                runbook="scale-gateways-and-workers",
            ),
            Panel(
                "Workers per model",
                "Worker processes reporting, per model. 0 while requests wait: scale from zero did not "
                "wake the model (DispatcherModelWithoutWorkers).",
                [(f"count by (model) (dispatcher_worker_free_slots{{{M}}})", "{{model}}")],
                runbook="dispatchermodelwithoutworkers",
            ),
            Panel(
                "Inference server running and waiting",
                "vLLM's own counts as the workers read them. Waiting > 0 for long: vLLM queues internally, "
                "where priorities no longer hold: lower maxConcurrency to vLLM's --max-num-seqs.",
                [
                    (f"max by (model) (dispatcher_worker_vllm_requests_running{{{M}}})", "{{model}} running"),
                    (f"max by (model) (dispatcher_worker_vllm_requests_waiting{{{M}}})", "{{model}} waiting"),
                ],
                runbook="size-maxconcurrency-against-vllms---max-num-seqs",
            ),
            Panel(
                "Inference server KV-cache usage",
                "Near 1: vLLM preempts sequences and latency jumps; lower maxConcurrency or --max-model-len.",
                [(f"max by (model) (dispatcher_worker_vllm_kv_cache_usage_ratio{{{M}}})", "{{model}}")],
                unit="percentunit",
                runbook="size-maxconcurrency-against-vllms---max-num-seqs",
            ),
        ],
    ),
    (
        "Tenants",
        [
            Panel(
                "Top 10 tokens by completion tokens/s",
                "Who uses the GPUs (token names; empty when metrics.perTokenLabels is off). One tenant "
                "dominating while others wait: give it a lower priority or limits (docs/tenancy.md).",
                [
                    (
                        f"topk(10, sum by (token) (rate(dispatcher_completion_tokens_total{{{M}}}[{RI}])))",
                        "{{token}}",
                    )
                ],
            ),
            Panel(
                "Top 10 tokens by requests/s",
                "Requests per token name, any outcome.",
                [(f"topk(10, sum by (token) (rate(dispatcher_requests_total{{{M}}}[{RI}])))", "{{token}}")],
                unit="reqps",
            ),
            Panel(
                "Rejections by token (429 limits, auth, full queue)",
                "Requests refused before the queue, per token: rate limits (429), a full queue (429/503), "
                "a bad key or body (4xx). One token: its limits are too tight or it misbehaves; all tokens: "
                "the queue is full (capacity).",
                [
                    (
                        "topk(10, sum by (token) (rate(dispatcher_requests_total"
                        f'{{model=~"$model|unknown",outcome="rejected"}}[{RI}])))',
                        "{{token}}",
                    )
                ],
                unit="reqps",
            ),
        ],
    ),
    (
        "Broker, Redis, SQL and ledger health",
        [
            Panel(
                "Broker links up",
                "Connected AMQP links by role, summed over processes (worker-replies: one per gateway "
                "answered). A role at 0: those processes cannot reach RabbitMQ (DispatcherBrokerLinkDown).",
                [("sum by (link) (dispatcher_broker_link_up)", "{{link}}")],
                runbook="dispatcherbrokerlinkdown",
            ),
            Panel(
                "Broker reconnects",
                "Connections made again after a loss or a node failover. A steady rate: a flapping network, "
                "a load balancer cutting idle connections, or a broker under memory alarm.",
                [(f"sum by (link) (increase(dispatcher_broker_reconnects_total[{RI}]))", "{{link}}")],
                runbook="dispatcherbrokerlinkdown",
            ),
            Panel(
                "Redis and SQL degraded",
                "1 while a gateway works without that dependency (cached tokens only, in-process limits). "
                "It ends by itself when the dependency answers again (DispatcherDependencyDegraded).",
                [("max by (dependency) (dispatcher_dependency_degraded)", "{{dependency}}")],
                runbook="dispatcherdependencydegraded",
            ),
            Panel(
                "Dependency fallbacks and token lookups",
                "Calls answered without Redis or SQL, and where token lookups were answered. Lookups moving "
                "from cache/redis to sql: Redis is down or was flushed.",
                [
                    (
                        f"sum by (dependency) (rate(dispatcher_dependency_fallbacks_total[{RI}]))",
                        "fallback {{dependency}}",
                    ),
                    (f"sum by (source) (rate(dispatcher_token_lookups_total[{RI}]))", "lookup {{source}}"),
                ],
                unit="ops",
                runbook="dispatcherdependencydegraded",
            ),
            Panel(
                "Usage ledger: unconfirmed bytes and oldest record",
                "Usage records in the workers' write-ahead logs that the RabbitMQ stream has not confirmed. "
                "Growing: the stream is unreachable; at DISPATCHER_USAGE_WAL_MAX_BYTES workers stop taking "
                "requests (DispatcherUsageLedgerBacklog, DispatcherUsageLedgerFull).",
                [
                    ("sum(dispatcher_usage_ledger_pending_bytes)", "pending bytes"),
                    ("max(dispatcher_usage_ledger_oldest_pending_seconds)", "oldest (s)"),
                ],
                runbook="dispatcherusageledgerbacklog",
            ),
            Panel(
                "Usage ledger records/s",
                "Records appended to the logs, confirmed by the stream, replayed at start, late (sent after "
                "their request ended) or unlogged (the disk refused them). late or unlogged above 0: look at "
                "the stream and the workers' disks.",
                [(f"sum by (result) (rate(dispatcher_usage_ledger_records_total[{RI}]))", "{{result}}")],
                unit="ops",
                runbook="dispatcherusageledgerbacklog",
            ),
        ],
    ),
]


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    link = f"{DOCS}#{panel.runbook}" if panel.runbook else DOCS
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": f"{panel.description} Runbook: {link}",
        "datasource": DS,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "links": [{"title": "Runbook", "url": link, "targetBlank": True}],
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
        **panel.extra,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row in ROWS:
        panels.append(
            {"id": len(panels) + 1, "type": "row", "title": title, "collapsed": False, "panels": []}
            | {"gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        )
        y += 1
        x = 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, len(panels) + 1, x, y))
            x += panel.width
        y += 8
    return {
        "__inputs": [],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "title": "dispatcher",
        "uid": "dispatcher-overview",
        "description": "dispatcher gateways and workers: traffic and errors, latency by priority, queues and "
        "lanes, workers and inference servers, tenants, and the health of the broker, Redis, SQL and the "
        "usage ledger. Each panel's description says what a bad value means; runbooks: " + DOCS,
        "tags": ["dispatcher", "llm", "vllm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 2,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "links": [{"title": "Runbooks", "url": DOCS, "type": "link", "targetBlank": True}],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(dispatcher_requests_total, model)", "refId": "model"},
                    "definition": "label_values(dispatcher_requests_total, model)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "refresh": 2,
                    "sort": 1,
                    "current": {"text": "All", "value": "$__all"},
                },
                {
                    "name": "ttft_objective",
                    "label": "TTFT objective (s)",
                    "type": "custom",
                    # Bucket bounds of dispatcher_time_to_first_token_seconds, as Prometheus writes them.
                    "query": "0.5,1.0,2.5,5.0,10.0",
                    "current": {"text": "2.5", "value": "2.5"},
                    "options": [],
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())


if __name__ == "__main__":
    main()

"""Metrics, the per-request log line, trace context and the Grafana dashboard, on a real stack."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack import STREAM_URL, Stack, delete_stream, run_sync

MAX_CONCURRENCY = 4


@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stream = "test-usage-" + uuid.uuid4().hex[:10]
    stack = Stack(
        tmp_path_factory.mktemp("obs"),
        env={
            "DISPATCHER_USAGE_STREAM_URL": STREAM_URL,
            "DISPATCHER_USAGE_STREAM_NAME": stream,
            "DISPATCHER_LOG_FORMAT": "json",
        },
    )
    try:
        stack.start_simulator(max_num_seqs=16, decode_ms=2)
        stack.worker = stack.start_worker(max_concurrency=MAX_CONCURRENCY)  # type: ignore[attr-defined]
        stack.gateway = stack.start_gateway()  # type: ignore[attr-defined]
        stack.secret = stack.add_token("obs-metrics", priority=3)  # type: ignore[attr-defined]
        yield stack
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and wanted <= lbl)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def chat(stack: Stack, *, stream: bool, max_tokens: int = 12, **extra: object) -> dict[str, object]:
    return {
        "model": stack.model,
        "messages": [{"role": "user", "content": "Count the tokens of this sentence please"}],
        "max_tokens": max_tokens,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        **extra,
    }


def sse_usage(raw: bytes) -> dict[str, int]:
    """The usage object of the stream's usage chunk."""
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage":{' in event:
            return json.loads(event[6:])["usage"]
    raise AssertionError("no usage chunk")


async def test_metrics_move_by_the_right_amounts(obs: Stack) -> None:
    model, secret = obs.model, obs.secret  # type: ignore[attr-defined]
    gateway, worker = obs.gateway_url, obs.worker.url  # type: ignore[attr-defined]
    before_g, before_w = scrape(gateway), scrape(worker)
    auth = {"Authorization": f"Bearer {secret}"}
    prompt = completion = 0
    async with httpx.AsyncClient(base_url=gateway, headers=auth, timeout=30) as client:
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=chat(obs, stream=True))
            assert r.status_code == 200
            usage = sse_usage(r.content)
            prompt += usage["prompt_tokens"]
            completion += usage["completion_tokens"]
        r = await client.post("/v1/chat/completions", json=chat(obs, stream=False, max_tokens=5))
        assert r.status_code == 200
        prompt += r.json()["usage"]["prompt_tokens"]
        completion += r.json()["usage"]["completion_tokens"]
        failed = await client.post("/v1/chat/completions", json=chat(obs, stream=False, user="simulate-error-500"))
        assert failed.status_code == 500
        unknown = await client.post("/v1/chat/completions", json={**chat(obs, stream=False), "model": "no-such-model"})
        assert unknown.status_code == 404 and unknown.headers["x-request-id"].startswith("req-")
    assert completion == 3 * 12 + 5
    after_g, after_w = scrape(gateway), scrape(worker)

    tok = {"model": model, "token": "obs-metrics"}
    assert delta(before_g, after_g, "dispatcher_requests_total", **tok, outcome="ok") == 4
    assert delta(before_g, after_g, "dispatcher_requests_total", **tok, outcome="error") == 1
    rejected = {"model": "unknown", "token": "obs-metrics", "outcome": "rejected"}  # a model nobody serves
    assert delta(before_g, after_g, "dispatcher_requests_total", **rejected) == 1
    assert delta(before_g, after_g, "dispatcher_prompt_tokens_total", **tok) == prompt
    assert delta(before_g, after_g, "dispatcher_completion_tokens_total", **tok) == completion
    prio = {"model": model, "priority": "3"}
    assert delta(before_g, after_g, "dispatcher_time_to_first_token_seconds_count", **prio) == 3
    assert delta(before_g, after_g, "dispatcher_queue_wait_seconds_count", **prio) == 5
    assert delta(before_g, after_g, "dispatcher_request_duration_seconds_count", model=model) == 5
    # Each streamed answer of 12 tokens: 11 gaps between token events.
    assert delta(before_w, after_w, "dispatcher_inter_token_latency_seconds_count", model=model) == 3 * 11
    assert delta(before_w, after_w, "dispatcher_inter_token_latency_seconds_sum", model=model) > 0
    assert delta(before_w, after_w, "dispatcher_worker_time_to_first_token_seconds_count", **prio) == 3
    assert delta(before_w, after_w, "dispatcher_worker_requests_total", **tok, outcome="ok") == 4
    assert delta(before_w, after_w, "dispatcher_worker_requests_total", **tok, outcome="error") == 1
    assert delta(before_w, after_w, "dispatcher_worker_completion_tokens_total", **tok) == completion
    assert delta(before_w, after_w, "dispatcher_worker_prompt_tokens_total", **tok) == prompt
    # Everything has ended: nothing in flight, every slot free; vLLM's gauges read as 0 when idle.
    assert value(after_g, "dispatcher_requests_in_flight", model=model) == 0
    assert value(after_w, "dispatcher_worker_requests_in_flight", model=model) == 0
    assert value(after_w, "dispatcher_worker_free_slots", model=model) == MAX_CONCURRENCY
    for gauge in (
        "dispatcher_worker_vllm_requests_running",
        "dispatcher_worker_vllm_requests_waiting",
        "dispatcher_worker_vllm_kv_cache_usage_ratio",
        "dispatcher_queue_depth",
    ):
        assert ("model", model) in next(lbl for (n, lbl) in after_w if n == gauge), gauge


async def test_stream_end_reasons_cancels_and_links(obs: Stack) -> None:
    """Why streams ended (completed, upstream_error, client_left), cancels by stage, the broker links
    and the queue depth per lane."""
    model, gateway = obs.model, obs.gateway_url
    before = scrape(gateway)
    auth = {"Authorization": f"Bearer {obs.secret}"}  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=gateway, headers=auth, timeout=30) as client:
        ok = await client.post("/v1/chat/completions", json=chat(obs, stream=True))
        failed = await client.post("/v1/chat/completions", json=chat(obs, stream=True, user="simulate-error-500"))
        assert ok.status_code == 200 and failed.status_code == 500
        async with client.stream("POST", "/v1/chat/completions", json=chat(obs, stream=True, max_tokens=2000)) as r:
            await anext(r.aiter_bytes())  # a token arrived: the client leaves mid-stream
    for _ in range(50):  # the gateway counts the departure when it notices it
        after = scrape(gateway)
        if delta(before, after, "dispatcher_streams_ended_total", model=model, reason="client_left"):
            break
        await asyncio.sleep(0.1)
    ended = {
        reason: delta(before, after, "dispatcher_streams_ended_total", model=model, reason=reason)
        for reason in ("completed", "upstream_error", "client_left")
    }
    assert ended == {"completed": 1, "upstream_error": 1, "client_left": 1}
    assert delta(before, after, "dispatcher_cancels_total", model=model, stage="running") == 1
    assert delta(before, after, "dispatcher_cancels_total", model=model, stage="queued") == 0
    assert value(after, "dispatcher_broker_link_up", link="gateway-replies") == 1
    assert value(after, "dispatcher_broker_link_up", link="gateway-control") == 1
    worker = scrape(obs.worker.url)  # type: ignore[attr-defined]
    assert value(worker, "dispatcher_broker_link_up", link="worker-consumer") == 1
    assert ("dispatcher_broker_reconnects_total", frozenset({("link", "worker-consumer")})) in worker
    for lane in ("normal", "express"):
        assert ("dispatcher_queue_depth", frozenset({("model", model), ("lane", lane)})) in worker, lane


async def test_in_flight_gauges_while_streaming(obs: Stack) -> None:
    """Gauges read the state of the moment: two long streams in flight show up on both sides."""
    auth = {"Authorization": f"Bearer {obs.secret}"}  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=obs.gateway_url, headers=auth, timeout=30) as client:
        body = chat(obs, stream=True, max_tokens=2000)
        async with client.stream("POST", "/v1/chat/completions", json=body) as one:
            async with client.stream("POST", "/v1/chat/completions", json=body) as two:
                # Keep the iterators: a dropped one closes its response.
                first, second = one.aiter_bytes(), two.aiter_bytes()
                await anext(first)
                await anext(second)
                gateway, worker = scrape(obs.gateway_url), scrape(obs.worker.url)  # type: ignore[attr-defined]
    assert value(gateway, "dispatcher_requests_in_flight", model=obs.model) == 2
    assert value(worker, "dispatcher_worker_requests_in_flight", model=obs.model) == 2
    assert value(worker, "dispatcher_worker_free_slots", model=obs.model) == MAX_CONCURRENCY - 2
    assert value(worker, "dispatcher_worker_vllm_requests_running", model=obs.model) >= 0


def gateway_lines(stack: Stack) -> list[dict[str, object]]:
    lines = []
    for line in stack.gateway.log().splitlines():  # type: ignore[attr-defined]
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def test_one_log_line_per_request_without_the_secret(obs: Stack) -> None:
    secret = obs.secret  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=obs.gateway_url, timeout=30) as client:
        ok = await client.post(
            "/v1/chat/completions", json=chat(obs, stream=True), headers={"Authorization": f"Bearer {secret}"}
        )
        denied = await client.post(
            "/v1/chat/completions", json=chat(obs, stream=False), headers={"Authorization": "Bearer sk-wrong-secret"}
        )
    assert ok.status_code == 200 and denied.status_code == 401
    rid = ok.headers["x-request-id"]
    lines = [e for e in gateway_lines(obs) if e.get("message") == "request"]
    mine = [e for e in lines if e["request_id"] == rid]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["model"] == obs.model and entry["token"] == "obs-metrics" and entry["priority"] == 3
    assert entry["outcome"] == "ok" and entry["status"] == 200 and entry["stream"] is True
    assert entry["completion_tokens"] == 12 and entry["prompt_tokens"] > 0
    assert 0 <= entry["queue_wait_s"] <= entry["ttft_s"] <= entry["duration_s"]  # type: ignore[operator]
    refused = [e for e in lines if e["request_id"] == denied.headers["x-request-id"]]
    assert len(refused) == 1 and refused[0]["outcome"] == "rejected" and refused[0]["status"] == 401
    log = obs.gateway.log() + obs.worker.log()  # type: ignore[attr-defined]
    assert secret not in log and "sk-wrong-secret" not in log


async def test_traceparent_reaches_vllm(obs: Stack) -> None:
    traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    headers = {"Authorization": f"Bearer {obs.secret}", "traceparent": traceparent}  # type: ignore[attr-defined]
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(obs.gateway_url + "/v1/chat/completions", json=chat(obs, stream=True), headers=headers)
        assert r.status_code == 200
        stats = (await client.get(obs.simulator_url + "/sim/stats")).json()
    events = [e for e in stats["log"] if e["request_id"] == r.headers["x-request-id"]]
    assert events and all(e["traceparent"] == traceparent for e in events)

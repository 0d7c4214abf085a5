"""Reliability against real processes: cancellation, worker death, queue time limits and back-pressure.

Each group starts its own simulator, workers and gateway (tests/stack.py) with settings small
enough to see the faults quickly; the simulator's event log tells what reached "the GPU".
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faults import chat, events_of, post, queued_is, read_stream, sim_log, until, until_event
from tests.stack import Process, Stack


def _free_slots(worker: Process) -> int:
    import json

    try:
        with urllib.request.urlopen(worker.url + "/ready", timeout=1) as response:  # type: ignore[attr-defined]
            return int(json.loads(response.read())["free_slots"])
    except urllib.error.HTTPError as exc:
        return int(json.loads(exc.read())["free_slots"])


# -- 1. cancellation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cancel_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One sequence at a time in "vLLM", two in the worker: the second waits inside vLLM."""
    stack = Stack(tmp_path_factory.mktemp("cancel"))
    try:
        stack.serve(max_num_seqs=1, max_concurrency=2, token="cancel")
        yield stack
    finally:
        stack.close()


async def test_disconnect_in_flight_aborts_vllm_at_once(cancel_stack: Stack) -> None:
    stack, token = cancel_stack, cancel_stack.token  # type: ignore[attr-defined]
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=30) as http:
        # Streamed: read a few tokens, hang up, and find the abort in the simulator's log.
        result = await read_stream(http, stack, chat("inflight-stream", 3000, model=stack.model), token, stop_after=5)
        closed_at = result.ended_at
        aborted = await until_event(http, stack, "inflight-stream", "aborted")
        latencies.append(aborted["t"] - closed_at)

        # Not streamed: the client gives up while vLLM generates.
        body = chat("inflight-whole", 3000, model=stack.model, stream=False)
        task = asyncio.create_task(post(http, stack, body, token))
        await until_event(http, stack, "inflight-whole", "started")
        task.cancel()
        closed_at = time.monotonic()
        aborted = await until_event(http, stack, "inflight-whole", "aborted")
        latencies.append(aborted["t"] - closed_at)
        log = await sim_log(http, stack)
    print(f"\nin-flight disconnect -> vLLM abort: streamed {latencies[0] * 1000:.0f} ms, "
          f"non-streamed {latencies[1] * 1000:.0f} ms")  # fmt: skip
    assert "finished" not in events_of(log, "inflight-stream") + events_of(log, "inflight-whole")
    assert max(latencies) < 2.0  # the issue asks for 100 ms; the bound is loose for a loaded CI box


async def test_disconnect_before_first_byte_costs_no_gpu_work(cancel_stack: Stack) -> None:
    """Queued in RabbitMQ, or dequeued but waiting inside vLLM: hanging up means it never runs."""
    stack, token = cancel_stack, cancel_stack.token  # type: ignore[attr-defined]
    async with httpx.AsyncClient(timeout=30) as http:
        await http.post(stack.simulator_url + "/sim/reset")
        blocker = asyncio.create_task(post(http, stack, chat("blocker", 150, model=stack.model, stream=False), token))
        await until_event(http, stack, "blocker", "started")
        # The worker's second slot: dequeued and sent to vLLM, where it waits behind the blocker.
        in_vllm = asyncio.create_task(read_stream(http, stack, chat("in-vllm", 20, model=stack.model), token))
        await until_event(http, stack, "in-vllm", "queued")
        # The worker is full: these wait in RabbitMQ.
        queued = [
            asyncio.create_task(read_stream(http, stack, chat("queued-stream", 20, model=stack.model), token)),
            asyncio.create_task(post(http, stack, chat("queued-whole", 20, model=stack.model, stream=False), token)),
        ]
        await asyncio.sleep(0.5)
        for task in (in_vllm, *queued):
            task.cancel()
        await asyncio.gather(in_vllm, *queued, return_exceptions=True)
        assert (await blocker).status_code == 200
        # The slot goes to the next request, not to the abandoned ones.
        after = await post(http, stack, chat("after", 5, model=stack.model, stream=False), token)
        assert after.status_code == 200
        stats = (await http.get(stack.simulator_url + "/sim/stats")).json()
    log = stats["log"]
    assert events_of(log, "in-vllm") == ["queued", "aborted"]
    assert events_of(log, "queued-stream") == events_of(log, "queued-whole") == []
    assert [e["user"] for e in log if e["event"] == "started"] == ["blocker", "after"]
    assert stats["started"] == 2 and stats["aborted"] == 1


# -- 2. worker death ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def death_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("death"),
        env={"DISPATCHER_IDLE_TIMEOUT": "3", "DISPATCHER_HEARTBEAT_INTERVAL": "0.5"},
    )
    try:
        stack.start_simulator(max_num_seqs=1, decode_ms=10)
        stack.workers = [stack.start_worker(max_concurrency=1), stack.start_worker(max_concurrency=1)]  # type: ignore[attr-defined]
        stack.start_gateway()
        stack.token = stack.add_token("death", priority=5)  # type: ignore[attr-defined]
        yield stack
    finally:
        stack.close()


def _busy_worker(stack: Stack) -> Process:
    busy = [w for w in stack.workers if w.alive() and _free_slots(w) == 0]  # type: ignore[attr-defined]
    assert len(busy) == 1, "expected exactly one worker to hold the request"
    return busy[0]


async def test_worker_killed_before_output_is_redelivered(death_stack: Stack) -> None:
    stack, token = death_stack, death_stack.token  # type: ignore[attr-defined]
    async with httpx.AsyncClient(timeout=30) as http:
        # Occupy "vLLM" directly, so that our request waits inside it with no output yet. It lasts
        # longer than the gateway's idle limit: heartbeats must keep the redelivered stream alive.
        direct_body = chat("direct-blocker", 450, model=stack.model)
        blocker = asyncio.create_task(http.post(stack.simulator_url + "/v1/chat/completions", json=direct_body))
        await until_event(http, stack, "direct-blocker", "started")
        reader = asyncio.create_task(read_stream(http, stack, chat("redelivered", 8, model=stack.model), token))
        await until_event(http, stack, "redelivered", "queued")
        victim = _busy_worker(stack)
        victim.kill()
        result = await reader
        await blocker
        log = await sim_log(http, stack)
    stack.workers.remove(victim)  # type: ignore[attr-defined]
    assert result.status == 200 and result.done and not result.errors
    assert len(result.text().split()) == 8
    assert sum(1 for d in result.data if d["choices"] and d["choices"][0]["delta"].get("role")) == 1
    # The first copy was aborted with its worker; the second one ran once.
    assert events_of(log, "redelivered") == ["queued", "aborted", "queued", "started", "first_output", "finished"]


async def test_worker_killed_mid_stream_ends_with_error_event(death_stack: Stack) -> None:
    stack, token = death_stack, death_stack.token  # type: ignore[attr-defined]
    stack.workers.append(stack.start_worker(max_concurrency=1))  # type: ignore[attr-defined]
    async with httpx.AsyncClient(timeout=30) as http:
        # Another worker is there: it receives the redelivery, which the gateway must refuse.
        reader = asyncio.create_task(read_stream(http, stack, chat("mid-stream", 2000, model=stack.model), token))
        await until_event(http, stack, "mid-stream", "started")
        await asyncio.sleep(0.3)
        victim = _busy_worker(stack)
        killed_at = time.monotonic()
        victim.kill()
        stack.workers.remove(victim)  # type: ignore[attr-defined]
        result = await asyncio.wait_for(reader, 20)
        ended_after = result.ended_at - killed_at
        await asyncio.sleep(0.5)
        log = await sim_log(http, stack)

        # Nobody left to redeliver to: the gateway's idle limit ends the stream.
        reader = asyncio.create_task(read_stream(http, stack, chat("orphan", 2000, model=stack.model), token))
        await until_event(http, stack, "orphan", "started")
        await asyncio.sleep(0.3)
        last = _busy_worker(stack)
        killed_at = time.monotonic()
        last.kill()
        orphan = await asyncio.wait_for(reader, 20)
    print(f"\nworker killed mid-stream -> error event after {ended_after:.2f} s (redelivery refused), "
          f"{orphan.ended_at - killed_at:.2f} s (idle limit 3 s)")  # fmt: skip
    for res in (result, orphan):
        assert res.status == 200 and res.done and len(res.text().split()) > 0
        assert res.errors and res.errors[0]["message"]
    assert orphan.ended_at - killed_at < 15
    # The redelivered copy never produced a second answer.
    assert events_of(log, "mid-stream").count("finished") == 0


# -- 5. time limits and back-pressure -----------------------------------------------------------


@pytest.fixture(scope="module")
def limits_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("limits"),
        env={
            "DISPATCHER_QUEUE_TIMEOUT": "2",
            "DISPATCHER_KEEPALIVE_INTERVAL": "0.3",
            "DISPATCHER_MAX_QUEUE_LENGTH": "2",
        },
    )
    try:
        stack.serve(max_num_seqs=1, max_concurrency=1, token="limits")
        yield stack
    finally:
        stack.close()


def queue_timeouts(stack: Stack) -> float:
    with urllib.request.urlopen(stack.gateway_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dispatcher_streams_ended_total" and sample.labels["reason"] == "queue_timeout"
    )


async def test_queue_timeout_and_full_queue(limits_stack: Stack) -> None:
    stack, token = limits_stack, limits_stack.token  # type: ignore[attr-defined]
    before = queue_timeouts(stack)
    async with httpx.AsyncClient(timeout=30) as http:
        blocker = asyncio.create_task(post(http, stack, chat("blocker", 350, model=stack.model, stream=False), token))
        await until_event(http, stack, "blocker", "started")
        streamed = asyncio.create_task(read_stream(http, stack, chat("late-stream", 5, model=stack.model), token))
        whole = asyncio.create_task(post(http, stack, chat("late-whole", 5, model=stack.model, stream=False), token))
        await until(lambda: queued_is(stack, 2), 10, "both late requests queued")  # the queue is full now
        full = await post(http, stack, chat("too-many", 5, model=stack.model, stream=False), token)
        timed_out, late = await streamed, await whole
        assert (await blocker).status_code == 200
        after = await post(http, stack, chat("after", 5, model=stack.model, stream=False), token)
        log = await sim_log(http, stack)
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
    assert full.json()["error"]["code"] == "queue_full"
    assert late.status_code == 504 and late.json()["error"]["code"] == "queue_timeout"
    # The stream was committed while it waited: comment lines, then an SSE error event.
    assert timed_out.status == 200 and timed_out.comments >= 3
    assert timed_out.errors[0]["code"] == "queue_timeout" and timed_out.done
    assert queue_timeouts(stack) - before == 1  # the stream's end reason, on the gateway's /metrics
    assert after.status_code == 200
    # Never served afterwards.
    assert events_of(log, "late-stream") == events_of(log, "late-whole") == events_of(log, "too-many") == []

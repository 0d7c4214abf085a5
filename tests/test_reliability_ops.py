"""Reliability in operations: vLLM down and back, rolling worker restart, gateway drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.faults import chat, events_of, post, queued_is, read_stream, sim_log, until, until_event
from tests.stack import Process, Stack, wait_http


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


# -- 4. vLLM down ------------------------------------------------------------------------------------


async def test_vllm_down_pauses_the_queue_in_priority_order(make_stack: type[Stack]) -> None:
    stack = make_stack(env={"DISPATCHER_EXPRESS_PRIORITY": "11"})  # one queue: its priority order
    simulator = stack.start_simulator(max_num_seqs=1, decode_ms=5)
    worker = stack.start_worker(max_concurrency=1)
    stack.start_gateway()
    low, high = stack.add_token("low", priority=1), stack.add_token("high", priority=9)
    port = stack.simulator_url.rsplit(":", 1)[1]

    simulator.kill()
    await until(lambda: _status(worker.url + "/ready") == 503, what="worker not-ready while vLLM is down")  # type: ignore[attr-defined]
    assert _status(stack.gateway_url + "/ready") == 200  # the gateway itself can still queue
    async with httpx.AsyncClient(timeout=60) as http:
        tasks = []
        for i in range(3):  # one at a time: requests sent together may reach the queue in either order
            body = chat(f"low-{i}", 5, model=stack.model, stream=False)
            tasks.append(asyncio.create_task(post(http, stack, body, low)))
            await until(lambda n=i + 1: queued_is(stack, n), 10, f"low-{i} queued")
        tasks.append(asyncio.create_task(post(http, stack, chat("high", 5, model=stack.model, stream=False), high)))
        await until(lambda: queued_is(stack, 4), 10, "high queued")
        await asyncio.sleep(1.0)
        assert not any(task.done() for task in tasks)  # waiting in the queue, not failing

        stack.spawn("simulator", "simulate", "--model", stack.model, "--port", port, "--max-num-seqs", "1")
        wait_http(stack.simulator_url + "/health")
        answers = await asyncio.gather(*tasks)
        log = await sim_log(http, stack)
    assert [a.status_code for a in answers] == [200] * 4
    assert [e["user"] for e in log if e["event"] == "started"] == ["high", "low-0", "low-1", "low-2"]
    assert _status(worker.url + "/ready") == 200  # type: ignore[attr-defined]


# -- 6. graceful shutdown -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drain_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("drain"), env={"DISPATCHER_DRAIN_DELAY": "1.5"})
    try:
        stack.serve(max_num_seqs=8, max_concurrency=2, token="drain")
        yield stack
    finally:
        stack.close()


async def test_rolling_worker_restart_loses_nothing(drain_stack: Stack) -> None:
    stack, token = drain_stack, drain_stack.token  # type: ignore[attr-defined]
    old: Process = next(p for p in stack.processes if p.name == "worker")
    async with httpx.AsyncClient(timeout=60) as http:
        readers = [
            asyncio.create_task(read_stream(http, stack, chat(f"roll-{i}", 120, model=stack.model), token))
            for i in range(6)
        ]
        await until_event(http, stack, "roll-0", "started")
        new = await asyncio.to_thread(stack.start_worker, 2)
        running = await sim_log(http, stack)
        busy_at_sigterm = sum(1 for i in range(6) if "started" in events_of(running, f"roll-{i}"))
        old.popen.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*readers), 45)
        exit_code = await asyncio.to_thread(old.popen.wait, 30)
        log = await sim_log(http, stack)
    assert busy_at_sigterm >= 1
    for result in results:
        assert result.status == 200 and result.done and not result.errors
        assert len(result.text().split()) == 120
    # Each request ran exactly once: nothing lost, nothing duplicated.
    for i in range(6):
        assert events_of(log, f"roll-{i}").count("started") == 1
    assert exit_code == 0 and "stopping" in old.log()
    assert new.alive()


async def test_gateway_drains_its_streams_on_sigterm(drain_stack: Stack) -> None:
    stack, token = drain_stack, drain_stack.token  # type: ignore[attr-defined]
    gateway: Process = next(p for p in stack.processes if p.name == "gateway")
    async with httpx.AsyncClient(timeout=60) as http:
        reader = asyncio.create_task(read_stream(http, stack, chat("long", 250, model=stack.model), token))
        await until_event(http, stack, "long", "started")
        gateway.popen.send_signal(signal.SIGTERM)
        await until(lambda: _status(stack.gateway_url + "/ready") == 503, 5, "gateway /ready 503 while draining")
        # Still answering during the drain delay (a load balancer may route a last request).
        late = await post(http, stack, chat("late", 3, model=stack.model, stream=False), token)
        result = await asyncio.wait_for(reader, 30)
        started = time.monotonic()
        await asyncio.to_thread(gateway.popen.wait, 30)
    assert late.status_code == 200
    assert result.status == 200 and result.done and not result.errors
    assert len(result.text().split()) == 250
    assert time.monotonic() - started < 10
    assert _status(stack.gateway_url + "/ready") == 0  # no longer listening

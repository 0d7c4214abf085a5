"""Priority scheduling as vLLM does it (simulator), and the worker headroom that starts a high request at once.

Simulator tests run it over a real port (tests/test_simulator.py's SimServer); the last tests run the
whole stack (simulator, worker, gateway as processes, RabbitMQ) and read the simulator's event log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from llmdispatch.simulator.app import create_app
from tests.stack import Stack
from tests.test_simulator import SimServer, make_server, metric_values, stats, wait_for

__all__ = ["make_server"]  # the fixture, imported for this module's tests


def body(user: str, max_tokens: int, priority: int | None = None, prompt: str = "one") -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "user": user}
    if priority is not None:
        out["priority"] = priority
    return out


async def stream_text(client: httpx.AsyncClient, payload: dict[str, Any]) -> str:
    """The streamed completion text (the simulator's /v1/completions)."""
    parts: list[str] = []
    async with client.stream("POST", "/v1/completions", json=payload) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                parts.extend(choice["text"] for choice in json.loads(line[6:])["choices"])
    return "".join(parts)


def events(log: list[dict[str, Any]], kind: str) -> list[str]:
    return [e["user"] for e in log if e["event"] == kind]


async def test_fcfs_policy_orders_by_arrival_and_refuses_priority(make_server: Callable[..., SimServer]) -> None:
    server = make_server(scheduling_policy="fcfs", max_num_seqs=1, decode_ms=5, decode_ms_per_seq=0, prefill_ms=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "priority": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
        first = asyncio.create_task(stream_text(client, body("first", 60)))
        await wait_for(lambda: _running_waiting(client, (1, 0)))
        later = []
        for n, user in enumerate(["second", "third"], start=1):
            later.append(asyncio.create_task(stream_text(client, body(user, 2))))
            await wait_for(lambda n=n: _running_waiting(client, (1, n)))
        m = await metric_values(client)
        assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (1, 2)
        await asyncio.gather(first, *later)
        s = await stats(client)
        assert s["policy"] == "fcfs" and s["preempted"] == 0
        assert events(s["log"], "started") == ["first", "second", "third"]


async def test_priority_policy_reorders_waiting_but_never_displaces_running(
    make_server: Callable[..., SimServer],
) -> None:
    """vLLM's V1 scheduler: a waiting high request takes the next free slot; a full batch is not preempted."""
    server = make_server(max_num_seqs=2, decode_ms=5, decode_ms_per_seq=0, prefill_ms=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        # One at a time: two requests sent at once may reach the server in either order. The short one
        # (0.75 s) outlasts the four round trips below even on a busy machine; the long one outlasts it.
        short = asyncio.create_task(stream_text(client, body("low-short", 150, priority=5)))
        await wait_for(lambda: _running_waiting(client, (1, 0)))
        long = asyncio.create_task(stream_text(client, body("low-long", 400, priority=5)))
        await wait_for(lambda: _running_waiting(client, (2, 0)))
        queued = asyncio.create_task(stream_text(client, body("low-queued", 2, priority=5)))
        await wait_for(lambda: _running_waiting(client, (2, 1)))
        high = asyncio.create_task(stream_text(client, body("high", 2, priority=0)))
        await wait_for(lambda: _running_waiting(client, (2, 2)))
        await asyncio.gather(short, queued, high, long)
        s = await stats(client)
        assert s["preempted"] == 0
        log = s["log"]
        assert events(log, "started") == ["low-short", "low-long", "high", "low-queued"]
        # The high request started only when the short one ended: it waited for a slot.
        order = [(e["event"], e["user"]) for e in log if e["event"] in ("started", "finished")]
        assert order.index(("started", "high")) == order.index(("finished", "low-short")) + 1


@pytest.mark.parametrize(
    ("policy", "priorities", "first_victim"),
    [
        # priority: the running request with the largest (priority, arrival) goes first
        ("priority", {"a": 5, "b": 0, "c": 3}, "a"),
        # fcfs: the last admitted goes first
        ("fcfs", {"a": 0, "b": 0, "c": 0}, "c"),
    ],
)
async def test_kv_pressure_preempts_like_vllm(
    make_server: Callable[..., SimServer], policy: str, priorities: dict[str, int], first_victim: str
) -> None:
    # Three 40-token answers of a 1-token prompt need up to 3 x 42 KV tokens; the cache holds 64. Steps of
    # 40 ms: all three are admitted long before the first preemption (after 20 steps).
    server = make_server(
        scheduling_policy=policy, kv_cache_tokens=64, max_model_len=64, decode_ms=40, decode_ms_per_seq=0, prefill_ms=0
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        tasks = []
        for n, (user, priority) in enumerate(priorities.items(), start=1):
            payload = {**body(user, 40, priority if policy == "priority" else None), "seed": 7}
            tasks.append(asyncio.create_task(stream_text(client, payload)))
            await wait_for(lambda n=n: _started(client, n))
        texts = await asyncio.gather(*tasks)
        s = await stats(client)
    preempted = events(s["log"], "preempted")
    assert preempted and preempted[0] == first_victim
    if policy == "priority":
        assert "b" not in preempted  # the highest priority is never the victim while others run
    assert sorted(events(s["log"], "resumed")) == sorted(preempted)
    # A preempted stream goes on where it stopped: same prompt and seed, so the same 40 tokens, none repeated.
    assert len(texts[0].split()) == 40 and texts[0] == texts[1] == texts[2]
    assert s["finished"] == 3 and s["started"] == 3 and s["preempted"] == len(preempted)


def test_kv_cache_must_hold_one_full_request() -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        create_app(kv_cache_tokens=100, max_model_len=4096)


async def _running_waiting(client: httpx.AsyncClient, expected: tuple[int, int]) -> bool:
    s = await stats(client)
    return (s["running"], s["waiting"]) == expected


async def _started(client: httpx.AsyncClient, n: int) -> bool:
    return (await stats(client))["started"] >= n


# -- the stack: headroom for the high class inside vLLM's batch --------------------------------------


async def _sim_log(stack: Stack) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=stack.simulator_url, timeout=5) as client:
        return (await stats(client))["log"]


@pytest.mark.slow
@pytest.mark.parametrize("headroom", [2, 0], ids=["default-headroom", "no-headroom"])
async def test_high_request_starts_without_waiting_for_a_slot(make_stack: type[Stack], headroom: int) -> None:
    """A full low backlog; then a high request. With the default settings (6 slots: a headroom of 2 for
    priorities from 8 on) it starts while every low request still runs (no slot had to free); without
    headroom, it waits for a low request to end.
    """
    env = {"DISPATCHER_MAX_QUEUED_PER_TOKEN": "0"}
    if not headroom:
        env.update(DISPATCHER_PRIORITY_HEADROOM="0")
    stack = make_stack(env=env)
    normal_lane = 4
    stack.start_simulator(max_num_seqs=normal_lane + headroom, decode_ms=10)
    stack.start_worker(normal_lane + headroom)
    stack.start_gateway()
    low_token, high_token = stack.add_token("low", priority=1), stack.add_token("high", priority=9)
    url = stack.gateway_url + "/v1/completions"
    # Long enough that no low request ends before the lane is seen full; without headroom the high one
    # then waits for the first of them to end.
    low_tokens = 300 if headroom else 150

    async def run(token: str, user: str, max_tokens: int) -> str:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(timeout=60, headers=headers) as client:
            return await stream_text_at(client, url, {**body(user, max_tokens), "model": stack.model})

    lows = [asyncio.create_task(run(low_token, f"low-{i}", low_tokens)) for i in range(normal_lane + 2)]
    try:

        async def lane_full() -> bool:
            return len(events(await _sim_log(stack), "started")) == normal_lane

        await wait_for(lane_full, within=15)
        await asyncio.sleep(0.2)  # the two extra lows are in RabbitMQ now, not in vLLM
        assert len(events(await _sim_log(stack), "started")) == normal_lane
        await run(high_token, "high", 3)
        log = await _sim_log(stack)
        order = [(e["event"], e["user"]) for e in log if e["event"] in ("started", "finished")]
        high_at = order.index(("started", "high"))
        finished_before = [user for event, user in order[:high_at] if event == "finished"]
        if headroom:
            assert finished_before == []
        else:
            assert finished_before  # it waited for a low request to end
    finally:
        for task in lows:
            task.cancel()
        await asyncio.gather(*lows, return_exceptions=True)


async def stream_text_at(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> str:
    parts: list[str] = []
    async with client.stream("POST", url, json=payload) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                parts.extend(choice["text"] for choice in json.loads(line[6:])["choices"])
    return "".join(parts)

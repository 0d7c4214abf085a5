"""Lanes belong to the gateway, and priority holds at every size (issue 19).

- each freed slot goes to the highest priority waiting in either lane, whatever the worker's size and
  headroom (1, 2 and 24 slots; headroom 0 included);
- no client string names a queue: model names are checked (length, characters, the express suffix),
  the lane comes from the token's priority alone, and a worker refuses an express-queue request
  whose priority is not an express one;
- the client chooses neither its scheduling priority (a ``priority`` field it sends never reaches
  the server unless the worker sets it) nor an unbounded number of sequences (``n``, ``best_of``).

Everything runs through the real stack (simulator, worker, gateway as processes, RabbitMQ) and reads
the simulator's event log.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import httpx
import pytest

from llmdispatch.wire import MAX_MODEL_NAME, InvalidModelName, queue_name, request_queue
from tests.stack import Stack
from tests.test_priority import _sim_log, body, events, stream_text_at
from tests.test_simulator import wait_for


@pytest.mark.slow
@pytest.mark.parametrize(
    ("slots", "headroom"),
    [(1, "auto"), (2, "auto"), (24, "auto"), (24, "0")],
    ids=["1-slot", "2-slots", "24-slots", "24-slots-no-headroom"],
)
async def test_a_freed_slot_goes_to_the_highest_priority_waiting(
    make_stack: type[Stack], slots: int, headroom: str
) -> None:
    """The worker's lanes full (the express lane's headroom by long high requests, the normal lane by
    low ones) and a backlog of low requests in RabbitMQ; then a high request. Once it waits in its
    queue, no low request starts before it: the first slot that frees is its."""
    stack = make_stack(env={"DISPATCHER_MAX_QUEUED_PER_TOKEN": "0", "DISPATCHER_PRIORITY_HEADROOM": headroom})
    reserved = slots // 3 if headroom == "auto" else int(headroom)  # the worker's rule for "auto"
    stack.start_simulator(max_num_seqs=slots, decode_ms=10)
    stack.start_worker(slots)
    stack.start_gateway()
    low_token, high_token = stack.add_token("low", priority=1), stack.add_token("high", priority=9)
    url = stack.gateway_url + "/v1/completions"

    async def run(token: str, user: str, max_tokens: int) -> str:
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {token}"}) as client:
            return await stream_text_at(client, url, {**body(user, max_tokens), "model": stack.model})

    async def started() -> list[str]:
        return events(await _sim_log(stack), "started")

    # Lows of several seconds (more under load), so that slots free seldom; fillers longer still.
    tasks = [asyncio.create_task(run(high_token, f"filler-{i}", 3000)) for i in range(reserved)]
    try:
        if reserved:
            await wait_for(lambda: _count_is(started, reserved), within=90)
        tasks += [asyncio.create_task(run(low_token, f"low-{i}", 500)) for i in range(slots - reserved + 7)]
        await wait_for(lambda: _count_is(started, slots), within=90)
        await wait_for(lambda: _ready_is(stack, express=False, n=7), within=30)  # the backlog waits
        high = asyncio.create_task(run(high_token, "high", 3))
        tasks.append(high)

        async def high_queued() -> bool:
            return await _ready_is(stack, express=True, n=1) or "high" in await started()

        await wait_for(high_queued, within=30)
        await asyncio.sleep(0.3)  # a low delivered just before has reached the server
        before = await started()
        await asyncio.wait_for(high, timeout=120)
        after = (await started())[len(before) :]
        if "high" in before:  # a slot was free when it arrived
            return
        assert after[0] == "high", after  # the first slot that freed went to it
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _count_is(started: Any, n: int) -> bool:
    return len(await started()) >= n


async def _ready_is(stack: Stack, *, express: bool, n: int) -> bool:
    """At least ``n`` messages wait in one of the model's queues."""
    connection = await aio_pika.connect(stack.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name(stack.model, express=express), passive=True)
        return (queue.declaration_result.message_count or 0) >= n


# -- model names and lanes ---------------------------------------------------------------------------


def _completion(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hi", "max_tokens": 2, **extra}


@pytest.mark.parametrize(
    ("model", "status"),
    [
        ("m" * 1000, 400),  # was a 500 ("Routing key too long")
        ("x" * 250, 400),
        ("é" * 130, 400),  # 260 bytes
        ("bad model", 400),
        ("a#b", 400),
        ("", 400),
    ],
    ids=["1000-bytes", "250-bytes", "260-bytes-utf8", "space", "hash", "empty"],
)
async def test_a_model_name_no_model_can_have_is_a_client_error(stack: Stack, model: str, status: int) -> None:
    async with httpx.AsyncClient(timeout=10, headers=stack.auth()) as client:
        for stream in (False, True):
            r = await client.post(stack.gateway_url + "/v1/completions", json=_completion(model, stream=stream))
            assert r.status_code == status, r.text
            error = r.json()["error"]
            assert error["param"] == "model" and error["type"] == "invalid_request_error", error


async def test_a_model_name_cannot_name_the_express_lane(stack: Stack) -> None:
    """A priority-5 token (normal lane) asking for `<model>.express`: 404, and nothing reaches the server."""
    user = "express-intruder"
    async with httpx.AsyncClient(timeout=10, headers=stack.auth()) as client:
        for stream in (False, True):
            payload = _completion(stack.model + ".express", stream=stream, user=user)
            r = await client.post(stack.gateway_url + "/v1/completions", json=payload)
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "model_not_found"
    assert user not in events(await _sim_log(stack), "queued")


async def test_the_worker_refuses_a_normal_priority_from_the_express_queue(make_stack: type[Stack]) -> None:
    """A gateway that routes priority 1 to the express queue (its express threshold differs from the
    worker's): the worker refuses the request with a clear 403 rather than serving it from the headroom."""
    stack = make_stack()
    stack.start_simulator(max_num_seqs=3)
    stack.start_worker(3)  # express lane from priority 8 (the default)
    stack.start_gateway(env={"DISPATCHER_EXPRESS_PRIORITY": "1"})
    stack.token = stack.add_token("low", priority=1)
    user = "lane-mismatch"
    async with httpx.AsyncClient(timeout=30, headers=stack.auth()) as client:
        r = await client.post(stack.gateway_url + "/v1/completions", json=_completion(stack.model, user=user))
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "lane_not_allowed" and "express" in error["message"], error
    assert user not in events(await _sim_log(stack), "queued")
    worker = next(p for p in stack.processes if p.name == "worker")
    assert "DISPATCHER_EXPRESS_PRIORITY" in worker.log()


# -- what the client may not choose ------------------------------------------------------------------


async def test_a_client_priority_never_reaches_the_server(stack: Stack) -> None:
    """The worker does not pass priorities (DISPATCHER_VLLM_PRIORITY off): the simulator, which schedules by
    priority, must see none, not the client's own."""
    user = "self-promoted"
    async with httpx.AsyncClient(timeout=10, headers=stack.auth()) as client:
        for stream in (False, True):
            payload = _completion(stack.model, stream=stream, user=user, priority=-100)
            r = await client.post(stack.gateway_url + "/v1/completions", json=payload)
            assert r.status_code == 200, r.text
    seen = [e["priority"] for e in await _sim_log(stack) if e["user"] == user and e["event"] == "queued"]
    assert seen == [0, 0]


@pytest.mark.parametrize("field", ["n", "best_of"])
async def test_sequences_per_request_are_capped(stack: Stack, field: str) -> None:
    """n and best_of run that many sequences in one worker slot: above DISPATCHER_MAX_SEQUENCES (8), 400."""
    async with httpx.AsyncClient(timeout=10, headers=stack.auth()) as client:
        url = stack.gateway_url + "/v1/completions"
        r = await client.post(url, json=_completion(stack.model, **{field: 9}))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and "8" in error["message"], error
        r = await client.post(url, json=_completion(stack.model, **{field: 8}))
        assert r.status_code == 200, r.text
        if field == "n":
            chat = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 128}
            r = await client.post(stack.gateway_url + "/v1/chat/completions", json=chat)
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_queue_names_come_from_checked_model_names_and_the_priority_alone() -> None:
    """One mapping, one-to-one: no model name is another model's queue or another lane."""
    assert request_queue("org/m-7B:q4", 1, 8) == "dispatcher.model.org/m-7B:q4"
    assert request_queue("org/m-7B:q4", 8, 8) == "dispatcher.model.org/m-7B:q4.express"
    for bad in ("m.express", "m" * 201, "a b", "a\x00b", "é", "a*", "a#b"):
        with pytest.raises(InvalidModelName):
            queue_name(bad)
    longest = queue_name("m" * MAX_MODEL_NAME, express=True)
    assert len(longest.encode()) <= 255  # an AMQP short string

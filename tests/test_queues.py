"""Model queues: scale from zero, quorum queues, and a queue whose arguments changed."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx
import openai

from tests.faults import chat, queued_is, read_stream, until, until_event
from tests.stack import Stack


def _queue_types(prefix: str) -> dict[str, str]:
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "type", "-q", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return dict(line.split("\t")[:2] for line in out.splitlines() if line.startswith(prefix))


async def test_a_configured_model_without_a_worker_waits_in_its_queue(tmp_path: Path) -> None:
    """Scale from zero: the request waits (keep-alive comments) and is served once a worker starts;
    a model nobody configured is still a 404."""
    stack = Stack(tmp_path, env={"DISPATCHER_KEEPALIVE_INTERVAL": "0.5"})
    try:
        stack.start_simulator(max_num_seqs=4)
        stack.start_gateway(env={"DISPATCHER_MODELS": f"{stack.model},other-{stack.model}"}, wait_model=False)
        stack.token = stack.add_token("zero", priority=5)
        async with httpx.AsyncClient(timeout=60) as http:
            waiting = asyncio.create_task(read_stream(http, stack, chat("zero", 5, model=stack.model), stack.token))
            await asyncio.sleep(1.5)  # queued, no worker anywhere
            assert not waiting.done()
            started = time.monotonic()
            await asyncio.to_thread(stack.start_worker, 4)
            result = await waiting
            assert result.status == 200 and result.comments >= 1 and not result.errors
            assert result.events[-1] == b"data: [DONE]" and time.monotonic() - started < 30
            models = (await http.get(stack.gateway_url + "/v1/models", headers=stack.auth())).json()
            assert {stack.model, f"other-{stack.model}"} <= {m["id"] for m in models["data"]}
        client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.token, max_retries=0)
        try:
            client.chat.completions.create(model="nobody-configured-this", messages=[{"role": "user", "content": "x"}])
            raise AssertionError("expected a 404")
        except openai.NotFoundError as exc:
            assert exc.body["code"] == "model_not_found"  # type: ignore[index]
    finally:
        stack.close()
        stack.delete_queues(f"other-{stack.model}")


async def test_quorum_queues_serve_streams(tmp_path: Path) -> None:
    stack = Stack(tmp_path, env={"DISPATCHER_QUEUE_TYPE": "quorum"})
    try:
        stack.serve(max_num_seqs=4, max_concurrency=4, token="quorum")
        async with httpx.AsyncClient(timeout=60) as http:
            results = await asyncio.gather(
                *(read_stream(http, stack, chat(f"q{i}", 8, model=stack.model), stack.token) for i in range(6))
            )
        assert all(r.status == 200 and not r.errors and r.events[-1] == b"data: [DONE]" for r in results)
        assert len({len(r.data) for r in results}) == 1
        types = await asyncio.to_thread(_queue_types, f"dispatcher.model.{stack.model}")
        assert set(types.values()) == {"quorum"} and len(types) == 2
    finally:
        stack.close()


async def test_a_queue_declared_with_other_arguments_is_used_with_a_clear_error(tmp_path: Path) -> None:
    """A changed max length must not make the worker retry its setup forever."""
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=2)
        stack.start_worker(2)
        stack.start_gateway()
        stack.token = stack.add_token("args", priority=5)
        worker = stack.start_worker(2, env={"DISPATCHER_MAX_QUEUE_LENGTH": "7"})
        assert "exists with other arguments" in worker.log()
        async with httpx.AsyncClient(timeout=60) as http:
            result = await read_stream(http, stack, chat("args", 4, model=stack.model), stack.token)
        assert result.status == 200 and not result.errors
        assert worker.log().count("setting up the broker connection failed") == 0
    finally:
        stack.close()


async def test_a_full_low_backlog_does_not_lock_out_high_priorities(tmp_path: Path) -> None:
    """The normal queue is full (429 for low priorities); a high priority is still admitted: it goes to
    the express queue, and starts in the worker's headroom at once (default settings otherwise)."""
    stack = Stack(tmp_path, env={"DISPATCHER_MAX_QUEUE_LENGTH": "2", "DISPATCHER_MAX_QUEUED_PER_TOKEN": "0"})
    try:
        stack.start_simulator(max_num_seqs=3)
        stack.start_worker(3)  # auto headroom: 1 slot of 3
        stack.start_gateway()
        low, high = stack.add_token("backlog-low", priority=1), stack.add_token("backlog-high", priority=9)
        async with httpx.AsyncClient(timeout=60) as http:

            def ask(user: str) -> asyncio.Task[object]:
                return asyncio.create_task(read_stream(http, stack, chat(user, 3000, model=stack.model), low))

            # Two run, two wait in the full queue; one at a time, each seen running or queued before the next
            # (four sent together could find the queue full before the worker took any).
            lows = []
            for i in range(4):
                lows.append(ask(f"low-{i}"))
                if i < 2:
                    await until_event(http, stack, f"low-{i}", "started")
                else:
                    await until(lambda n=i - 1: queued_is(stack, n), 10, f"low-{i} queued")
            refused = await http.post(
                stack.gateway_url + "/v1/chat/completions",
                json=chat("low-refused", 5, model=stack.model, stream=False),
                headers={"Authorization": f"Bearer {low}"},
            )
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
            urgent = await read_stream(http, stack, chat("urgent", 5, model=stack.model), high)
            assert urgent.status == 200 and not urgent.errors and urgent.events[-1] == b"data: [DONE]"
            assert not any(task.done() for task in lows)  # it did not wait for a low request to end
            for task in lows:
                task.cancel()
            await asyncio.gather(*lows, return_exceptions=True)
    finally:
        stack.close()

"""Broker restart against a private RabbitMQ node: reconnect alone, fail in-flight requests cleanly.

The node is booted once (it takes a few seconds) and restarted once; every check shares that
restart. Gateway and worker are started *before* the node, so they must also wait for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from llmdispatch.wire import queue_name
from tests import rabbit_node
from tests.faults import chat, events_of, post, read_stream, sim_log, until_event
from tests.rabbit_node import RabbitNode
from tests.stack import Stack, wait_http

pytestmark = pytest.mark.skipif(not rabbit_node.available(), reason="rabbitmq-server is not installed")


@pytest.fixture(scope="module")
def broker_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, RabbitNode]]:
    tmp = tmp_path_factory.mktemp("broker")
    node = RabbitNode(tmp)
    stack = Stack(tmp, amqp_url=node.url)
    try:
        stack.start_simulator(max_num_seqs=4, decode_ms=10)
        # Both start (and wait for /ready) while the broker is still down.
        starters = [
            threading.Thread(target=stack.start_worker, kwargs={"max_concurrency": 1}),
            threading.Thread(target=stack.start_gateway),
        ]
        for thread in starters:
            thread.start()
        # The node starts once both have tried and failed to reach it (they start slowly on a busy box).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            len(stack.processes) == 3 and all("cannot reach the message broker" in p.log() for p in stack.processes[1:])
        ):
            time.sleep(0.2)
        node.start()
        for thread in starters:
            thread.join(60)
        # Their own /ready waits may have given up while the node booted: wait here, longer.
        wait_http(stack.gateway_url + "/ready", timeout=60)
        worker = next(process for process in stack.processes if process.name == "worker")
        wait_http(worker.url + "/ready", timeout=60)  # type: ignore[attr-defined]
        stack.wait_model()
        stack.token = stack.add_token("broker", priority=5)  # type: ignore[attr-defined]
        yield stack, node
    finally:
        try:
            stack.close()
        finally:
            node.close()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


async def test_broker_restart(broker_stack: tuple[Stack, RabbitNode]) -> None:
    stack, node = broker_stack
    token = stack.token  # type: ignore[attr-defined]
    worker, gateway = (next(p for p in stack.processes if p.name == name) for name in ("worker", "gateway"))
    assert "cannot reach the message broker" in worker.log() + gateway.log()
    pids = (worker.popen.pid, gateway.popen.pid)

    async with httpx.AsyncClient(timeout=30) as http:
        assert (await post(http, stack, chat("before", 5, model=stack.model, stream=False), token)).status_code == 200
        streamed = asyncio.create_task(read_stream(http, stack, chat("in-flight", 3000, model=stack.model), token))
        await until_event(http, stack, "in-flight", "started")
        queued = asyncio.create_task(post(http, stack, chat("queued", 5, model=stack.model, stream=False), token))
        await asyncio.sleep(0.5)

        stopped_at = time.monotonic()
        await asyncio.to_thread(node.stop)
        result, waiting = await asyncio.wait_for(asyncio.gather(streamed, queued), 15)
        failed_after = max(result.ended_at, time.monotonic()) - stopped_at
        during = await post(http, stack, chat("during", 5, model=stack.model, stream=False), token)
        ready_during = _status(stack.gateway_url + "/ready"), _status(worker.url + "/ready")  # type: ignore[attr-defined]

        await asyncio.to_thread(node.start)
        back_at = time.monotonic()
        answer = None
        while time.monotonic() - back_at < 30:
            answer = await post(http, stack, chat("after", 5, model=stack.model, stream=False), token)
            if answer.status_code == 200:
                break
            await asyncio.sleep(0.2)
        recovered_after = time.monotonic() - back_at
        log = await sim_log(http, stack)

    print(f"\nbroker restart: in-flight requests failed {failed_after:.2f} s after the stop; "
          f"first success {recovered_after:.2f} s after the broker was back; boots {node.boot_seconds}")  # fmt: skip
    # In flight during the outage: a clear error, never a hang.
    assert result.status == 200 and result.done and result.errors
    assert waiting.status_code == 503 and waiting.json()["error"]["message"]
    assert during.status_code == 503
    assert ready_during == (503, 503)
    # The in-flight request stopped using the GPU.
    assert "aborted" in events_of(log, "in-flight")
    # Back without restarting anything.
    assert answer is not None and answer.status_code == 200
    assert (worker.popen.pid, gateway.popen.pid) == pids and worker.alive() and gateway.alive()
    assert _status(stack.gateway_url + "/ready") == _status(worker.url + "/ready") == 200  # type: ignore[attr-defined]
    # Nothing piled up. Connections: the gateway's two (replies, control) and the worker's three
    # (consuming, publishing, replies to this gateway); one consumer on each model queue, one control
    # queue each.
    assert len(node.ctl("list_connections", "name")) == 5
    queues = {name: int(consumers) for name, consumers in node.ctl("list_queues", "name", "consumers")}
    assert queues.pop(queue_name(stack.model)) == 1
    assert queues.pop(queue_name(stack.model, express=True)) == 1
    assert sorted(queues.values()) == [1, 1], queues
    # Channels: the gateway's replies channel (its reply-to consumer is not counted by the broker, and
    # the answer above proves it exists) and control channel (1 consumer); the worker's queue channel
    # (3 consumers), its depth-probe channel, its publishing channel and its reply channel.
    channels = node.ctl("list_channels", "name", "consumer_count")
    assert len(channels) == 6 and sum(int(count) for _, count in channels) == 4, channels

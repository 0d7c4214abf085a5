"""One gateway's slow reply link must not delay the frames to the others (issue 19).

The worker publishes each gateway's replies on a connection of its own; here its connections go
through a TCP proxy, and the one to gateway B is cut while the proxy refuses new connections, so
that B's link stays in reconnection. Gateway A's stream, on the same worker, must keep flowing.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.faults import TcpProxy, chat
from tests.stack import AMQP_URL, Stack

TOKEN = re.compile(rb'"content":"[^"]')  # an event with text (not the role chunk's empty content)


def proxied(proxy: TcpProxy) -> str:
    parts = urlsplit(AMQP_URL.split(",")[0])
    return f"{parts.scheme}://{parts.username}:{parts.password}@127.0.0.1:{proxy.port}{parts.path or '/'}"


async def stream_times(http: httpx.AsyncClient, url: str, body: dict[str, Any], started: asyncio.Event) -> list[float]:
    """When each content event of a stream arrived (monotonic); sets ``started`` after 20 of them."""
    times: list[float] = []
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for chunk in r.aiter_bytes():
            times.extend([time.monotonic()] * len(TOKEN.findall(chunk)))
            if len(times) >= 20:
                started.set()
    return times


async def test_a_stalled_gateway_link_does_not_delay_the_other_gateways(tmp_path: Path) -> None:
    broker_port = urlsplit(AMQP_URL.split(",")[0]).port or 5672
    proxy = TcpProxy(broker_port).open()
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=4, decode_ms=10)
        stack.start_worker(4, env={"DISPATCHER_AMQP_URL": proxied(proxy)})
        stack.start_gateway()
        gateway_a = stack.gateway_url
        stack.start_gateway()
        gateway_b = stack.gateway_url
        stack.token = stack.add_token("links", priority=5)
        async with httpx.AsyncClient(timeout=60, headers=stack.auth()) as http:
            # One request through each gateway: the worker opens a reply connection to each; B's is
            # the one the proxy saw open during B's request.
            before = len(proxy.links)
            ok = await http.post(
                gateway_b + "/v1/chat/completions", json=chat("b0", 2, model=stack.model, stream=False)
            )
            assert ok.status_code == 200
            (link_b,) = proxy.links[before:]
            ok = await http.post(
                gateway_a + "/v1/chat/completions", json=chat("a0", 2, model=stack.model, stream=False)
            )
            assert ok.status_code == 200

            started_a, started_b = asyncio.Event(), asyncio.Event()
            body = chat("a1", 400, model=stack.model)
            stream_a = asyncio.create_task(stream_times(http, gateway_a, body, started_a))
            stream_b = asyncio.create_task(stream_times(http, gateway_b, chat("b1", 400, model=stack.model), started_b))
            await asyncio.wait_for(asyncio.gather(started_a.wait(), started_b.wait()), 30)
            cut_at = time.monotonic()
            proxy.refuse()  # B's link cannot come back: every batch to B waits for it, then is lost
            proxy.reset([link_b])
            times = await asyncio.wait_for(stream_a, 60)
            stream_b.cancel()
    finally:
        stack.close()
        proxy.close()
    after = [t for t in times if t >= cut_at]
    gaps = [b - a for a, b in itertools.pairwise(times) if b >= cut_at]
    print(f"\nA: {len(times)} tokens, {len(after)} after B's link was cut, longest gap after it {max(gaps):.3f}s")
    assert len(times) == 400  # A's answer complete
    # Before: one flusher for all gateways waited up to 2 s for B's link for every batch to B,
    # A's frames behind it (a gap of 2 s or more). Normal gaps here are 10 ms.
    assert max(gaps) < 1.0

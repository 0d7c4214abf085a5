"""`dispatcher gateway --workers 2`: two processes on one port, metrics summed, SIGTERM drains both."""

from __future__ import annotations

import asyncio
import re
import signal
import urllib.request
from pathlib import Path

import httpx
import psutil

from tests.stack import Stack, free_port


def _requests_total(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(r"^dispatcher_requests_total\{[^}]*\} (\S+)$", text, re.MULTILINE))


async def test_two_processes_share_the_port_and_drain_on_sigterm(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=64, decode_ms=20)
        stack.start_worker(64)
        metrics_port = free_port()
        gateway = stack.start_gateway(
            env={
                "DISPATCHER_GATEWAY_WORKERS": "2",
                "DISPATCHER_METRICS_PORT": str(metrics_port),
                "DISPATCHER_DRAIN_DELAY": "1",
            }
        )
        token = stack.add_token("two-processes", 5)
        supervisor = psutil.Process(gateway.popen.pid)
        children = supervisor.children()
        assert len(children) == 2
        body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
        headers = {"Authorization": f"Bearer {token}"}

        async def one(http: httpx.AsyncClient) -> bytes:
            async with http.stream("POST", stack.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status_code == 200
                return b"".join([chunk async for chunk in r.aiter_bytes()])

        # Twenty clients, a connection each: the kernel spreads them over both processes.
        clients = [httpx.AsyncClient(timeout=60) for _ in range(20)]
        try:
            running = [asyncio.create_task(one(http)) for http in clients]
            await asyncio.sleep(0.8)  # streams are open now (40 tokens take about a second)
            serving = [sum(c.status == "ESTABLISHED" for c in child.net_connections("tcp")) for child in children]
            answers = await asyncio.gather(*running)
            assert all(answer.endswith(b"data: [DONE]\n\n") for answer in answers)
            assert all(n > 0 for n in serving), serving
            # Both processes' counters, summed by the supervisor on the metrics port.
            assert _requests_total(f"http://127.0.0.1:{metrics_port}/metrics") == 20

            # SIGTERM while streams run: both processes drain them, then everything exits cleanly.
            running = [asyncio.create_task(one(http)) for http in clients[:6]]
            await asyncio.sleep(0.3)
            gateway.popen.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*running)
            assert all(answer.endswith(b"data: [DONE]\n\n") for answer in answers)
            assert await asyncio.to_thread(gateway.popen.wait, 30) == 0
            assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
        finally:
            for http in clients:
                await http.aclose()
    finally:
        stack.close()

"""`dispatcher worker --processes 2`: two workers beside one server, sharing its concurrency, its HTTP
port and their metrics; a process that dies is replaced; SIGTERM stops both."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request

import openai
import psutil

from llmdispatch.processes import START_GRACE
from tests.stack import Stack, free_port, wait_http


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _worker_requests(metrics_url: str) -> float:
    text = _get(metrics_url)
    return sum(float(v) for v in re.findall(r"^dispatcher_worker_requests_total\{[^}]*\} (\S+)$", text, re.M))


async def test_two_processes_share_the_server_port_and_metrics(tmp_path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=16, decode_ms=20)
        port = free_port()
        # 4 slots over two processes (2 each), no headroom: vLLM never sees more than 4 sequences.
        worker = stack.spawn(
            "worker",
            "worker", "--model", stack.model, "--vllm-url", stack.simulator_url + "/v1",
            "--max-concurrency", "4", "--priority-headroom", "0", "--processes", "2", "--http-port", str(port),
        )  # fmt: skip
        worker_url = f"http://127.0.0.1:{port}"
        wait_http(worker_url + "/ready")
        ready_at = time.monotonic()  # the processes started before this
        stack.start_gateway()
        token = stack.add_token("processes", 5)
        children = psutil.Process(worker.popen.pid).children()
        assert len(children) == 2

        client = openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key=token, max_retries=0, timeout=30)

        async def ask(max_tokens: int = 30) -> str:
            stream = await client.chat.completions.create(
                model=stack.model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, stream=True
            )
            parts, finish = [], None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            assert finish == "length"
            return "".join(parts)

        async def peak_running(until: asyncio.Future[object]) -> int:
            peak = 0
            while not until.done():
                stats = json.loads(await asyncio.to_thread(_get, stack.simulator_url + "/sim/stats"))
                peak = max(peak, stats["running"])
                await asyncio.sleep(0.03)
            return peak

        answers = asyncio.gather(*(ask() for _ in range(8)))
        peak = await peak_running(answers)
        assert all(answers.result())
        # Both processes ran requests at once (each may run 2), and together never more than the 4 given.
        assert peak == 4, peak
        # Whichever process answers /metrics, it is the sum of both.
        assert [_worker_requests(worker_url + "/metrics") for _ in range(4)] == [8.0] * 4

        # A process that dies is replaced; requests go on being served.
        # Past the supervisor's start grace (a process that dies sooner stops them all).
        await asyncio.sleep(max(0.0, ready_at + START_GRACE + 0.5 - time.monotonic()))
        children[0].kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = psutil.Process(worker.popen.pid).children()
            if len(now) == 2 and children[0].pid not in {c.pid for c in now}:
                break
            await asyncio.sleep(0.2)
        replaced = psutil.Process(worker.popen.pid).children()
        assert len(replaced) == 2 and children[0].pid not in {c.pid for c in replaced}
        assert all(await asyncio.gather(*(ask(10) for _ in range(4))))

        worker.popen.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.popen.wait, 30) == 0
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in replaced)
        await client.close()
    finally:
        stack.close()


def _gauge(metrics_url: str, name: str, model: str) -> float:
    text = _get(metrics_url)
    found = re.search(rf'^{name}\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$', text, re.M)
    assert found, name
    return float(found.group(1))


async def test_state_gauges_sum_over_processes(tmp_path) -> None:
    """In flight and free slots with --processes 2: prometheus_client's multiprocess mode ignores
    ``Gauge.set_function``, so these read 0 until the worker set them itself."""
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=16, decode_ms=20)
        port = free_port()
        stack.spawn(
            "worker",
            "worker", "--model", stack.model, "--vllm-url", stack.simulator_url + "/v1",
            "--max-concurrency", "8", "--priority-headroom", "0", "--processes", "2", "--http-port", str(port),
        )  # fmt: skip
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        wait_http(metrics_url.replace("/metrics", "/ready"))
        stack.start_gateway()
        token = stack.add_token("gauges", 5)
        client = openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key=token, max_retries=0, timeout=60)

        async def long_stream() -> None:
            stream = await client.chat.completions.create(
                model=stack.model, messages=[{"role": "user", "content": "hi"}], max_tokens=400, stream=True
            )
            async for _ in stream:
                pass

        # Idle: all 8 slots free over both processes (4 each), nothing in flight.
        for _ in range(50):
            if _gauge(metrics_url, "dispatcher_worker_free_slots", stack.model) == 8:
                break
            await asyncio.sleep(0.2)
        assert _gauge(metrics_url, "dispatcher_worker_free_slots", stack.model) == 8
        streams = [asyncio.create_task(long_stream()) for _ in range(3)]
        seen: tuple[float, float] = (0, 0)
        deadline = time.monotonic() + 10  # each process sets its gauges every probe (0.5 s)
        while time.monotonic() < deadline and seen != (3, 5):
            await asyncio.sleep(0.2)
            seen = (
                _gauge(metrics_url, "dispatcher_worker_requests_in_flight", stack.model),
                _gauge(metrics_url, "dispatcher_worker_free_slots", stack.model),
            )
        assert seen == (3, 5), seen
        # The server's load is read by the next probe (0.5 s), not when a request starts: wait for it.
        running = 0.0
        while time.monotonic() < deadline + 5 and running < 1:
            running = _gauge(metrics_url, "dispatcher_worker_vllm_requests_running", stack.model)
            await asyncio.sleep(0.2)
        assert running >= 1
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        await client.close()
    finally:
        stack.close()

"""A real inference server that is not vLLM: llama.cpp's llama-server (SmolLM2-135M) behind the worker and gateway.

The binary and the model come from scripts/build-llama-server.sh (scripts/test.sh runs it first; it builds
once into ~/.cache/dispatcher and is a no-op afterwards). These tests are never skipped: without the binary
the fixture runs the script itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest

from llmdispatch.amqp import delete_model_queue
from llmdispatch.usage import UsageRecord, read_usage
from llmdispatch.wire import queue_name
from llmdispatch.worker.backends import Backend, LlamaCppBackend, Load, State, detect, make_backend
from llmdispatch.worker.events import Usage, body_usage, inspect
from tests.stack import STREAM_URL, Process, Stack, delete_stream, free_port, run_sync, wait_http

ROOT = Path(__file__).resolve().parents[1]
SLOTS = 2  # llama-server -np: requests it runs at once


def llama_paths() -> tuple[Path, Path]:
    """The llama-server binary and the GGUF model: from scripts/test.sh's environment, else from the script."""
    server, model = os.environ.get("DISPATCHER_LLAMA_SERVER"), os.environ.get("DISPATCHER_LLAMA_MODEL")
    if not (server and model and Path(server).is_file() and Path(model).is_file()):
        out = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build-llama-server.sh")], stdout=subprocess.PIPE, text=True, check=True
        ).stdout
        found = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line)
        server, model = found["DISPATCHER_LLAMA_SERVER"], found["DISPATCHER_LLAMA_MODEL"]
    return Path(server), Path(model)


def start_llama(stack: Stack, alias: str, port: int | None = None, *, wait: bool = True) -> str:
    """Start llama-server serving ``alias``; returns its root URL. Stopped by ``stack.close()``."""
    server, model = llama_paths()
    port = port or free_port()
    log_path = stack.tmp / f"llama-server-{port}.log"
    popen = subprocess.Popen(
        [
            str(server), "-m", str(model), "--alias", alias, "--host", "127.0.0.1", "--port", str(port),
            "--metrics", "-c", "8192", "-np", str(SLOTS), "-t", "1",
        ],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    stack.processes.append(Process("llama-server", popen, log_path))
    url = f"http://127.0.0.1:{port}"
    if wait:
        wait_http(url + "/health", timeout=60)
    return url


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """llama-server (2 slots), a worker with --backend llamacpp (4 slots, so it can over-pull), a gateway,
    a usage ledger and a token. ``stack.simulator_url`` is llama-server's URL."""
    stream = "test-llamacpp-" + uuid.uuid4().hex[:10]
    stack = Stack(
        tmp_path_factory.mktemp("llamacpp"),
        env={"DISPATCHER_USAGE_STREAM_URL": STREAM_URL, "DISPATCHER_USAGE_STREAM_NAME": stream},
    )
    stack.stream = stream  # type: ignore[attr-defined]
    try:
        stack.simulator_url = start_llama(stack, stack.model)
        stack.worker = stack.start_worker(4, "--backend", "llamacpp")  # type: ignore[attr-defined]
        stack.start_gateway()
        stack.token = stack.add_token("llama", priority=5)
        yield stack
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))


def chat(stack: Stack, content: str, max_tokens: int, **extra: object) -> dict[str, object]:
    # temperature 0: greedy, the same answer every time; cache_prompt off: each request computes its prompt
    # afresh, as the first one did (a cached prefix may change the last logits' rounding).
    return {
        "model": stack.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "cache_prompt": False,
        **extra,
    }


_VOLATILE = [
    (re.compile(rb'"(id|system_fingerprint)":"[^"]*"'), rb'"\1":"-"'),
    (re.compile(rb'"created":\d+'), rb'"created":0'),
    # llama.cpp puts its timings on the usage chunk when asked for usage, else on the last chunk: the worker
    # always asks (to account for usage), so a client that did not ask sees them on neither.
    (re.compile(rb',"timings":\{[^{}]*\}'), b""),
]


def stable(raw: bytes) -> bytes:
    """The bytes with what differs between two runs of the same request blanked out (ids, times, timings)."""
    for pattern, replacement in _VOLATILE:
        raw = pattern.sub(replacement, raw)
    return raw


def events_of(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-200:]
    return [event + b"\n\n" for event in raw.split(b"\n\n")[:-1]]


async def llama_gauges(stack: Stack) -> Load | None:
    backend = LlamaCppBackend(stack.simulator_url)
    try:
        return (await backend.probe()).load
    finally:
        await backend.aclose()


async def wait_load(backend: Backend, condition: object, timeout: float = 15.0) -> Load | None:
    deadline = time.monotonic() + timeout
    while True:
        load = (await backend.probe()).load
        if condition(load) or time.monotonic() > deadline:  # type: ignore[operator]
            return load
        await asyncio.sleep(0.05)


# -- the adapter against the real server --------------------------------------------------------


async def test_probe_and_detect_llama_server(llama: Stack) -> None:
    assert await detect(llama.simulator_url) is LlamaCppBackend
    for kind in ("llamacpp", "auto"):
        backend = make_backend(kind, llama.simulator_url + "/v1", priority=True)
        try:
            probe = await backend.probe()
            assert probe.healthy and probe.load is not None, (kind, probe)
            assert probe.load.running == 0 and probe.load.waiting == 0
            assert not backend.accepts_priority and not backend.continuous_usage
        finally:
            await backend.aclose()


# -- answers through the stack are the server's own --------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_identical_to_direct(llama: Stack, include_usage: bool) -> None:
    body = chat(llama, "Name three colours.", 12, stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {llama.token}"}
    async with httpx.AsyncClient(timeout=60) as http:
        direct = await http.post(llama.simulator_url + "/v1/chat/completions", json=body)
        relayed = await http.post(llama.gateway_url + "/v1/chat/completions", json=body, headers=headers)
    assert direct.status_code == relayed.status_code == 200
    direct_events, relayed_events = events_of(direct.content), events_of(relayed.content)
    assert len(relayed_events) == len(direct_events) > 3
    assert [stable(e) for e in relayed_events] == [stable(e) for e in direct_events]
    assert relayed_events[-1] == b"data: [DONE]\n\n"
    infos = [inspect(e) for e in relayed_events]
    assert any(i.tokens for i in infos) and any(i.finish_reasons for i in infos)
    assert any(i.usage_only for i in infos) is include_usage


async def test_non_streamed_identical_to_direct(llama: Stack) -> None:
    body = chat(llama, "Say hello.", 10)
    headers = {"Authorization": f"Bearer {llama.token}"}
    async with httpx.AsyncClient(timeout=60) as http:
        direct = await http.post(llama.simulator_url + "/v1/chat/completions", json=body)
        relayed = await http.post(llama.gateway_url + "/v1/chat/completions", json=body, headers=headers)
    assert direct.status_code == relayed.status_code == 200
    assert stable(relayed.content) == stable(direct.content)
    assert relayed.json()["choices"][0]["message"]["content"]
    assert body_usage(relayed.content) == body_usage(direct.content) is not None


async def test_more_streams_than_slots_all_complete(llama: Stack) -> None:
    headers = {"Authorization": f"Bearer {llama.token}"}
    n = SLOTS + 2  # more than the server runs at once, and as many as the worker takes (4)
    running_seen: list[float] = []

    async def one(i: int, http: httpx.AsyncClient) -> list[bytes]:
        body = chat(llama, f"Count to {i + 3}.", 8, stream=True)
        response = await http.post(llama.gateway_url + "/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200
        return events_of(response.content)

    async def watch() -> None:
        while True:
            load = await llama_gauges(llama)
            if load is not None:
                running_seen.append(load.running)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            answers = await asyncio.gather(*(one(i, http) for i in range(n)))
    finally:
        watcher.cancel()
    for events in answers:
        assert events[-1] == b"data: [DONE]\n\n" and any(inspect(e).tokens for e in events)
    assert max(running_seen, default=0) == SLOTS  # the server ran its slots full, never more


async def test_worker_sees_llamas_own_load(llama: Stack) -> None:
    """While streams run, the worker's load gauges show llama-server's requests_processing."""
    headers = {"Authorization": f"Bearer {llama.token}"}
    worker_url = llama.worker.url  # type: ignore[attr-defined]
    body = chat(llama, "Write a long story about a fox.", 300, stream=True, ignore_eos=True)
    readers: list[AsyncIterator[bytes]] = []  # held: a dropped byte iterator closes its response (a cancel)
    async with httpx.AsyncClient(timeout=60) as http, contextlib.AsyncExitStack() as streams:
        for _ in range(SLOTS):
            response = await streams.enter_async_context(
                http.stream("POST", llama.gateway_url + "/v1/chat/completions", json=body, headers=headers)
            )
            readers.append(response.aiter_bytes())
            await anext(readers[-1])
        seen = 0.0
        deadline = time.monotonic() + 5
        while seen != SLOTS and time.monotonic() < deadline:
            text = (await http.get(worker_url + "/metrics")).text
            found = re.search(rf'dispatcher_worker_vllm_requests_running\{{model="{llama.model}"\}} (\S+)', text)
            seen = float(found.group(1)) if found else 0.0
            await asyncio.sleep(0.1)
        assert seen == SLOTS
        load = await llama_gauges(llama)
        assert load is not None and load.running == SLOTS  # the server's own count, as the worker saw it


async def test_disconnect_frees_the_servers_slot(llama: Stack) -> None:
    backend = LlamaCppBackend(llama.simulator_url)
    headers = {"Authorization": f"Bearer {llama.token}"}
    # ignore_eos: it would run for minutes (3,000 tokens at under 50 tokens/s) unless it is aborted.
    body = chat(llama, "Write a very long story about a fox.", 3000, stream=True, ignore_eos=True)
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", llama.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status_code == 200
                reader = r.aiter_bytes()  # held: a dropped byte iterator would close the response itself
                await anext(reader)
                load = await wait_load(backend, lambda load: load is not None and load.running == 1)
                assert load is not None and load.running == 1
            # The client left: gateway -> Cancel -> worker closes its connection -> llama-server stops generating.
            load = await wait_load(backend, lambda load: load is not None and load.running == 0)
            assert load is not None and load.running == 0
    finally:
        await backend.aclose()


async def test_ledger_records_the_servers_token_counts(llama: Stack) -> None:
    since = time.time()
    secret = llama.add_token("llama-ledger", priority=5)
    headers = {"Authorization": f"Bearer {secret}"}
    expected: dict[str, Usage] = {}  # request id -> the usage llama-server reported
    async with httpx.AsyncClient(timeout=60) as http:
        body = chat(llama, "One word: yes or no?", 8, stream=True, stream_options={"include_usage": True})
        r = await http.post(llama.gateway_url + "/v1/chat/completions", json=body, headers=headers)
        usage = next(i.usage for i in map(inspect, events_of(r.content)) if i.usage_only)
        expected[r.headers["x-request-id"]] = usage
        # Without include_usage the client gets no usage chunk; the worker asked for it anyway.
        body = chat(llama, "One word: up or down?", 8, stream=True)
        r = await http.post(llama.gateway_url + "/v1/chat/completions", json=body, headers=headers)
        assert not any(inspect(e).usage_only for e in events_of(r.content))
        direct = await http.post(llama.simulator_url + "/v1/chat/completions", json={**body, "stream": False})
        expected[r.headers["x-request-id"]] = body_usage(direct.content)  # type: ignore[assignment]
        body = chat(llama, "One word: left or right?", 8)
        r = await http.post(llama.gateway_url + "/v1/chat/completions", json=body, headers=headers)
        expected[r.headers["x-request-id"]] = body_usage(r.content)  # type: ignore[assignment]
    assert all(u is not None and u.prompt_tokens > 0 and u.completion_tokens > 0 for u in expected.values())
    records: list[UsageRecord] = []
    deadline = time.monotonic() + 20
    while len(records) < len(expected) and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        stream = llama.stream  # type: ignore[attr-defined]
        records = [r for r in await read_usage(STREAM_URL, stream, since) if r.token == "llama-ledger"]
    assert {r.request_id: Usage(r.prompt_tokens, r.completion_tokens) for r in records} == expected
    assert all(r.usage_reported and r.outcome == "ok" for r in records)


# -- a server that is still loading -------------------------------------------------------------


async def queue_exists(amqp_url: str, name: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return True


async def test_worker_waits_for_a_loading_server(llama: Stack) -> None:
    """Requests queued while the server is down, then loading, are served once it is ready; none fails.

    The worker runs with --backend auto: it finds out it is beside llama-server once that answers."""
    model = llama.model + "-late"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker_port = free_port()
    llama.spawn(
        "worker",
        "worker", "--model", model, "--vllm-url", url + "/v1", "--backend", "auto",
        "--max-concurrency", "2", "--http-port", str(worker_port),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not await queue_exists(llama.amqp_url, queue_name(model)):
            assert time.monotonic() < deadline, "the worker never declared its queue"
            await asyncio.sleep(0.2)
        headers = {"Authorization": f"Bearer {llama.token}"}
        body = {**chat(llama, "Say hi.", 6, stream=True), "model": model}
        async with httpx.AsyncClient(timeout=120) as http:
            request = asyncio.create_task(
                http.post(llama.gateway_url + "/v1/chat/completions", json=body, headers=headers)
            )
            await asyncio.sleep(1.0)  # queued; nothing listens on the server's port yet
            assert not request.done()
            ready = await http.get(f"http://127.0.0.1:{worker_port}/ready")
            assert ready.status_code == 503
            start_llama(llama, model, port, wait=False)
            states: list[State] = []
            backend = LlamaCppBackend(url)
            try:
                while not states or states[-1] is not State.HEALTHY:
                    states.append((await backend.probe()).state)
                    assert time.monotonic() < deadline + 60, states
                    await asyncio.sleep(0.01)
            finally:
                await backend.aclose()
            response = await request
        assert response.status_code == 200
        events = events_of(response.content)
        assert events[-1] == b"data: [DONE]\n\n" and any(inspect(e).tokens for e in events)
        # down (port closed), then loading (503 "Loading model"), then healthy; never back.
        order = [State.DOWN, State.LOADING, State.HEALTHY]
        assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)
        assert State.LOADING in states, states
    finally:
        run_sync(lambda: delete_model_queue(llama.amqp_url, model))

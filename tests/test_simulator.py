"""vLLM simulator over a real port: wire format, batching, priority, metrics and abort on disconnect."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from sse_starlette.sse import AppStatus

from llmdispatch.simulator.app import create_app

MODEL = "sim-model"


class SimServer:
    """The simulator app under uvicorn in a background thread (its own event loop)."""

    def __init__(self, **kwargs: Any) -> None:
        self.app = create_app(**kwargs)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> SimServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "simulator did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    server = SimServer(
        decode_ms=1, decode_ms_per_seq=0, prefill_ms=1, max_num_seqs=64, seed=7, max_tokens_default=8
    ).start()
    yield server
    server.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., SimServer]]:
    servers: list[SimServer] = []

    def make(**kwargs: Any) -> SimServer:
        server = SimServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
async def http(sim: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        yield client


def oai(server: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=10)


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/sim/stats")
    r.raise_for_status()
    return r.json()


async def aborted_is(client: httpx.AsyncClient, n: int) -> bool:
    return (await stats(client))["aborted"] == n


async def started_is(client: httpx.AsyncClient, n: int) -> bool:
    return (await stats(client))["started"] == n


async def waiting_is(client: httpx.AsyncClient, n: int) -> bool:
    return (await stats(client))["waiting"] == n


async def metric_values(client: httpx.AsyncClient) -> dict[str, float]:
    r = await client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for m in re.finditer(r'^(vllm:\w+)\{model_name="sim-model"\} (\S+)$', r.text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def split_events(raw: bytes) -> list[bytes]:
    """Split an SSE body on blank lines; asserts vLLM framing (single data line, \\n\\n)."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    for ev in events:
        assert ev.startswith(b"data: ") and b"\n" not in ev and b"\r" not in ev, ev
    assert events[-1] == b"data: [DONE]"
    return [ev[6:] for ev in events[:-1]]


def assert_compact(data: bytes) -> dict[str, Any]:
    obj = json.loads(data)
    assert json.dumps(obj, separators=(",", ":")).encode() == data
    return obj


async def raw_stream(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", path, json=body) as r:
        raw = b"".join([b async for b in r.aiter_raw()])
    return r, raw


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "say hello to the world"}]}


async def test_chat_stream_wire_format(http: httpx.AsyncClient) -> None:
    r, raw = await raw_stream(http, "/v1/chat/completions", {**CHAT, "max_tokens": 5, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = split_events(raw)
    assert len(events) == 6  # role chunk + 5 tokens, no usage chunk
    chunks = [assert_compact(e) for e in events]
    first = chunks[0]
    rid, created = first["id"], first["created"]
    assert rid.startswith("chatcmpl-")
    expected = (
        f'{{"id":"{rid}","object":"chat.completion.chunk","created":{created},"model":"{MODEL}",'
        '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}'
    )
    assert events[0] == expected.encode()
    for c in chunks:
        assert list(c) == ["id", "object", "created", "model", "choices"]
        assert (c["id"], c["created"], c["object"], c["model"]) == (
            rid,
            created,
            "chat.completion.chunk",
            MODEL,
        )
    for c in chunks[1:-1]:
        assert c["choices"] == [
            {
                "index": 0,
                "delta": {"content": c["choices"][0]["delta"]["content"]},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "length" and "stop_reason" in last and last["stop_reason"] is None
    assert last["delta"]["content"].startswith(" ")


async def test_chat_stream_usage_options(http: httpx.AsyncClient) -> None:
    body = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    _, raw = await raw_stream(http, "/v1/chat/completions", body)
    chunks = [assert_compact(e) for e in split_events(raw)]
    assert len(chunks) == 5
    assert all("usage" not in c for c in chunks[:-1])
    assert list(chunks[-1]) == ["id", "object", "created", "model", "choices", "usage"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3}

    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    _, raw = await raw_stream(http, "/v1/chat/completions", body)
    chunks = [assert_compact(e) for e in split_events(raw)]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]
    assert all(c["usage"]["total_tokens"] == 5 + c["usage"]["completion_tokens"] for c in chunks)


async def test_completions_stream_wire_format(http: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "prompt": "once upon a time",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r, raw = await raw_stream(http, "/v1/completions", body)
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    chunks = [assert_compact(e) for e in split_events(raw)]
    assert len(chunks) == 5  # 4 tokens + usage, no role chunk
    rid, created = chunks[0]["id"], chunks[0]["created"]
    assert rid.startswith("cmpl-")
    text = chunks[0]["choices"][0]["text"]
    assert raw.startswith(
        f'data: {{"id":"{rid}","object":"text_completion","created":{created},"model":"{MODEL}",'
        f'"choices":[{{"index":0,"text":{json.dumps(text)},"logprobs":null,"finish_reason":null,'
        '"stop_reason":null}]}\n\n'.encode()
    )
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "length"]
    assert all(c["id"] == rid and c["created"] == created for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["prompt_tokens"] == 4


async def test_openai_client_stream_matches_non_stream(sim: SimServer) -> None:
    client = oai(sim)
    messages: Any = CHAT["messages"]
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    parts: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 6 and usage.prompt_tokens == 5
    full = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length"
    # Same prompt and seed: the same text, streaming or not.
    assert full.choices[0].message.content == "".join(parts)
    assert full.usage is not None and (full.usage.prompt_tokens, full.usage.completion_tokens) == (5, 6)

    comp = await client.completions.create(model=MODEL, prompt="one two three")
    assert comp.object == "text_completion" and comp.choices[0].finish_reason == "length"
    assert comp.usage is not None and (comp.usage.prompt_tokens, comp.usage.completion_tokens) == (3, 8)
    assert len(comp.choices[0].text.split()) == 8

    async with client.completions.with_streaming_response.create(
        model=MODEL, prompt="one two three", max_tokens=8, stream=True
    ) as resp:
        lines = [line async for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    assert streamed == comp.choices[0].text


async def test_request_id_header(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 2, "user": "alice"},
        headers={"X-Request-Id": "req-abc"},
    )
    assert r.status_code == 200 and r.json()["id"] == "chatcmpl-req-abc"
    events = [e for e in (await stats(http))["log"] if e["request_id"] == "req-abc"]
    assert [e["event"] for e in events] == ["queued", "started", "finished"]
    assert all(e["user"] == "alice" and e["priority"] == 0 for e in events)


async def test_embeddings(sim: SimServer, http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/embeddings", json={"model": MODEL, "input": ["a b", "c"]})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["total_tokens"] == 3
    vectors = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(len(v) == 16 and all(-1 <= x < 1 for x in v) for v in vectors)
    assert vectors[0] != vectors[1]

    r = await http.post("/v1/embeddings", json={"model": MODEL, "input": "a b", "encoding_format": "base64"})
    packed = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack("<16f", packed)) == vectors[0]

    # The openai client asks for base64 and decodes it itself.
    emb = await oai(sim).embeddings.create(model=MODEL, input=["a b", "c"])
    assert [d.embedding for d in emb.data] == vectors

    # `dimensions`, as vLLM takes it for Matryoshka models: answers of realistic size.
    emb = await oai(sim).embeddings.create(model=MODEL, input=["a b", "c"], dimensions=1024)
    assert [len(d.embedding) for d in emb.data] == [1024, 1024]
    r = await http.post("/v1/embeddings", json={"model": MODEL, "input": "a", "dimensions": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


async def test_models_health_version(sim: SimServer, http: httpx.AsyncClient) -> None:
    models = await oai(sim).models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = (await http.get("/v1/models")).json()["data"][0]
    assert card["owned_by"] == "vllm" and card["root"] == MODEL and card["max_model_len"] == 4096
    r = await http.get("/health")
    assert r.status_code == 200 and r.content == b""
    assert "version" in (await http.get("/version")).json()
    r = await http.get("/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(
    ("path", "body", "status", "err_type"),
    [
        ("/v1/chat/completions", b"{not json", 400, "BadRequestError"),
        ("/v1/chat/completions", b"[1, 2]", 400, "BadRequestError"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "BadRequestError"),
        ("/v1/completions", {"model": MODEL}, 400, "BadRequestError"),
        ("/v1/chat/completions", {**CHAT, "model": "other"}, 404, "NotFoundError"),
        ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "NotFoundError"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "BadRequestError"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "ten"}, 400, "BadRequestError"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400, "BadRequestError"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 5000}, 400, "BadRequestError"),
        ("/v1/chat/completions", {**CHAT, "priority": "high"}, 400, "BadRequestError"),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "BadRequestError"),
        ("/v1/chat/completions", {**CHAT, "user": "simulate-error-400"}, 400, "BadRequestError"),
        ("/v1/chat/completions", {**CHAT, "user": "simulate-error-500"}, 500, "InternalServerError"),
        (
            "/v1/completions",
            {"prompt": "x", "user": "simulate-error-500", "stream": True},
            500,
            "InternalServerError",
        ),
        ("/v1/embeddings", {"model": MODEL}, 400, "BadRequestError"),
    ],
)
async def test_errors(http: httpx.AsyncClient, path: str, body: Any, status: int, err_type: str) -> None:
    before = (await stats(http))["log"]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == err_type and err["code"] == status and isinstance(err["message"], str)
    assert set(err) == {"message", "type", "param", "code"}
    assert len((await stats(http))["log"]) == len(before)  # nothing was queued


async def test_openai_client_errors(sim: SimServer) -> None:
    client = oai(sim)
    messages: Any = CHAT["messages"]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=MODEL, messages=messages, user="simulate-error-400")
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model=MODEL, messages=messages, user="simulate-error-500", stream=True)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="missing", prompt="x")


async def test_priority_disabled(make_server: Callable[..., SimServer]) -> None:
    server = make_server(priority_scheduling=False, decode_ms=1, decode_ms_per_seq=0)
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1, "priority": 3})
        assert r.status_code == 400 and "priority" in r.json()["error"]["message"].lower()
        r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1, "priority": 0})
        assert r.status_code == 200


async def test_metrics_while_running(make_server: Callable[..., SimServer]) -> None:
    server = make_server(max_num_seqs=2, decode_ms=5, decode_ms_per_seq=0, prefill_ms=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        tasks = [
            asyncio.create_task(client.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 30}))
            for _ in range(5)
        ]

        m: dict[str, float] = {}

        async def full() -> bool:
            m.update(await metric_values(client))
            return m["vllm:num_requests_running"] == 2 and m["vllm:num_requests_waiting"] == 3

        # Asserted on the same reading: by a second one, steps later, the first two may have finished.
        await wait_for(full)
        assert m["vllm:kv_cache_usage_perc"] == 1.0
        assert m["vllm:prompt_tokens_total"] == 6  # only the two started requests are prefilled
        assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))
        m = await metric_values(client)
        assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (0, 0)
        assert m["vllm:kv_cache_usage_perc"] == 0.0
        assert m["vllm:generation_tokens_total"] == 150 and m["vllm:prompt_tokens_total"] == 15
        s = await stats(client)
        assert (s["started"], s["finished"], s["aborted"], s["generated_tokens"]) == (5, 5, 0, 150)
        assert (await client.post("/sim/reset")).status_code == 200
        s = await stats(client)
        assert (s["started"], s["finished"], s["generated_tokens"], s["log"]) == (0, 0, 0, [])


async def test_priority_order(make_server: Callable[..., SimServer]) -> None:
    server = make_server(max_num_seqs=1, decode_ms=5, decode_ms_per_seq=0, prefill_ms=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

        def send(rid: str, priority: int, max_tokens: int = 4) -> asyncio.Task[httpx.Response]:
            body = {**CHAT, "max_tokens": max_tokens, "priority": priority}
            return asyncio.create_task(client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": rid}))

        tasks = [send("first", 0, max_tokens=100)]

        async def first_running() -> bool:
            s = await stats(client)
            return (s["running"], s["waiting"]) == (1, 0)

        await wait_for(first_running)
        for n, (rid, prio) in enumerate([("low-5", 5), ("low-0a", 0), ("low-0b", 0)], start=1):
            tasks.append(send(rid, prio))
            await wait_for(lambda n=n: waiting_is(client, n))  # arrival order is the send order
        tasks.append(send("urgent", -5))
        await wait_for(lambda: waiting_is(client, 4))
        assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))
        started = [e["request_id"] for e in (await stats(client))["log"] if e["event"] == "started"]
        assert started == ["first", "urgent", "low-0a", "low-0b", "low-5"]


async def test_abort_running_stream(make_server: Callable[..., SimServer]) -> None:
    server = make_server(max_num_seqs=4, decode_ms=5, decode_ms_per_seq=0)
    client = oai(server)
    messages: Any = CHAT["messages"]
    async with httpx.AsyncClient(base_url=server.url) as http:
        async with client.chat.completions.with_streaming_response.create(
            model=MODEL,
            messages=messages,
            max_tokens=2000,
            stream=True,
            extra_headers={"X-Request-Id": "long"},
        ) as resp:
            n = 0
            async for line in resp.iter_lines():
                n += bool(line)
                if n == 3:
                    break
        # Leaving the block closed the connection: the engine must drop the sequence.
        await wait_for(lambda: aborted_is(http, 1))
        s = await stats(http)
        assert (s["running"], s["waiting"], s["finished"]) == (0, 0, 0)
        assert s["log"][-1]["event"] == "aborted" and s["log"][-1]["request_id"] == "long"
        await asyncio.sleep(0.1)
        assert (await stats(http))["generated_tokens"] == s["generated_tokens"] < 100


async def test_abort_waiting_stream(make_server: Callable[..., SimServer]) -> None:
    server = make_server(max_num_seqs=1, decode_ms=5, decode_ms_per_seq=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        body = {**CHAT, "max_tokens": 2000, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "a"}) as ra:
            chunks_a = ra.aiter_raw()  # keep a reference: a collected iterator would close the connection
            await anext(chunks_a)
            async with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "b"}):
                await wait_for(lambda: waiting_is(http, 1))
            await wait_for(lambda: aborted_is(http, 1))
            s = await stats(http)
            assert (s["started"], s["running"], s["waiting"]) == (1, 1, 0)
            assert [e["event"] for e in s["log"] if e["request_id"] == "b"] == ["queued", "aborted"]
        await wait_for(lambda: aborted_is(http, 2))
        assert (await stats(http))["running"] == 0


async def test_abort_non_streaming(make_server: Callable[..., SimServer]) -> None:
    server = make_server(max_num_seqs=1, decode_ms=5, decode_ms_per_seq=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        body = {"prompt": "x", "max_tokens": 2000}
        running = asyncio.create_task(http.post("/v1/completions", json=body))
        # Only then the second: two requests sent together may reach the server in either order.
        await wait_for(lambda: started_is(http, 1))
        waiting = asyncio.create_task(http.post("/v1/completions", json=body))
        await wait_for(lambda: waiting_is(http, 1))
        waiting.cancel()  # cancelling the httpx request closes its connection
        await wait_for(lambda: aborted_is(http, 1))
        assert (await stats(http))["running"] == 1
        running.cancel()
        await wait_for(lambda: aborted_is(http, 2))
        s = await stats(http)
        assert (s["running"], s["waiting"], s["started"], s["finished"]) == (0, 0, 1, 0)
        await asyncio.sleep(0.05)
        assert (await stats(http))["generated_tokens"] == s["generated_tokens"]


async def test_token_rate_follows_simulated_time(make_server: Callable[..., SimServer]) -> None:
    # 100 streams in one batch: 20 steps of 10 + 0.25 * 100 ms (+5 ms prefill) ~ 0.7 s, whatever the CPU.
    server = make_server(max_num_seqs=256, decode_ms=10, decode_ms_per_seq=0.25, prefill_ms=5)
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits) as http:
        body = {"prompt": "p", "max_tokens": 20, "stream": True}

        async def one() -> int:
            _, raw = await raw_stream(http, "/v1/completions", body)
            return len(split_events(raw))

        t0 = time.monotonic()
        counts = await asyncio.gather(*(one() for _ in range(100)))
        elapsed = time.monotonic() - t0
        assert counts == [20] * 100
        # Never faster than simulated time; the upper bound is loose because CI boxes are noisy.
        assert 0.6 < elapsed < 10, elapsed
        s = await stats(http)
        assert s["started"] == 100 and s["generated_tokens"] == 2000


async def test_should_exit_flag_is_reset(make_server: Callable[..., SimServer]) -> None:
    AppStatus.should_exit = True  # as left behind by an earlier server's shutdown in this process
    server = make_server(decode_ms=1, decode_ms_per_seq=0)
    assert AppStatus.should_exit is False
    async with httpx.AsyncClient(base_url=server.url) as http:
        _, raw = await raw_stream(http, "/v1/chat/completions", {**CHAT, "max_tokens": 3, "stream": True})
    assert len(split_events(raw)) == 4

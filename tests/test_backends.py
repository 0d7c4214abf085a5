"""Event parsing in both JSON dialects, and the backend adapters against real processes (the simulator).

The real llama-server is in tests/test_llamacpp.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from llmdispatch.usage import read_usage
from llmdispatch.worker.backends import (
    AutoBackend,
    Backend,
    GenericBackend,
    LlamaCppBackend,
    Load,
    SGLangBackend,
    State,
    VLLMBackend,
    detect,
    make_backend,
    parse_gauges,
)
from llmdispatch.worker.events import Usage, body_usage, inspect
from tests.stack import STREAM_URL, Stack, delete_stream, free_port, run_sync, wait_http

# -- events.inspect: one event, each dialect ----------------------------------------------------

USAGE = {"prompt_tokens": 12, "total_tokens": 21, "completion_tokens": 9}
TOKEN_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": " fox"}, "logprobs": None, "finish_reason": None}],
}
LAST_CHUNK = {**TOKEN_CHUNK, "choices": [{"index": 0, "delta": {"content": "."}, "finish_reason": "length"}]}
USAGE_CHUNK = {**TOKEN_CHUNK, "choices": [], "usage": USAGE}


def compact(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def spaced(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def reordered(obj: object) -> bytes:
    def rev(value: object) -> object:
        if isinstance(value, dict):
            return {k: rev(v) for k, v in reversed(value.items())}
        if isinstance(value, list):
            return [rev(v) for v in value]
        return value

    return spaced(rev(obj))


def multiline(obj: object) -> bytes:
    """The JSON pretty-printed over several ``data:`` lines (SSE joins them with newlines)."""
    lines = json.dumps(obj, indent=1).split("\n")
    return b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"


DIALECTS = [compact, spaced, reordered, multiline]


@pytest.mark.parametrize("write", DIALECTS)
def test_usage_chunk_is_found_in_every_dialect(write: object) -> None:
    event = write(USAGE_CHUNK)  # type: ignore[operator]
    info = inspect(event)
    assert info.parsed and info.usage_only and not info.tokens and not info.is_done
    assert info.usage == Usage(prompt_tokens=12, completion_tokens=9)


@pytest.mark.parametrize("write", DIALECTS)
def test_token_and_last_chunks(write: object) -> None:
    info = inspect(write(TOKEN_CHUNK))  # type: ignore[operator]
    assert info.parsed and info.tokens and info.usage is None and not info.usage_only and info.finish_reasons == ()
    info = inspect(write(LAST_CHUNK))  # type: ignore[operator]
    assert info.finish_reasons == ("length",) and info.tokens


@pytest.mark.parametrize("write", DIALECTS)
def test_continuous_usage_is_not_a_usage_only_chunk(write: object) -> None:
    # vLLM's continuous_usage_stats and llama.cpp's last chunk carry usage beside a choice: always forwarded.
    info = inspect(write({**LAST_CHUNK, "usage": USAGE}))  # type: ignore[operator]
    assert info.usage == Usage(12, 9) and not info.usage_only and info.finish_reasons == ("length",)


def test_role_chunk_carries_no_tokens_and_completions_text_does() -> None:
    role = {**TOKEN_CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert not inspect(compact(role)).tokens
    llama_role = {"choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}]}
    assert not inspect(compact(llama_role)).tokens
    text = {"id": "cmpl-1", "choices": [{"index": 0, "text": " hi", "finish_reason": None}]}
    assert inspect(spaced(text)).tokens
    reasoning = {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}
    assert inspect(compact(reasoning)).tokens
    tools = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]}
    assert inspect(compact(tools)).tokens


def test_several_choices_report_each_finish_reason() -> None:
    chunk = {"choices": [{"index": 0, "finish_reason": "stop"}, {"index": 1, "finish_reason": None}]}
    assert inspect(spaced(chunk)).finish_reasons == ("stop",)


def test_done_comments_and_garbage() -> None:
    assert inspect(b"data: [DONE]\n\n").is_done
    assert inspect(b"data:[DONE]\r\n\r\n").is_done
    for event in (
        b": ping\n\n",
        b"data: not json\n\n",
        b"data: [1, 2]\n\n",
        b"event: x\n\n",
        b'data: {"choices": 3}\n\n',
    ):
        info = inspect(event)
        assert not info.parsed and info.usage is None and not info.usage_only and not info.is_done, event


def test_other_fields_and_crlf_and_nulls() -> None:
    # Extra fields (llama.cpp's timings), CRLF line ends, an event: line, and null counts.
    chunk = {"choices": [], "timings": {"predicted_n": 9}, "usage": {"prompt_tokens": None, "completion_tokens": 4}}
    event = b"event: message\r\ndata: " + json.dumps(chunk).encode() + b"\r\n\r\n"
    info = inspect(event)
    assert info.usage == Usage(0, 4) and info.usage_only
    # Usage without any choices key is a usage-only event too.
    assert inspect(spaced({"usage": USAGE})).usage_only


def test_body_usage_of_whole_responses() -> None:
    body = {"id": "x", "choices": [{"message": {"content": "hi"}}], "usage": USAGE}
    assert body_usage(json.dumps(body).encode()) == Usage(12, 9)
    assert body_usage(json.dumps(body, separators=(",", ":")).encode()) == Usage(12, 9)
    assert body_usage(b'{"data": []}') is None
    assert body_usage(b"<html>") is None


# -- backends: metric parsing and request preparation --------------------------------------------

METRICS = b"""# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
llamacpp:requests_deferred 5
sglang:num_running_reqs{model_name="m",tp_rank="0"} 3
sglang:num_running_reqs{model_name="m",tp_rank="1"} 4
vllm:kv_cache_usage_perc{model_name="m"} NaN
vllm:num_requests_running{model_name="m"} 1.5e+01
"""


def test_parse_gauges_sums_label_sets_and_skips_nan() -> None:
    names = {
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        "sglang:num_running_reqs",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
    }
    assert parse_gauges(METRICS, names) == {
        "llamacpp:requests_processing": 2.0,
        "llamacpp:requests_deferred": 5.0,
        "sglang:num_running_reqs": 7.0,
        "vllm:num_requests_running": 15.0,
    }


async def test_priority_and_usage_options_per_backend() -> None:
    cases = [
        (VLLMBackend, False, None),
        (VLLMBackend, True, 2),  # ours 8 (higher first) -> vLLM 2 (lower first)
        (SGLangBackend, True, 8),  # SGLang: higher first, like ours
        (LlamaCppBackend, True, None),
        (GenericBackend, True, None),
    ]
    for cls, priority, expected in cases:
        backend = cls("http://127.0.0.1:1/v1", priority=priority)
        try:
            body: dict[str, object] = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": True}}
            wants_usage = backend.prepare(body, 8, stream=True)
            assert wants_usage is False
            assert body["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
            assert body.get("priority") == expected, cls
            assert backend.accepts_priority is (expected is not None)
            body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
            assert backend.prepare(body, 8, stream=True) is True
            body = {"model": "m"}
            assert backend.prepare(body, 8, stream=False) is True and "stream_options" not in body
        finally:
            await backend.aclose()
    assert VLLMBackend.continuous_usage and not LlamaCppBackend.continuous_usage


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tgi'"):
        make_backend("tgi", "http://127.0.0.1:1")


async def test_unreachable_server_is_down() -> None:
    for kind in ("vllm", "sglang", "llamacpp", "generic", "auto"):
        backend = make_backend(kind, f"http://127.0.0.1:{free_port()}/v1")
        try:
            probe = await backend.probe()
            assert probe.state is State.DOWN and not probe.healthy and probe.load is None, kind
            assert "unreachable" in probe.detail
        finally:
            await backend.aclose()


# -- backends against the simulator (a vLLM stand-in) --------------------------------------------


def start_simulator(stack: Stack, json_style: str, max_num_seqs: int = 16) -> None:
    port = free_port()
    stack.spawn(
        "simulator",
        "simulate", "--model", stack.model, "--port", str(port), "--max-num-seqs", str(max_num_seqs),
        "--decode-ms", "5", "--json-style", json_style,
    )  # fmt: skip
    stack.simulator_url = f"http://127.0.0.1:{port}"
    wait_http(stack.simulator_url + "/health")


@pytest.fixture(scope="module")
def spaced_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A simulator writing spaced JSON, a worker (with a usage ledger) and a gateway."""
    stream = "test-backends-" + uuid.uuid4().hex[:10]
    stack = Stack(
        tmp_path_factory.mktemp("spaced"),
        env={"DISPATCHER_USAGE_STREAM_URL": STREAM_URL, "DISPATCHER_USAGE_STREAM_NAME": stream},
    )
    stack.stream = stream  # type: ignore[attr-defined]
    try:
        start_simulator(stack, "spaced", max_num_seqs=4)
        stack.start_worker(max_concurrency=4)
        stack.start_gateway()
        stack.token = stack.add_token("backends", priority=5)
        yield stack
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))


async def test_backends_probe_the_simulator(spaced_stack: Stack) -> None:
    url = spaced_stack.simulator_url + "/v1"
    vllm = make_backend("vllm", url)
    try:
        probe = await vllm.probe()
        assert probe.healthy and probe.load is not None
        assert probe.load.running >= 0 and probe.load.waiting >= 0 and probe.load.kv_usage is not None
    finally:
        await vllm.aclose()
    # The right health semantics, but none of these metric names: no load signal.
    for kind in ("generic", "llamacpp", "sglang"):
        backend = make_backend(kind, url)
        try:
            probe = await backend.probe()
            assert probe.healthy and probe.load is None, kind
        finally:
            await backend.aclose()
    assert await detect(spaced_stack.simulator_url) is VLLMBackend
    auto = make_backend("auto", url)
    assert isinstance(auto, AutoBackend) and not auto.accepts_priority
    try:
        probe = await auto.probe()
        assert probe.healthy and isinstance(probe.load, Load) and auto.detected is not None
        assert auto.detected.kind == "vllm" and auto.continuous_usage
    finally:
        await auto.aclose()


async def test_backends_count_a_prompt_the_way_they_can(spaced_stack: Stack) -> None:
    """vLLM's /tokenize (the simulator mirrors it) counts a prompt as the answer's usage would;
    an adapter without a tokenizer endpoint, or a server that cannot answer, gives None (estimated)."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
    chat = {"model": spaced_stack.model, "messages": messages}
    completion = {"model": spaced_stack.model, "prompt": "four five six seven"}
    vllm, generic = (
        make_backend("vllm", spaced_stack.simulator_url + "/v1"),
        make_backend("generic", spaced_stack.simulator_url),
    )
    gone = make_backend("vllm", f"http://127.0.0.1:{free_port()}")
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            answered = await http.post(
                spaced_stack.simulator_url + "/v1/chat/completions", json={**chat, "max_tokens": 1}
            )
        assert await vllm.count_prompt("chat/completions", chat, 2.0) == answered.json()["usage"]["prompt_tokens"] == 5
        assert await vllm.count_prompt("completions", completion, 2.0) == 4
        assert await vllm.count_prompt("embeddings", {"input": "x"}, 2.0) is None
        assert await generic.count_prompt("chat/completions", chat, 2.0) is None
        assert await gone.count_prompt("chat/completions", chat, 2.0) is None
    finally:
        for backend in (vllm, generic, gone):
            await backend.aclose()


async def test_probe_sees_the_simulators_running_requests(spaced_stack: Stack) -> None:
    backend = make_backend("vllm", spaced_stack.simulator_url)
    body = {"model": spaced_stack.model, "prompt": "busy", "max_tokens": 2000, "stream": True}
    try:
        async with httpx.AsyncClient(base_url=spaced_stack.simulator_url, timeout=30) as http:
            async with contextlib.AsyncExitStack() as streams:
                for _ in range(6):  # 4 slots: 4 run, 2 wait
                    await streams.enter_async_context(http.stream("POST", "/v1/completions", json=body))
                # Arrivals are admitted at step boundaries: a probe between two steps may see 1 running, 5
                # waiting. Once a step has taken all it may, 4 run and 2 wait.
                load = await until(backend, lambda load: load is not None and (load.running, load.waiting) == (4, 2))
                assert load is not None and (load.running, load.waiting) == (4.0, 2.0)
                assert load.kv_usage is not None and 0 < load.kv_usage <= 1
            # Leaving closed the streams: the simulator aborted them.
            load = await until(backend, lambda load: load is not None and load.running + load.waiting == 0)
            assert load == Load(0.0, 0.0, 0.0)
    finally:
        await backend.aclose()


async def until(backend: Backend, condition: Callable[[Load | None], bool], timeout: float = 10.0) -> Load | None:
    """The backend's load once ``condition`` holds (or the last one seen after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        load = (await backend.probe()).load
        if condition(load) or time.monotonic() > deadline:
            return load
        await asyncio.sleep(0.05)


def events_of(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return [event + b"\n\n" for event in raw.split(b"\n\n")[:-1]]


async def test_spaced_simulator_speaks_the_other_dialect(spaced_stack: Stack) -> None:
    body = {
        "model": spaced_stack.model,
        "messages": [{"role": "user", "content": "two dialects"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(timeout=30) as http:
        raw = (await http.post(spaced_stack.simulator_url + "/v1/chat/completions", json=body)).content
        whole = await http.post(spaced_stack.simulator_url + "/v1/completions", json={"prompt": "a b", "max_tokens": 3})
    events = events_of(raw)
    assert b'"usage": {' in events[-2] and b'"usage":{' not in raw  # the byte search the worker used to do fails
    assert events[-2].startswith(b'data: {"usage": {') and events[-1] == b"data: [DONE]\n\n"  # keys reversed
    infos = [inspect(e) for e in events]
    assert [i.usage_only for i in infos] == [False] * (len(events) - 2) + [True, False]
    assert infos[-2].usage == Usage(prompt_tokens=2, completion_tokens=5)
    assert sum(i.tokens for i in infos) == 5 and infos[-3].finish_reasons == ("length",)
    assert b'"usage": {' in whole.content and body_usage(whole.content) == Usage(2, 3)


async def test_spaced_usage_chunk_reaches_only_clients_that_asked(spaced_stack: Stack) -> None:
    body: dict[str, object] = {
        "model": spaced_stack.model,
        "messages": [{"role": "user", "content": "no usage please"}],
        "max_tokens": 6,
        "stream": True,
        "seed": 1,
    }
    headers = {"Authorization": f"Bearer {spaced_stack.token}"}
    async with httpx.AsyncClient(timeout=30) as http:
        direct = await http.post(spaced_stack.simulator_url + "/v1/chat/completions", json=body)
        relayed = await http.post(spaced_stack.gateway_url + "/v1/chat/completions", json=body, headers=headers)
    assert relayed.status_code == 200
    assert len(events_of(relayed.content)) == len(events_of(direct.content))
    assert not any(inspect(e).usage_only for e in events_of(relayed.content))


async def test_spaced_usage_reaches_the_ledger(spaced_stack: Stack) -> None:
    since = time.time()
    secret = spaced_stack.add_token("backends-ledger", priority=5)
    headers = {"Authorization": f"Bearer {secret}"}
    body: dict[str, object] = {"model": spaced_stack.model, "prompt": "one two three", "max_tokens": 4}
    async with httpx.AsyncClient(base_url=spaced_stack.gateway_url, headers=headers, timeout=30) as http:
        for options in (None, {"include_usage": True}):
            streamed = {**body, "stream": True}
            if options:
                streamed["stream_options"] = options
            assert (await http.post("/v1/completions", json=streamed)).status_code == 200
        assert (await http.post("/v1/completions", json=body)).status_code == 200
    deadline = time.monotonic() + 20
    records = []
    while time.monotonic() < deadline:
        stream = spaced_stack.stream  # type: ignore[attr-defined]
        records = [r for r in await read_usage(STREAM_URL, stream, since) if r.token == "backends-ledger"]
        if len(records) >= 3:
            break
        await asyncio.sleep(0.3)
    assert len(records) == 3
    assert all((r.prompt_tokens, r.completion_tokens, r.usage_reported) == (3, 4, True) for r in records)

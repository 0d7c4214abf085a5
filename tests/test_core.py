"""The heart of it: OpenAI clients streaming through gateway, RabbitMQ, worker and simulator."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.stack import DATABASES, Stack

CHAT = {"messages": [{"role": "user", "content": "Tell me about priority queues"}], "max_tokens": 12}


def async_client(stack: Stack, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.gateway_url + "/v1", api_key=token, max_retries=0, timeout=30)


async def test_async_streaming_chat(stack: Stack) -> None:
    client = async_client(stack, stack.token)  # type: ignore[attr-defined]
    stream = await client.chat.completions.create(model=stack.model, stream=True, **CHAT)  # type: ignore[arg-type]
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # not asked for: vLLM would not have sent it


async def test_async_streaming_with_usage(stack: Stack) -> None:
    client = async_client(stack, stack.token)  # type: ignore[attr-defined]
    stream = await client.chat.completions.create(
        model=stack.model,
        stream=True,
        stream_options={"include_usage": True},
        **CHAT,  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_sync_client_all_endpoints(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.token, max_retries=0)  # type: ignore[attr-defined]
    reply = client.chat.completions.create(model=stack.model, **CHAT)  # type: ignore[arg-type]
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None and reply.usage.completion_tokens == 12

    completion = client.completions.create(model=stack.model, prompt="Once upon a time", max_tokens=5)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5  # type: ignore[union-attr]

    streamed = client.completions.create(model=stack.model, prompt="Once", max_tokens=7, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices).count(" ") == 7

    embedding = client.embeddings.create(model=stack.model, input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) > 0

    models = client.models.list()
    assert stack.model in [m.id for m in models.data]
    assert client.models.retrieve(stack.model).id == stack.model


_VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


def _events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return [_VOLATILE.sub(rb'"\1":"-"', event) for event in raw.split(b"\n\n")[:-1]]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_sse_bytes_identical_to_direct(stack: Stack, endpoint: str, include_usage: bool) -> None:
    body: dict[str, object] = {"model": stack.model, "stream": True, "max_tokens": 9, "seed": 7}
    body.update({"messages": CHAT["messages"]} if endpoint == "chat/completions" else {"prompt": "Hello"})
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {stack.token}"}  # type: ignore[attr-defined]
    with httpx.Client(timeout=30) as http:
        direct = http.post(f"{stack.simulator_url}/v1/{endpoint}", json=body)
        relayed = http.post(f"{stack.gateway_url}/v1/{endpoint}", json=body, headers=headers)
    assert relayed.status_code == direct.status_code == 200
    assert relayed.headers["content-type"] == direct.headers["content-type"]
    assert relayed.headers["x-request-id"].startswith("req-")
    # Proxies (ingress-nginx) must pass each event on at once rather than buffer the stream.
    assert relayed.headers["cache-control"] == "no-cache" and relayed.headers["x-accel-buffering"] == "no"
    assert _events(relayed.content) == _events(direct.content)
    assert relayed.content.endswith(b"data: [DONE]\n\n")


def test_non_streaming_body_identical_to_direct(stack: Stack) -> None:
    body = {"model": stack.model, "seed": 3, **CHAT}
    with httpx.Client(timeout=30) as http:
        direct = http.post(f"{stack.simulator_url}/v1/chat/completions", json=body)
        relayed = http.post(
            f"{stack.gateway_url}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {stack.token}"},  # type: ignore[attr-defined]
        )  # fmt: skip
    assert relayed.status_code == 200
    assert _events(relayed.content + b"\n\n") == _events(direct.content + b"\n\n")


# -- errors -----------------------------------------------------------------------------------


def _post(stack: Stack, body: bytes | dict[str, object], token: str | None = "ok", path: str = "chat/completions",
          ) -> httpx.Response:  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = "Bearer " + (stack.token if token == "ok" else token)  # type: ignore[attr-defined]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{stack.gateway_url}/v1/{path}", content=content, headers=headers, timeout=30)


def _assert_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    return error


def test_auth_errors(stack: Stack) -> None:
    _assert_error(_post(stack, {"model": stack.model, **CHAT}, token=None), 401)
    _assert_error(_post(stack, {"model": stack.model, **CHAT}, token="sk-nope"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_request_errors(stack: Stack) -> None:
    assert _assert_error(_post(stack, {"model": "no-such-model", **CHAT}), 404)["param"] == "model"
    _assert_error(_post(stack, b"{not json"), 400)
    _assert_error(_post(stack, b"[1, 2]"), 400)
    assert _assert_error(_post(stack, {"messages": CHAT["messages"]}), 400)["param"] == "model"
    assert _assert_error(_post(stack, {"model": stack.model}), 400)["param"] == "messages"
    assert _assert_error(_post(stack, {"model": stack.model}, path="completions"), 400)["param"] == "prompt"
    assert _assert_error(_post(stack, {"model": stack.model}, path="embeddings"), 400)["param"] == "input"
    assert _assert_error(_post(stack, {"model": 42, **CHAT}), 400)["param"] == "model"
    _assert_error(_post(stack, b'{"model": "x", "pad": "' + b"a" * (2 * 1024 * 1024) + b'"}'), 413)
    _assert_error(httpx.get(stack.gateway_url + "/v1/nothing-here"), 404)
    _assert_error(httpx.get(stack.gateway_url + "/v1/chat/completions"), 405)


def test_vllm_errors_pass_through_unchanged(stack: Stack) -> None:
    for status in (400, 500):
        body = {"model": stack.model, "user": f"simulate-error-{status}", **CHAT}
        with httpx.Client(timeout=30) as http:
            direct = http.post(f"{stack.simulator_url}/v1/chat/completions", json=body)
        relayed = _post(stack, body)
        assert relayed.status_code == direct.status_code == status
        assert relayed.json() == direct.json()
    stream_body = {"model": stack.model, "user": "simulate-error-400", "stream": True, **CHAT}
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.token, max_retries=0).chat.completions.create(  # type: ignore[attr-defined]
            **stream_body  # type: ignore[arg-type]
        )


# -- every token database ------------------------------------------------------------------------


@pytest.fixture(params=list(DATABASES))
def db_gateway(request: pytest.FixtureRequest, stack: Stack, tmp_path: Path) -> Iterator[Stack]:
    """Another gateway in front of the session's worker, with its tokens in each SQL database."""
    url = DATABASES[request.param]
    other = Stack(tmp_path, database_url=url, model=stack.model)
    try:
        other.token = other.add_token(f"db-test-{request.param}", priority=3)  # type: ignore[attr-defined]
        other.start_gateway()
        yield other
    finally:
        other.close()


async def test_streaming_with_each_database(db_gateway: Stack) -> None:
    client = async_client(db_gateway, db_gateway.token)  # type: ignore[attr-defined]
    stream = await client.chat.completions.create(model=db_gateway.model, stream=True, **CHAT)  # type: ignore[arg-type]
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert len(text.split()) == 12
    with pytest.raises(openai.AuthenticationError):
        await async_client(db_gateway, "sk-unknown").chat.completions.create(model=db_gateway.model, **CHAT)  # type: ignore[arg-type]


# -- priority ------------------------------------------------------------------------------------


async def test_high_priority_request_is_started_next(make_stack: type[Stack]) -> None:
    import asyncio

    stack = make_stack(env={"DISPATCHER_EXPRESS_PRIORITY": "11"})  # one queue: its priority order
    stack.start_simulator(max_num_seqs=1, decode_ms=5)
    stack.start_worker(max_concurrency=1)
    stack.start_gateway()
    low = async_client(stack, stack.add_token("low", priority=1))
    high = async_client(stack, stack.add_token("high", priority=9))

    async def ask(client: openai.AsyncOpenAI, user: str, max_tokens: int = 5) -> str:
        reply = await client.chat.completions.create(
            model=stack.model,
            user=user,
            max_tokens=max_tokens,
            messages=CHAT["messages"],  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content or ""

    async with httpx.AsyncClient() as http:
        await http.post(stack.simulator_url + "/sim/reset")
        blocker = asyncio.create_task(ask(low, "blocker", max_tokens=400))
        await _until_started(http, stack, "blocker")
        backlog = [asyncio.create_task(ask(low, f"low-{i}")) for i in range(5)]
        await asyncio.sleep(0.3)  # they are queued in RabbitMQ behind the blocker
        urgent = asyncio.create_task(ask(high, "urgent"))
        await asyncio.gather(blocker, urgent, *backlog)
        log = (await http.get(stack.simulator_url + "/sim/stats")).json()["log"]
    started = [event["user"] for event in log if event["event"] == "started"]
    assert started[0] == "blocker"
    assert started[1] == "urgent", started
    assert sorted(started[2:]) == [f"low-{i}" for i in range(5)]


async def _until_started(http: httpx.AsyncClient, stack: Stack, user: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = (await http.get(stack.simulator_url + "/sim/stats")).json()["log"]
        if any(e["event"] == "started" and e["user"] == user for e in log):
            return
        await asyncio_sleep(0.02)
    raise TimeoutError(user + " never started")


async def asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)

"""Wrong-typed fields never give a 5xx nor hang: every top-level field, every JSON type, streamed and not.

The gateway itself checks the fields that it or the worker reads (400 naming the field in
``param``); every other field reaches the simulator (vLLM's stand-in) unchanged, which judges it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.stack import Stack

# One value of each JSON type.
VALUES: dict[str, Any] = {
    "string": "x",
    "int": 3,
    "float": 1.5,
    "bool": True,
    "null": None,
    "list": [1],
    "object": {"a": 1},
}

# Top-level fields of OpenAI's request bodies (plus vLLM's own ones the worker or gateway may touch).
COMMON = [
    "model", "stream", "stream_options", "max_tokens", "frequency_penalty", "presence_penalty", "logit_bias",
    "logprobs", "n", "seed", "stop", "temperature", "top_p", "user", "priority", "cache_salt", "top_k",
]  # fmt: skip
FIELDS = {
    "chat/completions": [
        *COMMON, "messages", "max_completion_tokens", "audio", "function_call", "functions", "metadata",
        "modalities", "parallel_tool_calls", "prediction", "reasoning_effort", "response_format", "service_tier",
        "store", "tool_choice", "tools", "top_logprobs", "web_search_options",
    ],
    "completions": [*COMMON, "prompt", "best_of", "echo", "suffix"],
    "embeddings": ["model", "input", "encoding_format", "dimensions", "user", "stream", "stream_options", "max_tokens"],
}  # fmt: skip

# Fields the gateway checks, and the JSON types it accepts for each (others: 400 with param = the field).
CHECKED: dict[str, set[str]] = {
    "model": {"string"},
    "stream": {"bool", "null"},
    "stream_options": {"object", "null"},
    "max_tokens": {"int", "null"},
    "max_completion_tokens": {"int", "null"},
    "messages": {"list"},
    "n": {"int", "null"},
    "best_of": {"int", "null"},
}


def base(stack: Stack, endpoint: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": stack.model, "max_tokens": 2, "stream": stream}
    if endpoint == "chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif endpoint == "completions":
        body["prompt"] = "hi"
    else:  # embeddings: no stream nor max_tokens of their own (they are swept as extra fields)
        body = {"model": stack.model, "input": "hi"}
    return body


def cases(stack: Stack) -> list[tuple[str, str, str, bool, dict[str, Any]]]:
    out = []
    for endpoint, fields in FIELDS.items():
        for field in fields:
            for kind, value in VALUES.items():
                for stream in (False, True) if endpoint != "embeddings" else (False,):
                    out.append((endpoint, field, kind, stream, {**base(stack, endpoint, stream), field: value}))
    return out


async def test_wrong_types_never_give_a_server_error_nor_hang(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {stack.token}"}
    limit = asyncio.Semaphore(8)
    failures: list[str] = []
    statuses: dict[int, int] = {}

    async def send(http: httpx.AsyncClient, case: tuple[str, str, str, bool, dict[str, Any]]) -> None:
        endpoint, field, kind, stream, body = case
        name = f"{endpoint} {field}={kind} stream={stream}"
        async with limit:
            try:
                # The read timeout bounds each gap between bytes: a hang fails the case.
                async with http.stream("POST", f"/v1/{endpoint}", content=json.dumps(body), headers=auth) as r:
                    raw = await r.aread()
            except httpx.TimeoutException:
                failures.append(f"{name}: no answer within the timeout")
                return
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            failures.append(f"{name}: {r.status_code} {raw[:200]!r}")
            return
        if r.status_code >= 400:
            error = json.loads(raw)["error"]
            if not error.get("message"):
                failures.append(f"{name}: {r.status_code} without an OpenAI error message")
            if field in CHECKED and kind not in CHECKED[field] and (r.status_code != 400 or error["param"] != field):
                failures.append(f"{name}: expected 400 with param {field!r}, got {r.status_code} {error}")
        elif r.status_code == 200 and b'data: {"error"' in raw:
            failures.append(f"{name}: an error event in the stream: {raw[-300:]!r}")

    all_cases = cases(stack)
    timeout = httpx.Timeout(30, connect=5)
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=timeout) as http:
        await asyncio.gather(*(send(http, case) for case in all_cases))
    print(f"\nbad-input sweep: {len(all_cases)} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} of {len(all_cases)} cases failed:\n" + "\n".join(failures[:40])
    assert sum(statuses.values()) == len(all_cases)


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions", "embeddings"])
def test_get_on_a_post_route_is_an_invalid_request(stack: Stack, endpoint: str) -> None:
    response = httpx.get(f"{stack.gateway_url}/v1/{endpoint}", timeout=10)
    assert response.status_code == 405
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "GET" in error["message"]


@pytest.mark.parametrize("value", ["x", 1, True, [], 1.5])
def test_non_object_stream_options_is_a_400_naming_it(stack: Stack, value: object) -> None:
    """The sweep of issue 13 found these as 500s from the worker."""
    body = {**base(stack, "chat/completions", True), "stream_options": value}
    response = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {stack.token}"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "stream_options" and error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_type"

"""Degraded dependencies (Redis or SQL unreachable) and bad input (schemathesis, hostile requests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import httpx
import pytest

from llmdispatch.tokens import TokenStore
from tests.faults import TcpProxy, chat, post, until
from tests.stack import DATABASES, Stack, run_sync

# -- 7. degraded dependencies -------------------------------------------------------------------------


@pytest.fixture
async def proxies() -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    """Redis and PostgreSQL behind proxies the test can cut (the real services stay up)."""
    redis, sql = TcpProxy(6379), TcpProxy(5432)
    await redis.start()
    await sql.start()
    yield redis, sql
    await redis.cut()
    await sql.cut()


async def test_auth_survives_redis_or_sql_outage(make_stack: type[Stack], proxies: tuple[TcpProxy, TcpProxy]) -> None:
    redis, sql = proxies
    postgres = DATABASES["postgresql"]
    assert postgres is not None
    stack = make_stack(database_url=postgres)
    names = ["degraded-a", "degraded-b", "degraded-c"]
    token_a, token_b, token_c = (stack.add_token(name) for name in names)
    try:
        stack.start_simulator()
        stack.start_worker()
        stack.start_gateway(
            env={
                "DISPATCHER_DATABASE_URL": postgres.replace(":5432/", f":{sql.port}/"),
                "DISPATCHER_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
            }
        )
        async with httpx.AsyncClient(timeout=30) as http:

            async def models(token: str) -> httpx.Response:
                return await http.get(stack.gateway_url + "/v1/models", headers={"Authorization": f"Bearer {token}"})

            # Redis down: a token never seen before is looked up in SQL; requests are served.
            await redis.cut()
            assert (await models(token_a)).status_code == 200
            answer = await post(http, stack, chat("no-redis", 3, model=stack.model, stream=False), token_a)
            assert answer.status_code == 200
            await redis.restore()
            assert (await models(token_b)).status_code == 200  # now cached (process and Redis)

            # SQL down: cached tokens keep working, unknown ones get a clear 503.
            await sql.cut()
            assert (await models(token_b)).status_code == 200
            answer = await post(http, stack, chat("no-sql", 3, model=stack.model, stream=False), token_b)
            assert answer.status_code == 200
            unknown = await models(token_c)
            assert unknown.status_code == 503, unknown.text
            assert "database" in unknown.json()["error"]["message"]
            await sql.restore()
            # The gateway notices by itself (a background probe, within a few seconds; no request waits).
            await until(lambda: _ok(models(token_c)), timeout=10, what="the token database to be used again")
    finally:

        async def cleanup() -> None:
            store = TokenStore(postgres)
            try:
                for name in names:
                    await store.delete(name)
            finally:
                await store.close()

        run_sync(cleanup)


async def _ok(answer: Awaitable[httpx.Response]) -> bool:
    return (await answer).status_code == 200


# -- 8. bad input -----------------------------------------------------------------------------------


def test_hostile_requests_get_clear_4xx(stack: Stack) -> None:
    url = stack.gateway_url + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {stack.token}"}  # type: ignore[attr-defined]
    cases: list[tuple[str, dict[str, object]]] = [
        ("invalid utf-8", {"content": b'{"model": "\xff\xfe", "messages": []}', "headers": auth}),
        ("deep nesting", {"content": b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                          "headers": auth}),
        ("not an object", {"content": b'"just a string"', "headers": auth}),
        ("null bytes", {"content": b'{"model": "\x00", "messages": [1]}', "headers": auth}),
        ("wrong types", {"content": json.dumps({"model": stack.model, "messages": "hi", "stream": "yes"}),
                         "headers": auth}),
        ("huge body", {"content": b"{" + b" " * (2 * 1024 * 1024) + b"}", "headers": auth}),
        ("huge token", {"content": b"{}", "headers": {"Authorization": "Bearer " + "x" * 60_000}}),
        ("binary auth", {"content": b"{}", "headers": {"Authorization": b"Bearer \xff\xfe\x80"}}),
        ("basic auth", {"content": b"{}", "headers": {"Authorization": "Basic dXNlcjpwYXNz"}}),
        ("form body", {"content": b"model=x&messages=y",
                       "headers": {**auth, "Content-Type": "application/x-www-form-urlencoded"}}),
    ]  # fmt: skip
    with httpx.Client(timeout=30) as http:
        for name, kwargs in cases:
            try:
                response = http.post(url, **kwargs)  # type: ignore[arg-type]
            except httpx.RemoteProtocolError:
                continue  # the server refused to parse the request at all: fine, no crash
            assert 400 <= response.status_code < 500, f"{name}: {response.status_code} {response.text[:200]}"
            if response.status_code != 431:
                assert response.json()["error"]["message"], name
        assert http.get(stack.gateway_url + "/health").status_code == 200


@pytest.mark.skipif(shutil.which("schemathesis", path=os.path.dirname(sys.executable)) is None,
                    reason="schemathesis is not installed")  # fmt: skip
def test_schemathesis_finds_no_server_error(stack: Stack, tmp_path: Path) -> None:
    # The fields the gateway checks itself are in the schema, so the fuzzer sends them wrong-typed too.
    schema = httpx.get(stack.gateway_url + "/schema/openapi.json", timeout=10).json()
    chat_body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    fields = chat_body["schema"]["properties"]
    assert {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "messages"} <= set(fields)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"} <= set(schema["paths"])
    log, report = tmp_path / "responses.jsonl", tmp_path / "report.json"
    command = [
        os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run",
        stack.gateway_url + "/schema/openapi.json",
        "--checks", "not_a_server_error",
        "--continue-on-failure",  # every case runs: the count of server errors is the whole one
        "--mode", "all",  # valid and invalid bodies (wrong types, missing fields)
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "50",
        "--header", f"Authorization: Bearer {stack.token}",  # type: ignore[attr-defined]
        "--request-timeout", "20",
        "--generation-deterministic",
        "--report", "json", "--report-json-path", str(report),
        "--no-color",
    ]  # fmt: skip
    # The hooks send half of the bodies to the served model (through the worker to the simulator), a
    # quarter with a model name past 255 bytes, and log every response (tests/schemathesis_hooks.py).
    hooks = Path(__file__).with_name("schemathesis_hooks.py")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(hooks), "DISPATCHER_TEST_FUZZ_MODEL": stack.model,
           "DISPATCHER_TEST_FUZZ_LOG": str(log)}  # fmt: skip
    # In a temp dir: schemathesis keeps a .schemathesis/ folder in its working directory.
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path, env=env)
    output = result.stdout[-4000:] + result.stderr[-2000:]
    responses = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    statuses: dict[int, int] = {}
    for response in responses:
        statuses[response["status"]] = statuses.get(response["status"], 0) + 1
    cases = json.loads(report.read_text())["test_cases"]["generated"] if report.exists() else 0
    print(f"\nschemathesis: {cases} cases, {len(responses)} requests, statuses {dict(sorted(statuses.items()))}")
    server_errors = [r for r in responses if r["status"] >= 500]
    assert not server_errors, (
        f"{len(server_errors)} of {len(responses)} requests answered 5xx, e.g.:\n"
        + json.dumps(server_errors[:3], indent=1, ensure_ascii=False)[:3000]
    )
    assert result.returncode == 0, output
    # The run reached every part: the gateway's refusals and the worker's answers (200 from the simulator).
    assert cases >= 100 and statuses.get(200, 0) >= 20 and statuses.get(404, 0) >= 1, (statuses, output)

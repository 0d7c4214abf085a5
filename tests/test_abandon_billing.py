"""Streams the client abandons are charged what was generated for them, not zero (issue 13), their
prompt too, and the TPM limits charge them exactly as the ledger bills them (issue 19)."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from llmdispatch.gateway.limits import KEY_PREFIX, RateLimiter
from llmdispatch.tokens import TokenInfo
from llmdispatch.usage import UsageRecord, read_usage
from llmdispatch.wire import Frame, Kind
from tests.faults import chat
from tests.stack import REDIS_URL, STREAM_URL, Stack, delete_stream, run_sync


async def test_abandoned_streams_are_charged_what_was_generated(tmp_path: Path) -> None:
    stream = "usage-abandon-" + str(int(time.time() * 1000))
    stack = Stack(tmp_path, env={"DISPATCHER_USAGE_STREAM_URL": STREAM_URL, "DISPATCHER_USAGE_STREAM_NAME": stream})
    try:
        stack.serve(max_num_seqs=4, max_concurrency=4, token="abandon")
        since = time.time()
        received: list[int] = []
        async with httpx.AsyncClient(timeout=30, headers=stack.auth()) as http:
            await http.post(stack.simulator_url + "/sim/reset")

            async def abandon(user: str) -> None:
                body = chat(user, 3000, model=stack.model)
                async with http.stream("POST", stack.gateway_url + "/v1/chat/completions", json=body) as r:
                    events = 0
                    async for chunk in r.aiter_bytes():
                        events += chunk.count(b"data: {")
                        if events >= 60:
                            break
                received.append(events)

            await asyncio.gather(*(abandon(f"gone-{i}") for i in range(3)))
            await asyncio.sleep(1.0)  # the aborts reach the simulator
            generated = (await http.get(stack.simulator_url + "/sim/stats")).json()["generated_tokens"]
        deadline, records = time.monotonic() + 20, []
        while time.monotonic() < deadline:
            records = [r for r in await read_usage(STREAM_URL, stream, since) if r.token == "abandon"]
            if len(records) >= 3:
                break
            await asyncio.sleep(0.3)
        charged = sum(r.completion_tokens for r in records)
        print(
            f"\nabandoned streams: clients read {sum(received)} chunks, the simulator generated {generated} tokens, "
            f"the ledger charged {charged} ({', '.join(f'{r.completion_tokens} est={r.estimated}' for r in records)})"
        )
        assert len(records) == 3 and all(r.outcome == "cancelled" and r.estimated for r in records)
        # At least what the clients received, at most what was generated (the role chunk carries none).
        assert sum(received) - 3 <= charged <= generated
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))


# -- limits agree with the ledger (issue 19) --------------------------------------------------------

HOUR = 3600.0  # the rate-limit window of these stacks: one window for the whole test
PROMPT = "please keep on talking about the weather " * 5  # 35 words: 35 tokens for the simulator
message = {"role": "user", "content": PROMPT}


def billing_stack(tmp_path: Path, stream: str) -> Stack:
    return Stack(
        tmp_path,
        env={
            "DISPATCHER_USAGE_STREAM_URL": STREAM_URL,
            "DISPATCHER_USAGE_STREAM_NAME": stream,
            "DISPATCHER_RATE_LIMIT_WINDOW": str(HOUR),
        },
    )


async def abandon(http: httpx.AsyncClient, stack: Stack, secret: str, user: str, after: int = 60) -> int:
    """A stream of a long answer, dropped after ``after`` content chunks; its status."""
    body = chat(user, 3000, model=stack.model)
    body["messages"] = [message]
    headers = {"Authorization": f"Bearer {secret}"}
    async with http.stream("POST", stack.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code
        events = 0
        async for chunk in r.aiter_bytes():
            events += chunk.count(b'"content":"')
            if events >= after:
                break
    return 200


async def ledger_records(stream: str, since: float, token: str, count: int) -> list[UsageRecord]:
    deadline, records = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        # Refusals (429) are recorded too, with 0 tokens: only served requests are billed here.
        records = [
            r for r in await read_usage(STREAM_URL, stream, since) if r.token == token and r.outcome != "rejected"
        ]
        if len(records) >= count:
            break
        await asyncio.sleep(0.3)
    return records


async def forget_limits(name: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{KEY_PREFIX}{{{name}}}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_abandoned_streams_count_against_tpm_as_the_ledger_bills_them(tmp_path: Path) -> None:
    stream = "usage-abandon-tpm-" + str(int(time.time() * 1000))
    stack = billing_stack(tmp_path, stream)
    name = "abandon-tpm-" + uuid.uuid4().hex[:8]
    try:
        stack.serve(max_num_seqs=4, max_concurrency=4, token="owner")
        secret = stack.add_token(name, priority=5, tpm=300)
        if HOUR - time.time() % HOUR < 60:  # not across a window's end
            await asyncio.sleep(HOUR - time.time() % HOUR + 0.1)
        since = time.time()
        statuses: list[int] = []
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(8):
                statuses.append(await abandon(http, stack, secret, f"tpm-{i}"))
                if statuses[-1] != 200:
                    break
                await asyncio.sleep(1.0)  # the worker's billing reaches the gateway
            answered = statuses.count(200)
            records = await ledger_records(stream, since, name, answered)
            await asyncio.sleep(1.0)  # a late or repeated charge would show below
            refused = await http.post(
                stack.gateway_url + "/v1/chat/completions",
                json=chat("tpm-last", 5, model=stack.model, stream=False),
                headers={"Authorization": f"Bearer {secret}"},
            )
        billed = sum(r.prompt_tokens + r.completion_tokens for r in records)
        print(f"\nstatuses {statuses}; the ledger billed {billed} tokens in {len(records)} records; {refused.text}")
        # Before: every abandoned stream went through (the limiter charged nothing for them).
        assert statuses[-1] == 429 and answered < 8, statuses
        assert len(records) == answered and all(r.outcome == "cancelled" for r in records)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "tokens per minute" in error["message"]
        used = int(re.search(r"Used (\d+)", error["message"]).group(1))  # type: ignore[union-attr]
        assert used == billed  # exactly what the ledger bills: each stream charged once
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))
        run_sync(lambda: forget_limits(name))


async def test_abandoned_streams_are_billed_their_prompt(tmp_path: Path) -> None:
    """The server's own count (vLLM's /tokenize) where the adapter knows how; an estimate otherwise."""
    stream = "usage-abandon-prompt-" + str(int(time.time() * 1000))
    stack = billing_stack(tmp_path, stream)
    try:
        stack.serve(max_num_seqs=4, max_concurrency=4, token="prompted")
        since = time.time()
        async with httpx.AsyncClient(timeout=30) as http:
            assert await abandon(http, stack, stack.token, "counted", after=20) == 200
            (counted,) = await ledger_records(stream, since, "prompted", 1)
            tokenized = (await http.get(stack.simulator_url + "/sim/stats?log=0")).json()["tokenized"]
            # The same request answered in full: the prompt count the server reports.
            whole = await http.post(
                stack.gateway_url + "/v1/chat/completions",
                json={**chat("whole", 5, model=stack.model, stream=False), "messages": [message]},
                headers=stack.auth(),
            )
            reported = whole.json()["usage"]["prompt_tokens"]
            # A server the adapter cannot ask (generic): estimated from the prompt's characters.
            stack.processes[1].stop()  # the vllm-kind worker
            stack.start_worker(4, "--backend", "generic")
            since = time.time()
            assert await abandon(http, stack, stack.token, "estimated", after=20) == 200
            (estimated,) = await ledger_records(stream, since, "prompted", 1)
        print(f"\nprompt billed: {counted.prompt_tokens} (server count), {estimated.prompt_tokens} (estimate)")
        assert counted.outcome == "cancelled" and counted.estimated  # its completion tokens are counted chunks
        assert counted.prompt_tokens == reported == 35 and tokenized == 1
        assert estimated.outcome == "cancelled" and estimated.estimated
        assert estimated.prompt_tokens == math.ceil(len(PROMPT) / 4)
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))


async def test_a_stream_failed_mid_answer_counts_against_tpm(tmp_path: Path) -> None:
    """The server dies mid-stream: the client gets an error event; the tokens the ledger bills for the
    attempt (chunks relayed, prompt estimated: the server cannot count it now) are charged too."""
    stream = "usage-failed-tpm-" + str(int(time.time() * 1000))
    stack = billing_stack(tmp_path, stream)
    name = "failed-tpm-" + uuid.uuid4().hex[:8]
    try:
        stack.serve(max_num_seqs=4, max_concurrency=4, token="owner")
        secret = stack.add_token(name, priority=5, tpm=50)
        if HOUR - time.time() % HOUR < 60:
            await asyncio.sleep(HOUR - time.time() % HOUR + 0.1)
        since = time.time()
        headers = {"Authorization": f"Bearer {secret}"}
        body = {**chat("failing", 3000, model=stack.model), "messages": [message]}
        async with httpx.AsyncClient(timeout=30, headers=headers) as http:
            async with http.stream("POST", stack.gateway_url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                seen, rest = 0, b""
                async for chunk in r.aiter_bytes():
                    seen += chunk.count(b'"content":"')
                    if seen >= 60 and stack.processes[0].alive():
                        stack.processes[0].kill()  # the simulator
                    if seen >= 60:
                        rest += chunk
            assert b'"error"' in rest and rest.endswith(b"data: [DONE]\n\n")
            (record,) = await ledger_records(stream, since, name, 1)
            await asyncio.sleep(1.0)
            # Before: nothing was charged, and this request was admitted (to wait for the dead server).
            following = chat("next", 5, model=stack.model, stream=False)
            refused = await http.post(stack.gateway_url + "/v1/chat/completions", json=following, timeout=5)
        billed = record.prompt_tokens + record.completion_tokens
        print(f"\nfailed mid-answer: the ledger billed {billed} ({record.outcome}, {record.status}); {refused.text}")
        assert record.outcome == "error" and record.estimated and record.completion_tokens >= 59
        assert record.prompt_tokens == math.ceil(len(PROMPT) / 4)  # the dead server could not count it
        assert refused.status_code == 429
        assert f"Used {billed}." in refused.json()["error"]["message"]
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))
        run_sync(lambda: forget_limits(name))


async def test_each_request_is_charged_once_as_the_ledger_counts_it() -> None:
    """The in-process counters (no Redis) and billing frames in every order: a request's charge is
    the count of the record the ledger keeps for it (answered first, then the larger), never a sum."""
    limiter = RateLimiter(None, window=HOUR, max_queued=0, expiry=60)
    token = TokenInfo("once", 5, tpm=10_000)

    def frame(request_id: str, kind: Kind, prompt: int, completion: int) -> Frame:
        return Frame(request_id, kind, prompt_tokens=prompt, completion_tokens=completion)

    async def used_after(*frames: Frame, request_id: str, close_first: bool) -> int:
        admission = await limiter.admit(token, request_id, stream=True)
        if close_first:
            admission.finish()  # the client left before its worker billed
        for billed in frames:
            limiter.billed(billed)
        admission.finish()
        probe = await limiter.admit(token)  # what admission sees now
        probe.finish()
        return int(probe.headers["x-ratelimit-limit-tokens"]) - int(probe.headers["x-ratelimit-remaining-tokens"])

    used = await used_after(frame("a", Kind.BILLED, 10, 50), request_id="a", close_first=True)
    assert used == 60
    # The same END twice (a redelivered record) or a late BILLED of a replaced attempt: charged once.
    used = await used_after(
        frame("b", Kind.END, 10, 20), frame("b", Kind.END, 10, 20), frame("b", Kind.BILLED, 10, 90),
        request_id="b", close_first=False,
    )  # fmt: skip
    assert used == 60 + 30
    # A failed attempt, then an answered one that used less: the ledger bills the answered one.
    used = await used_after(
        frame("c", Kind.BILLED, 10, 90), frame("c", Kind.END, 10, 20), request_id="c", close_first=True
    )
    assert used == 60 + 30 + 30
    limiter.billed(frame("unknown", Kind.BILLED, 1, 1))  # not this gateway's: ignored
    assert (await limiter.admit(token)).headers["x-ratelimit-remaining-tokens"] == str(10_000 - 120)

"""Streams the client abandons are charged what was generated for them, not zero (issue 13)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from dispatcher.usage import read_usage
from tests.faults import chat
from tests.stack import STREAM_URL, Stack, delete_stream, run_sync


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

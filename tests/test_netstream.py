"""The worker's asyncio network backend under the openai SDK, against the real simulator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from tests.stack import Stack
from worker.netstream import AsyncioBackend
from worker.vllm import VLLMClient, sse_events


async def _stream(client: VLLMClient, model: str, max_tokens: int) -> list[bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True}
    async with client.open("chat/completions", body) as upstream:
        return [event async for event in sse_events(upstream)]


async def test_streams_reuse_and_survive_server_closed_connections(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=8, decode_ms=1)
        client = VLLMClient(stack.simulator_url + "/v1", concurrency=8)
        assert isinstance(client.client._client._transport._pool._network_backend, AsyncioBackend)  # type: ignore[attr-defined]
        try:
            answers = await asyncio.gather(*[_stream(client, stack.model, 5) for _ in range(8)])
            # role chunk + 5 tokens + [DONE], each a whole event
            assert all(len(events) == 7 and events[-1] == b"data: [DONE]\n\n" for events in answers)
            # uvicorn closes idle keep-alive connections after 5 s: the pool must notice, not fail.
            await asyncio.sleep(5.5)
            answers = await asyncio.gather(*[_stream(client, stack.model, 3) for _ in range(8)])
            assert all(len(events) == 5 for events in answers)
            with pytest.raises(openai.NotFoundError):
                await _stream(client, "no-such-model", 3)
        finally:
            await client.close()
    finally:
        stack.close()

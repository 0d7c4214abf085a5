"""The worker's HTTP client for the inference server (worker.netstream), against the real simulator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from llmdispatch.worker.vllm import (
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamStatusError,
    VLLMClient,
)
from tests.stack import Stack, free_port


def _body(model: str, max_tokens: int, stream: bool = True) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


async def sse_events(response: UpstreamResponse) -> AsyncIterator[bytes]:
    """Whole SSE events, one by one, as the worker takes them (``UpstreamResponse.events``)."""
    while (batch := await response.events()) is not None:
        for event in batch:
            yield event


async def _stream(client: VLLMClient, model: str, max_tokens: int) -> list[bytes]:
    async with client.open("chat/completions", _body(model, max_tokens)) as upstream:
        assert upstream.status_code == 200
        assert upstream.headers["content-type"].startswith("text/event-stream")
        return [event async for event in sse_events(upstream)]


async def test_streams_reuse_and_survive_server_closed_connections(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=8, decode_ms=1)
        client = VLLMClient(stack.simulator_url + "/v1", concurrency=8)
        # Keep idle connections past the server's 5 s keep-alive: reuse must notice they were closed.
        client.http.keepalive_expiry = 60
        try:
            answers = await asyncio.gather(*[_stream(client, stack.model, 5) for _ in range(8)])
            # role chunk + 5 tokens + [DONE], each a whole event
            assert all(len(events) == 7 and events[-1] == b"data: [DONE]\n\n" for events in answers)
            assert len(client.http._idle) == 8  # every connection went back to the pool
            await asyncio.sleep(5.5)
            answers = await asyncio.gather(*[_stream(client, stack.model, 3) for _ in range(8)])
            assert all(len(events) == 5 for events in answers)
        finally:
            await client.close()
    finally:
        stack.close()


async def test_status_errors_whole_answers_and_bytes_bodies(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=4, decode_ms=1)
        client = VLLMClient(stack.simulator_url + "/v1", concurrency=4)
        try:
            with pytest.raises(UpstreamStatusError) as refused:
                await _stream(client, "no-such-model", 3)
            # The SDK's own type, with the server's status and body unchanged.
            assert isinstance(refused.value, openai.APIStatusError)
            assert refused.value.status_code == 404
            assert refused.value.response.content == refused.value.content
            assert "no-such-model" in json.loads(refused.value.content)["error"]["message"]
            # The connection that carried the 404 is reused for the next request.
            raw = json.dumps(_body(stack.model, 4, stream=False)).encode()
            async with client.open("chat/completions", raw, {"X-Request-Id": "req-1"}) as upstream:
                answer = json.loads(await upstream.read())
            assert answer["usage"]["completion_tokens"] == 4
            assert len(client.http._idle) == 1
        finally:
            await client.close()
    finally:
        stack.close()


async def test_refused_before_answer_and_broken_mid_answer(tmp_path: Path) -> None:
    nobody = VLLMClient(f"http://127.0.0.1:{free_port()}/v1")
    try:
        with pytest.raises(UpstreamConnectError):  # nothing sent back: another server may take it
            await _stream(nobody, "m", 3)
    finally:
        await nobody.close()
    stack = Stack(tmp_path)
    try:
        simulator = stack.start_simulator(max_num_seqs=4, decode_ms=50)
        client = VLLMClient(stack.simulator_url + "/v1")
        try:
            events: list[bytes] = []
            with pytest.raises(UpstreamBrokenError):  # the answer had started: not a connect error
                async with client.open("chat/completions", _body(stack.model, 200)) as upstream:
                    async for event in sse_events(upstream):
                        events.append(event)
                        if len(events) == 3:
                            simulator.kill()
            assert not isinstance(UpstreamBrokenError("u", "x"), UpstreamConnectError)
            assert 3 <= len(events) < 200
        finally:
            await client.close()
    finally:
        stack.close()


async def test_cancelled_before_the_answer_closes_the_connection_and_vllm_aborts(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    try:
        stack.start_simulator(max_num_seqs=4, decode_ms=20)
        client = VLLMClient(stack.simulator_url + "/v1")
        try:

            async def whole() -> bytes:  # not streamed: no response byte until the answer is complete
                async with client.open("chat/completions", _body(stack.model, 300, stream=False)) as upstream:
                    return await upstream.read()

            task = asyncio.create_task(whole())
            await asyncio.sleep(0.5)
            assert (await _stats(client))["running"] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(40):  # the simulator notices the closed connection and aborts
                if (await _stats(client))["running"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await _stats(client))["running"] == 0
            assert client.http._idle == []  # the cancelled request's connection was not kept
        finally:
            await client.close()
    finally:
        stack.close()


async def _stats(client: VLLMClient) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=2) as http:
        response = await http.get(client.root_url + "/sim/stats")
    return response.json()


async def test_events_split_across_reads_and_several_per_read() -> None:
    """``UpstreamResponse.events``: whole events exactly as sent, whatever the TCP reads look like."""
    pieces = [
        b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: {"c"',  # two whole events and the start of one
        b": 3}\n",  # still not whole
        b"\ndata: [DONE]\n\n",  # ends it, and one more
        b"\n\n: comment\n\ndata: tail",  # an empty event, a comment, an unterminated last event
    ]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)  # one read each
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = VLLMClient(f"http://127.0.0.1:{port}/v1")
    try:
        async with client.open("chat/completions", b"{}") as upstream:
            batches = []
            while (batch := await upstream.events()) is not None:
                batches.append(batch)
    finally:
        await client.close()
        server.close()
    events = [event for batch in batches for event in batch]
    assert events == [
        b'data: {"a": 1}\n\n',
        b'data: {"b": 2}\n\n',
        b'data: {"c": 3}\n\n',
        b"data: [DONE]\n\n",
        b"\n\n",
        b": comment\n\n",
        b"data: tail",
    ]
    assert b"".join(events) == b"".join(pieces)  # every byte forwarded, none changed

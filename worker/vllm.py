"""Calling vLLM through the ``openai`` client, in raw streaming mode (no per-chunk parsing)."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx2  # the openai SDK's own httpx
import openai
from openai._response import AsyncAPIResponse  # the type that with_streaming_response yields

from worker.netstream import http_client

POOL_SIZE = 64  # connections per HTTP client (see VLLMClient.__init__)

_GAUGE = re.compile(rb"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN)\s*$", re.MULTILINE)


class VLLMClient:
    def __init__(
        self, base_url: str, api_key: str = "EMPTY", *, request_timeout: float = 3600.0, concurrency: int = 100
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # vLLM serves /health and /metrics beside /v1, not under it.
        self.root_url = self.base_url.removesuffix("/v1")
        # One kept-alive connection per concurrent request: the SDK's default pool keeps 100 and caps at
        # 1,000, so beyond 100 streams every request paid a new TCP connection (CPU on both sides).
        # The pool scans all its connections whenever a request starts or ends, so connections are
        # spread over several clients (used in turn) of at most POOL_SIZE each.
        shards = max(1, math.ceil(concurrency / POOL_SIZE))
        keep = math.ceil(concurrency / shards)
        limits = httpx2.Limits(max_connections=concurrency + 16, max_keepalive_connections=keep + 8)
        self.clients = [
            openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=api_key or "EMPTY",
                max_retries=0,
                timeout=openai.Timeout(request_timeout, connect=5.0),
                http_client=http_client(self.base_url, limits),
            )
            for _ in range(shards)
        ]
        self.client = self.clients[0]
        self._turns = itertools.cycle(self.clients)
        self._probe = httpx2.AsyncClient(timeout=httpx2.Timeout(2.0))

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        await self._probe.aclose()

    def open(self, endpoint: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        """An async context manager yielding the raw response of ``POST /v1/<endpoint>``.

        The fields the SDK's signature requires are passed by name, everything else unchanged as
        ``extra_body``, so every vLLM parameter gets through. Leaving the block closes the HTTP
        connection, which makes vLLM abort the request.
        """
        body = dict(body)
        client = next(self._turns)
        kwargs: dict[str, Any] = {"model": body.pop("model")}
        if "stream" in body:
            kwargs["stream"] = body.pop("stream")
        if endpoint == "chat/completions":
            kwargs["messages"] = body.pop("messages")
            create = client.chat.completions.with_streaming_response.create
        elif endpoint == "completions":
            kwargs["prompt"] = body.pop("prompt")
            create = client.completions.with_streaming_response.create
        elif endpoint == "embeddings":
            kwargs["input"] = body.pop("input")
            # The SDK would default to base64 and change what the client gets: keep vLLM's default.
            kwargs["encoding_format"] = body.pop("encoding_format", "float")
            create = client.embeddings.with_streaming_response.create
        else:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        return create(**kwargs, extra_body=body, extra_headers=headers)

    async def healthy(self) -> bool:
        try:
            response = await self._probe.get(self.root_url + "/health")
        except httpx2.HTTPError:
            return False
        return response.status_code == 200

    async def load(self) -> dict[str, float] | None:
        """vLLM's scheduler gauges from /metrics, or None when it has no such endpoint."""
        try:
            response = await self._probe.get(self.root_url + "/metrics")
        except httpx2.HTTPError:
            return None
        if response.status_code != 200:
            return None
        gauges: dict[str, float] = {}
        for name, value in _GAUGE.findall(response.content):
            key = name.decode()
            gauges[key] = gauges.get(key, 0.0) + float(value)
        if "vllm:gpu_cache_usage_perc" in gauges:  # the older name
            gauges.setdefault("vllm:kv_cache_usage_perc", gauges["vllm:gpu_cache_usage_perc"])
        return gauges


async def sse_events(response: AsyncAPIResponse[Any]) -> AsyncIterator[bytes]:
    """Whole SSE events, each with its trailing blank line, exactly as vLLM sent them."""
    buffer = b""
    async for chunk in response.iter_bytes():
        buffer += chunk
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            yield buffer[: end + 2]
            buffer = buffer[end + 2 :]
    if buffer.strip():
        yield buffer

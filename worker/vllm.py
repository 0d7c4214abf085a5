"""Calling the inference server (vLLM or any OpenAI-compatible one): raw requests, raw SSE back.

The request path goes through ``worker.netstream`` (a lean HTTP/1.1 client, httptools parsing),
not the openai SDK: the body is sent as the client wrote it (every vLLM parameter passes), the
answer is relayed byte for byte, and nothing is parsed per chunk. Errors are the SDK's exception
types (see ``worker.netstream``), so callers catch ``openai.APIStatusError`` & co. as before.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec

from llmdispatch.worker.netstream import (
    HTTPClient,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamStatusError,
    UpstreamTimeout,
)

__all__ = [
    "UpstreamBrokenError",
    "UpstreamConnectError",
    "UpstreamResponse",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "VLLMClient",
]

ENDPOINTS = ("chat/completions", "completions", "embeddings")

_encode = msgspec.json.Encoder().encode


class VLLMClient:
    def __init__(
        self, base_url: str, api_key: str = "EMPTY", *, request_timeout: float = 3600.0, concurrency: int = 100
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # vLLM serves /health and /metrics beside /v1, not under it.
        self.root_url = self.base_url.removesuffix("/v1")
        # The read timeout applies to each gap between bytes (queueing inside vLLM included), as the SDK's did.
        # ``concurrency`` is kept for callers: the pool keeps as many connections as requests run at once.
        self.http = HTTPClient(self.base_url, api_key=api_key or "EMPTY", read_timeout=request_timeout)

    async def close(self) -> None:
        await self.http.aclose()

    def open(
        self, endpoint: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        """An async context manager yielding the ``UpstreamResponse`` of ``POST /v1/<endpoint>``.

        ``body`` is a dict (encoded here) or the JSON bytes themselves (sent unchanged). The response
        has ``status_code``, ``headers`` (lower-case names), ``iter_bytes()`` and ``read()``; a non-2xx
        answer raises ``UpstreamStatusError`` on entering. Leaving the block before the answer ended
        closes the HTTP connection, which makes vLLM abort the request.
        """
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        data = body if isinstance(body, bytes) else _encode(body)
        return self.http.post("/" + endpoint, data, headers)

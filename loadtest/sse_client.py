"""A cheap streaming HTTP/1.1 client for load generation: thousands of SSE streams on one core.

The ``openai`` client parses every chunk with pydantic and ``httpx`` costs tens of microseconds per
read; at a few thousand events per second either would measure itself. This is an ``asyncio.Protocol``
per keep-alive connection with an incremental chunked-transfer decoder and an SSE splitter that only
looks for event boundaries and a content field. Timestamps are taken when bytes arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit

# An event carries a generated token when it has non-empty text (chat delta or completion text).
_CONTENT = (b'"content":"', b'"text":"')
_EMPTY = (b'"content":""', b'"text":""')


def is_token_event(event: bytes) -> bool:
    for marker, empty in zip(_CONTENT, _EMPTY, strict=True):
        if marker in event and empty not in event:
            return True
    return False


class StreamResult:
    """What one streamed request saw."""

    __slots__ = ("error", "finished_at", "first_token_at", "last_token_at", "sent_at", "status", "tokens")

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at
        self.status = 0
        self.tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished_at: float | None = None
        self.error = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.finished_at is not None


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._state = "idle"
        self._remaining = 0  # bytes left in the current chunk (or body, without chunking)
        self._chunked = False
        self._keep_alive = True
        self._done: asyncio.Future[None] | None = None
        self._result: StreamResult | None = None
        self._on_token: Callable[[float, float], None] | None = None
        self._events = bytearray()  # decoded body bytes not yet split into SSE events
        self._body = bytearray()  # a non-SSE (error) body, kept for the message

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == "until-close":
            self._finish(time.perf_counter())
        elif self._done is not None and not self._done.done():
            assert self._result is not None
            self._result.error = self._result.error or f"connection lost: {exc or 'closed by the server'}"
            self._done.set_result(None)

    async def request(
        self, head: bytes, body: bytes, result: StreamResult, on_token: Callable[[float, float], None]
    ) -> None:
        """Send one request and return when its answer has been read (``result`` is filled in)."""
        assert self.transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self._result, self._on_token = result, on_token
        self._state, self._chunked, self._keep_alive = "head", False, True
        self._events.clear()
        self._body.clear()
        self.transport.write(head + body)
        await self._done

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self._buffer
        buffer += data
        while buffer:
            state = self._state
            if state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._parse_head(bytes(buffer[:end]))
                del buffer[: end + 4]
            elif state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buffer[:end]).split(b";")[0], 16)
                del buffer[: end + 2]
                if size == 0:
                    self._state = "trailer"
                else:
                    self._remaining, self._state = size, "chunk"
            elif state == "chunk":
                take = min(self._remaining, len(buffer))
                self._feed(bytes(buffer[:take]), now)
                del buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "chunk-end"
            elif state == "chunk-end":
                if len(buffer) < 2:
                    return
                del buffer[:2]
                self._state = "size"
            elif state == "trailer":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._finish(now)
            elif state == "length":
                take = min(self._remaining, len(buffer))
                self._feed(bytes(buffer[:take]), now)
                del buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._finish(now)
            elif state == "until-close":
                self._feed(bytes(buffer), now)
                buffer.clear()
            else:  # bytes while idle: the server misbehaves; drop the connection
                buffer.clear()
                if self.transport is not None:
                    self.transport.close()

    def _parse_head(self, head: bytes) -> None:
        assert self._result is not None
        lines = head.split(b"\r\n")
        self._result.status = int(lines[0].split(b" ", 2)[1])
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self._chunked = True
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection" and value == b"close":
                self._keep_alive = False
        if self._chunked:
            self._state = "size"
        elif length >= 0:
            self._remaining, self._state = length, "length"
            if length == 0:
                self._finish(time.perf_counter())
        else:
            self._keep_alive, self._state = False, "until-close"

    def _feed(self, data: bytes, now: float) -> None:
        result = self._result
        assert result is not None
        if result.status != 200:
            self._body += data
            return
        events = self._events
        events += data
        start = 0
        while True:
            end = events.find(b"\n\n", start)
            if end < 0:
                break
            event = bytes(events[start:end])
            start = end + 2
            if is_token_event(event):
                result.tokens += 1
                previous = result.last_token_at
                if previous is None:
                    result.first_token_at = now
                assert self._on_token is not None
                self._on_token(now, -1.0 if previous is None else now - previous)
                result.last_token_at = now
            elif event.startswith(b'data: {"error"'):
                result.error = event[6:300].decode(errors="replace")
        del events[:start]

    def _finish(self, now: float) -> None:
        result = self._result
        assert result is not None and self._done is not None
        result.finished_at = now
        if result.status != 200 and not result.error:
            result.error = f"HTTP {result.status}: {bytes(self._body[:300]).decode(errors='replace')}"
        self._state = "idle"
        if not self._keep_alive and self.transport is not None:
            self.transport.close()
        if not self._done.done():
            self._done.set_result(None)


class StreamingClient:
    """Posts JSON bodies to one URL over a keep-alive connection, reconnecting when needed."""

    def __init__(self, url: str, token: str = "") -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: "
        ).encode()
        self._connection: _Connection | None = None

    async def post(
        self, body: bytes, on_token: Callable[[float, float], None], result: StreamResult | None = None
    ) -> StreamResult:
        """Stream one answer; ``result`` (if given) is filled in as it goes, for callers that stop early."""
        if self._connection is None or self._connection.closed:
            loop = asyncio.get_running_loop()
            _, self._connection = await loop.create_connection(_Connection, self.host, self.port)
        if result is None:
            result = StreamResult(time.perf_counter())
        result.sent_at = time.perf_counter()
        try:
            await self._connection.request(self._head + b"%d\r\n\r\n" % len(body), body, result, on_token)
        except asyncio.CancelledError:
            self.close()
            raise
        if result.error:
            self.close()
        return result

    def close(self) -> None:
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.close()
        self._connection = None

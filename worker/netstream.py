"""A lean HTTP/1.1 client for the worker's calls to the inference server (vLLM, SGLang, llama.cpp ...).

Why not the openai SDK and its httpx: per request the SDK transforms and validates the body and
builds its options (about a third of the worker's CPU at 100 tokens/s per stream), and per SSE
chunk httpx/h11 parse and re-wrap the bytes in pure Python (another third). Here a request is one
``transport.write`` of pre-built head bytes and the body as the client sent it; responses are parsed
by httptools (llhttp, in C) inside an ``asyncio.Protocol``, and a body chunk costs one callback and
one wake-up. Connections are kept alive and reused (newest first); an idle one is dropped before the
server's keep-alive timeout, and a request that finds a reused connection already closed (nothing
received) is sent once more on a fresh one.

Errors subclass the openai SDK's, so code written against the SDK keeps working:

- ``UpstreamStatusError`` (``openai.APIStatusError``): a non-2xx answer; ``status_code`` and the whole
  body in ``content`` (and ``response.content``).
- ``UpstreamConnectError`` (``openai.APIConnectionError``): no answer at all (refused, reset or closed
  before the first response byte): the server produced nothing, so the request may go to another one.
- ``UpstreamBrokenError`` (``openai.APIConnectionError``): the connection broke (or the answer was
  malformed) after the response started.
- ``UpstreamTimeout`` (``openai.APITimeoutError``): connecting, or a gap between bytes, took too long.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from urllib.parse import urlsplit

import httptools
import httpx2  # the openai SDK's own httpx: its exception types need a request object
import openai

_HIGH_WATER = 1 << 20  # pause reading from the server beyond this many unconsumed body bytes
_MAX_ERROR_BODY = 1 << 20  # an error answer's body is read up to this size


class UpstreamStatusError(openai.APIStatusError):
    """The server answered with a non-2xx status; ``content`` is its body, unchanged."""

    def __init__(self, url: str, status: int, headers: dict[str, str], content: bytes) -> None:
        response = httpx2.Response(status, headers=headers, content=content, request=httpx2.Request("POST", url))
        super().__init__(f"the inference server answered {status}", response=response, body=None)
        self.content = content


class UpstreamConnectError(openai.APIConnectionError):
    """Nothing came back: refused, reset or closed before the first response byte."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(message=f"cannot reach the inference server: {detail}", request=httpx2.Request("POST", url))


class UpstreamBrokenError(openai.APIConnectionError):
    """The answer had started when the connection broke, or it was not valid HTTP."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(
            message=f"the inference server's answer broke off: {detail}", request=httpx2.Request("POST", url)
        )


class UpstreamTimeout(openai.APITimeoutError):
    """Connecting, or waiting for the next bytes of the answer, took too long."""

    def __init__(self, url: str) -> None:
        super().__init__(request=httpx2.Request("POST", url))


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time; httptools parses the answers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        # The factory runs inside the loop: keep it (asyncio.get_running_loop() per wait costs a getpid()).
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.active = False
        self.received = False  # any byte of the current answer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # neither length nor chunked: the body ends with the connection
        self.error: Exception | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.last_activity = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes nobody asked for: the connection is unusable
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        self.received = True
        self.last_activity = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = _Broken(f"invalid HTTP from the server: {exc}")
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.active and not self.complete and self.error is None:
            if self.headers_done and self.until_close:
                self.complete = True
            elif not self.received:
                self.error = _Refused(str(exc or "closed by the server before answering"))
            else:
                self.error = _Broken(str(exc or "closed by the server mid-answer"))
        self._wake()

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        headers = self.headers
        self.until_close = "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")
        if self.status in (204, 304) or 100 <= self.status < 200:
            self.until_close = False

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()  # only meaningful before the parser resets

    # -- used by the client ----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def start(self, data: bytes, timeout: float | None) -> None:
        self._reset()
        self.active = True
        self.last_activity = time.monotonic()
        if self.closed or self.transport is None or self.transport.is_closing():
            self.error = _Refused("the connection was closed")
            return
        if timeout is not None:
            self._watchdog = self._loop.call_later(timeout, self._check, timeout)
        assert self.transport is not None
        self.transport.write(data)

    def _check(self, timeout: float) -> None:
        """The read timeout: one timer per request, re-armed lazily rather than one per read."""
        if not self.active or self.complete:
            return
        idle = time.monotonic() - self.last_activity
        if idle >= timeout:
            self.error = self.error or _TimedOut()
            self._wake()
        else:
            self._watchdog = self._loop.call_later(timeout - idle, self._check, timeout)

    async def wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> bool:
        """The request is over; True if the connection can carry another one."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        reusable = (
            self.complete and self.keep_alive and self.error is None and not self.closed and not self.until_close
        )  # fmt: skip
        self.active = False
        self.chunks.clear()
        if not reusable:
            self.close()
        return reusable

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Refused(Exception):
    pass


class _Broken(Exception):
    pass


class _TimedOut(Exception):
    pass


class UpstreamResponse:
    """The answer being received: ``status_code``, ``headers`` (lower-case names), then the body."""

    def __init__(self, url: str, connection: _Connection) -> None:
        self.url = url
        self._connection = connection
        self.status_code = connection.status
        self.headers = connection.headers
        self._partial = b""  # the start of an SSE event whose end has not arrived yet (events())

    def _raise(self, error: Exception) -> None:
        if isinstance(error, _TimedOut):
            raise UpstreamTimeout(self.url)
        raise UpstreamBrokenError(self.url, str(error))

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer encoding removed), each piece once."""
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.take()
            elif connection.complete:
                return
            elif connection.error is not None:
                self._raise(connection.error)
            else:
                await connection.wait()

    async def events(self) -> list[bytes] | None:
        """The SSE events completed by the bytes that arrived since the last call, each exactly as the
        server sent it (with its trailing blank line); waits for bytes if none are there. The list is
        empty when only part of an event came; None once the body has ended (an unterminated last
        event is returned before that).

        One call per wake-up hands over everything that arrived (several events per read, or one
        split across reads), so a stream costs one await per network read, not a generator chain
        per event."""
        connection = self._connection
        while not connection.chunks:
            if connection.complete:
                rest, self._partial = self._partial, b""
                return [rest] if rest.strip() else None
            if connection.error is not None:
                self._raise(connection.error)
            await connection.wait()
        data = connection.take()
        if self._partial:
            data = self._partial + data
        if b"\r" in data:  # CRLF or CR line ends (the SSE spec allows all three): the general split
            events, self._partial = _split_events(data)
            return events
        end = data.find(b"\n\n")
        if end == len(data) - 2:  # the usual case: one whole event
            self._partial = b""
            return [data]
        events = []
        start = 0
        while end >= 0:
            events.append(data[start : end + 2])
            start = end + 2
            end = data.find(b"\n\n", start)
        self._partial = data[start:]
        return events

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (at most ``limit`` bytes, if given)."""
        parts: list[bytes] = []
        size = 0
        async for data in self.iter_bytes():
            parts.append(data)
            size += len(data)
            if limit is not None and size >= limit:
                break
        return b"".join(parts)


# An event ends with a blank line: a line end (CRLF, LF or CR) right after another one.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")


def _split_events(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole SSE events in ``data``, each with its blank line, and the unfinished rest. A ``\r`` at the
    very end may be the first half of a CRLF: the event waits for the next byte (or the body's end)."""
    events: list[bytes] = []
    start = 0
    for match in _EVENT_END.finditer(data):
        end = match.end()
        if end == len(data) and data.endswith(b"\r"):
            break
        events.append(data[start:end])
        start = end
    return events, data[start:]


class _Exchange(AbstractAsyncContextManager["UpstreamResponse"]):
    """``async with client.post(...) as response``: leaving the block early closes the connection,
    which makes vLLM abort the request; a finished one goes back to the pool."""

    def __init__(self, client: HTTPClient, path: str, body: bytes, headers: dict[str, str] | None) -> None:
        self._client = client
        self._url = client.origin + path
        self._data = client.request_bytes(path, body, headers)
        self._connection: _Connection | None = None

    async def __aenter__(self) -> UpstreamResponse:
        try:
            return await self._open()
        except BaseException:  # cancelled too: a request left half-open would keep vLLM generating
            self._release()
            raise

    async def _open(self) -> UpstreamResponse:
        client = self._client
        for attempt in (0, 1):
            # The retry always takes a new connection: the other idle ones may be stale as well.
            connection, reused = await client.acquire(self._url, fresh=attempt > 0)
            self._connection = connection
            connection.start(self._data, client.read_timeout)
            while not connection.headers_done and connection.error is None:
                await connection.wait()
            error = connection.error
            if error is None:
                break
            self._release()
            if isinstance(error, _TimedOut):
                raise UpstreamTimeout(self._url)
            if isinstance(error, _Refused):
                if reused:  # the server had closed it while it was idle: once more, on a fresh one
                    continue
                raise UpstreamConnectError(self._url, str(error))
            raise UpstreamBrokenError(self._url, str(error))
        response = UpstreamResponse(self._url, connection)
        if not 200 <= response.status_code < 300:
            content = await response.read(_MAX_ERROR_BODY)
            self._release()
            raise UpstreamStatusError(self._url, response.status_code, response.headers, content)
        return response

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.finish():
            self._client.release(connection)


class HTTPClient:
    """POSTs to one server (``http://`` or ``https://``) over a pool of keep-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str = "",
        connect_timeout: float = 5.0,
        read_timeout: float | None = 3600.0,
        keepalive_expiry: float = 4.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # uvicorn (vLLM, SGLang) closes idle connections after 5 s: drop ours a little before.
        self.keepalive_expiry = keepalive_expiry
        host_header = parts.netloc.rsplit("@", 1)[-1]
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._head_suffix = (
            f"Host: {host_header}\r\nUser-Agent: dispatcher-worker\r\nAccept: */*\r\n"
            f"Content-Type: application/json\r\n{auth}"
        ).encode("latin-1")
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if self.tls else None

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> _Exchange:
        """An async context manager yielding the ``UpstreamResponse`` of ``POST base_path + path``."""
        return _Exchange(self, self.base_path + path, body, headers)

    def request_bytes(self, path: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        extra = b""
        if headers:
            # Values come from other processes: never let one add lines to the request.
            extra = "".join(
                f"{name}: {value}\r\n" for name, value in headers.items() if "\r" not in value and "\n" not in value
            ).encode("latin-1", "replace")
        return b"".join(
            (b"POST ", path.encode(), b" HTTP/1.1\r\n", self._head_suffix, extra,
             b"Content-Length: %d\r\n\r\n" % len(body), body)
        )  # fmt: skip

    async def acquire(self, url: str, *, fresh: bool = False) -> tuple[_Connection, bool]:
        now = time.monotonic()
        idle = self._idle
        while idle and not fresh:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self.keepalive_expiry:
                return connection, True
            connection.close()
        return await self._connect(url), False

    def release(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        if len(self._idle) > 8 and self._idle[0].idle_since < connection.idle_since - self.keepalive_expiry:
            self._prune(connection.idle_since)

    def _prune(self, now: float) -> None:
        keep = []
        for connection in self._idle:
            if now - connection.idle_since < self.keepalive_expiry and not connection.closed:
                keep.append(connection)
            else:
                connection.close()
        self._idle = keep

    async def _connect(self, url: str) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, connection = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self.tls else None
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(url) from exc
        except OSError as exc:
            raise UpstreamConnectError(url, str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return connection

    async def aclose(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

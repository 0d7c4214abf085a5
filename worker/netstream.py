"""A plain-asyncio network backend for the openai SDK's HTTP stack (httpcore2), for http:// vLLM URLs.

Why: the default backend goes through anyio, which costs a cancel scope and an exception map per
read, and answers the pool's "is this idle socket readable?" probe with a ``poll`` system call.
The pool asks that of every idle connection each time a request starts or ends, so with hundreds
of kept-alive connections to vLLM the worker spent milliseconds per request scanning them. Here a
protocol buffers what arrives, so reads are a buffer slice and the probe is a flag. HTTP parsing
(h11), pooling and the SDK are unchanged; https:// URLs keep the default backend.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import Any

import httpcore2
import httpx2

_HIGH_WATER = 1 << 20  # pause reading from vLLM beyond this many unread bytes


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: Exception | None = None
        self.reading_paused = False
        self.writing_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake_reader()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_readable(self, timeout: float | None) -> None:
        self._read_waiter = asyncio.get_running_loop().create_future()
        await _wait(self._read_waiter, timeout)

    async def drained(self, timeout: float | None) -> None:
        self._drain_waiter = asyncio.get_running_loop().create_future()
        await _wait(self._drain_waiter, timeout)


async def _wait(waiter: asyncio.Future[None], timeout: float | None) -> None:
    """Until ``waiter`` is resolved, or ``timeout`` passes (then it is resolved by ``_expire``)."""
    timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, _expire, waiter)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class AsyncioStream(httpcore2.AsyncNetworkStream):
    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.buffer:
            if protocol.eof:
                if protocol.error is not None:
                    raise httpcore2.ReadError(str(protocol.error))
                return b""
            try:
                await protocol.wait_readable(timeout)
            except TimeoutError as exc:
                raise httpcore2.ReadTimeout("timed out reading from vLLM") from exc
            if not protocol.buffer:
                if protocol.error is not None:
                    raise httpcore2.ReadError(str(protocol.error))
                return b""
        buffer = protocol.buffer
        if len(buffer) <= max_bytes:
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:max_bytes])
            del buffer[:max_bytes]
        if protocol.reading_paused and len(buffer) < _HIGH_WATER // 2 and protocol.transport is not None:
            protocol.reading_paused = False
            protocol.transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        protocol = self._protocol
        if not buffer:
            return
        if protocol.transport is None or protocol.transport.is_closing():
            raise httpcore2.WriteError("the connection to vLLM is closed")
        protocol.transport.write(buffer)
        if protocol.writing_paused:
            try:
                await protocol.drained(timeout)
            except TimeoutError as exc:
                raise httpcore2.WriteTimeout("timed out writing to vLLM") from exc

    async def aclose(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.close()

    async def start_tls(self, *_: Any, **__: Any) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("TLS is not supported by this backend (it is only used for http:// URLs)")

    def get_extra_info(self, info: str) -> Any:
        protocol = self._protocol
        if info == "is_readable":  # asked of idle connections: data or EOF means the server closed it
            return bool(protocol.buffer) or protocol.eof
        transport = protocol.transport
        if transport is None:
            return None
        if info == "socket":
            return transport.get_extra_info("socket")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        return None  # ssl_object and anything else


class AsyncioBackend(httpcore2.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    _Protocol, host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except OSError as exc:
            raise httpcore2.ConnectError(str(exc)) from exc
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(protocol)

    async def connect_unix_socket(self, *_: Any, **__: Any) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not supported by this backend")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def http_client(base_url: str, limits: httpx2.Limits) -> httpx2.AsyncClient:
    """The SDK's default HTTP client, on the asyncio backend when ``base_url`` is plain http."""
    import openai

    client = openai.DefaultAsyncHttpxClient(limits=limits)
    transport = getattr(client, "_transport", None)
    if base_url.startswith("http://") and isinstance(getattr(transport, "_pool", None), httpcore2.AsyncConnectionPool):
        # httpx2 has no public knob for the network backend: rebuild its pool with ours.
        transport._pool = httpcore2.AsyncConnectionPool(  # type: ignore[union-attr]
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )
    return client

"""Helpers for the reliability tests: raw SSE clients, the simulator's event log, a cuttable TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.stack import Stack


def chat(user: str, max_tokens: int, *, model: str, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "user": user,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Keep talking"}],
    }


@dataclass
class StreamResult:
    status: int
    events: list[bytes] = field(default_factory=list)
    comments: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    ended_at: float = 0.0

    @property
    def data(self) -> list[dict[str, Any]]:
        return [json.loads(e[6:]) for e in self.events if e.startswith(b"data: {")]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [d["error"] for d in self.data if "error" in d]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == b"data: [DONE]"

    def text(self) -> str:
        return "".join((c["choices"][0]["delta"].get("content") or "") for c in self.data if c.get("choices"))


async def read_stream(
    http: httpx.AsyncClient, stack: Stack, body: dict[str, Any], token: str, *, stop_after: int | None = None
) -> StreamResult:
    """POST a streamed request and collect its SSE events (closing early after ``stop_after`` data events)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with http.stream("POST", stack.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
        result = StreamResult(r.status_code, headers=dict(r.headers))
        buffer = b""
        async for chunk in r.aiter_bytes():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b":"):
                    result.comments += 1
                else:
                    result.events.append(event)
            if stop_after is not None and len(result.events) >= stop_after:
                break
        if buffer.strip():
            result.events.append(buffer)
    result.ended_at = time.monotonic()
    return result


async def post(http: httpx.AsyncClient, stack: Stack, body: dict[str, Any], token: str) -> httpx.Response:
    return await http.post(
        stack.gateway_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    )


async def sim_log(http: httpx.AsyncClient, stack: Stack) -> list[dict[str, Any]]:
    return (await http.get(stack.simulator_url + "/sim/stats")).json()["log"]


def events_of(log: list[dict[str, Any]], user: str) -> list[str]:
    return [e["event"] for e in log if e["user"] == user]


async def until_event(
    http: httpx.AsyncClient, stack: Stack, user: str, event: str, timeout: float = 15.0
) -> dict[str, Any]:
    """The first simulator event ``event`` of ``user``, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in await sim_log(http, stack):
            if entry["user"] == user and entry["event"] == event:
                return entry
        await asyncio.sleep(0.02)
    seen = events_of(await sim_log(http, stack), user)
    raise TimeoutError(f"no {event!r} event for {user!r} in the simulator (saw {seen})")


async def until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a real service; ``cut()`` makes the service look down to its clients."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

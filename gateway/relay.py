"""Turn the frames of one request into its HTTP answer: SSE relayed byte for byte, or a JSON body.

The HTTP status is vLLM's, which is only known once a worker has called it; a streamed request
that waits in the queue longer than the keep-alive interval is committed as ``200`` and SSE comment
lines keep proxies from closing it; errors after that point are sent as an SSE error event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from dispatcher.delivery import Inbox
from dispatcher.errors import APIError
from dispatcher.wire import Frame, Kind
from gateway.broker import GatewayBroker

T = TypeVar("T")

KEEPALIVE = b": queued\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


@dataclass
class Outcome:
    """How a request ended, for metrics and logs."""

    status: int = 0
    completed: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_wait: float | None = None
    first_byte_at: float | None = None


@dataclass
class Relay:
    """One request in flight between the HTTP client and the worker that serves it."""

    broker: GatewayBroker
    inbox: Inbox
    queue_deadline: float  # monotonic time after which a still-queued request is abandoned
    idle_timeout: float
    keepalive_interval: float
    started_at: float = field(default_factory=time.monotonic)
    outcome: Outcome = field(default_factory=Outcome)
    # Hooks: a worker took the request (per-token limits); the request ended, however (limits,
    # metrics and the request's log line), each called once.
    on_accepted: Callable[[], None] | None = None
    on_close: list[Callable[[Relay], None]] = field(default_factory=list)
    _last_frame_at: float = field(default_factory=time.monotonic)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.inbox.on_abandon = self.close

    async def next_frames(self, timeout: float) -> list[Frame]:
        """Frames as they come; raises APIError when the request waited or idled too long."""
        frames = [f for f in await self.inbox.next_frames(timeout) if self.inbox.current(f)]
        now = time.monotonic()
        if frames:
            self._last_frame_at = now
            for frame in frames:
                if frame.kind is Kind.ACCEPTED and self.outcome.queue_wait is None:
                    self.outcome.queue_wait = now - self.started_at
                    if self.on_accepted is not None:
                        self.on_accepted()
            return frames
        if self.inbox.accepted_at is None:  # (back) in the queue
            if now >= self.queue_deadline:
                raise APIError(504, "The request timed out waiting in the queue.", code="queue_timeout")
        elif now - self._last_frame_at >= self.idle_timeout:
            raise APIError(502, "The worker serving this request stopped responding.", code="worker_lost")
        return []

    def _wait_time(self) -> float:
        if self.inbox.accepted_at is None:
            return max(0.0, min(self.keepalive_interval, self.queue_deadline - time.monotonic()))
        # Until the idle limit counted from the last frame, not from now: a silent worker is noticed
        # after idle_timeout, not up to twice that.
        return max(0.01, self.idle_timeout - (time.monotonic() - self._last_frame_at))

    async def head(self, *, commit_after: float | None) -> tuple[int, str, list[Frame]]:
        """Wait for vLLM's status. Returns (status, content type, frames so far).

        With ``commit_after``, gives up waiting after that many seconds and returns status 0,
        so that the caller can start an SSE response and keep the client's connection alive.
        """
        collected: list[Frame] = []
        give_up_at = None if commit_after is None else time.monotonic() + commit_after
        while True:
            timeout = self._wait_time()
            if give_up_at is not None:
                timeout = min(timeout, max(0.0, give_up_at - time.monotonic()))
            frames = await self.next_frames(timeout)
            collected.extend(frames)
            for frame in frames:
                if frame.kind is Kind.HEAD:
                    return frame.status, frame.data.decode() or "application/json", collected
                if frame.kind is Kind.ERROR:
                    return frame.status, "application/json", collected
            if give_up_at is not None and time.monotonic() >= give_up_at:
                return 0, "", collected

    async def body(self, frames: list[Frame]) -> bytes:
        """The rest of a non-streamed answer."""
        parts: list[bytes] = []
        while True:
            for frame in frames:
                if frame.kind is Kind.ACCEPTED:
                    parts.clear()  # a new attempt (the last one gave the request back): start over
                elif frame.kind is Kind.DATA:
                    parts.append(frame.data)
                elif frame.kind is Kind.END:
                    self.inbox.commit(frame)
                    self._finish(frame)
                    return b"".join(parts)
                elif frame.kind is Kind.ERROR:
                    self.outcome.status = frame.status
                    self.outcome.completed = True
                    return frame.data
            frames = await self.next_frames(self._wait_time())

    async def sse(self, frames: list[Frame]) -> AsyncIterator[bytes]:
        """The SSE byte stream: vLLM's events verbatim, keep-alive comments while queued."""
        try:
            while True:
                out: list[bytes] = []
                for frame in frames:
                    if frame.kind is Kind.DATA:
                        if self.inbox.commit(frame):  # the first body byte commits us to its attempt
                            out.append(frame.data)
                    elif frame.kind is Kind.END:
                        self._finish(frame)
                    elif frame.kind is Kind.ERROR:
                        out.append(b"data: " + frame.data + b"\n\n" + DONE)
                        self.outcome.status = frame.status or 502  # an error, even after a 200 head
                        self.outcome.completed = True
                    elif frame.kind is Kind.HEAD:
                        self.outcome.status = frame.status
                if out:
                    if self.outcome.first_byte_at is None:
                        self.outcome.first_byte_at = time.monotonic()
                    yield b"".join(out)
                if self.outcome.completed:
                    return
                try:
                    frames = await self.next_frames(self._wait_time())
                except APIError as exc:
                    self.outcome.status = exc.status
                    self.outcome.completed = True
                    yield b"data: " + exc.body() + b"\n\n" + DONE
                    return
                if not frames and self.inbox.accepted_at is None:
                    yield KEEPALIVE
        finally:
            self.close()

    def _finish(self, frame: Frame) -> None:
        self.outcome.completed = True
        self.outcome.status = self.outcome.status or 200
        self.outcome.prompt_tokens = frame.prompt_tokens
        self.outcome.completion_tokens = frame.completion_tokens

    def close(self) -> None:
        """Forget the request; cancels it on the worker if it did not complete. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.broker.finish(self.inbox.request_id, cancel=not self.outcome.completed)
        hooks, self.on_close = self.on_close, []
        for hook in hooks:
            hook(self)


async def wait_for_disconnect(receive: object) -> None:
    """Return when the HTTP client goes away (the body has been read already)."""
    while True:
        message = await receive()  # type: ignore[operator]
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(receive: object, work: asyncio.Future[T]) -> T | None:
    """Await ``work`` unless the client disconnects first (then cancel it and return None)."""
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    return None


"""Turn the frames of one request into its HTTP answer: SSE relayed byte for byte, or a JSON body.

The HTTP status is vLLM's, which is only known once a worker has called it; a streamed request
that waits in the queue longer than the keep-alive interval is committed as ``200`` and SSE comment
lines keep proxies from closing it; errors after that point are sent as an SSE error event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from litestar import Response
from litestar.types import ASGIApp, Receive, Scope, Send

from llmdispatch.delivery import Inbox
from llmdispatch.errors import APIError
from llmdispatch.gateway.broker import GatewayBroker
from llmdispatch.wire import Frame, Kind

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
    error_code: str = ""  # the gateway's own error that ended it (queue_timeout, worker_lost), for metrics


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
        inbox = self.inbox
        frames = await inbox.next_frames(timeout)
        now = time.monotonic()
        if frames:
            attempt = inbox.attempt
            if any(f.attempt != attempt and f.attempt for f in frames):
                frames = [f for f in frames if inbox.current(f)]
            self._last_frame_at = now
            if self.outcome.queue_wait is None:
                for frame in frames:
                    if frame.kind is Kind.ACCEPTED:
                        self.outcome.queue_wait = now - self.started_at
                        if self.on_accepted is not None:
                            self.on_accepted()
                        break
            return frames
        if self.inbox.accepted_at is None:  # (back) in the queue
            if now >= self.queue_deadline:
                self.outcome.error_code = "queue_timeout"
                raise APIError(504, "The request timed out waiting in the queue.", code="queue_timeout")
        elif now - self._last_frame_at >= self.idle_timeout:
            self.outcome.error_code = "worker_lost"
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

    async def body(self, frames: list[Frame], status: int) -> tuple[int, bytes]:
        """The rest of a non-streamed answer whose HEAD said ``status``, and the status it ended with:
        HEAD's after END, the error's when the attempt ended with ERROR (nothing was sent yet)."""
        parts: list[bytes] = []
        while True:
            for frame in frames:
                if frame.kind is Kind.ACCEPTED:
                    parts.clear()  # a new attempt (the last one gave the request back): start over
                elif frame.kind is Kind.DATA:
                    parts.append(frame.data)
                elif frame.kind is Kind.HEAD:
                    status = frame.status  # of a new attempt
                elif frame.kind is Kind.END:
                    self.inbox.commit(frame)
                    self.outcome.status = status
                    self._finish(frame)
                    return status, b"".join(parts)
                elif frame.kind is Kind.ERROR:
                    self._failed(frame)
                    return frame.status, frame.data
            frames = await self.next_frames(self._wait_time())

    async def stream(self, send: Send, watch: ClientWatch, frames: list[Frame]) -> None:
        """Write the SSE body to the client: vLLM's events verbatim, one ASGI message per batch of
        frames (this loop runs once per token per stream, so it stays flat: no generator layers);
        keep-alive comments while queued. The client leaving ends it (and cancels the work)."""
        watch.on_gone(self._client_gone)
        outcome, inbox = self.outcome, self.inbox
        try:
            while not self._closed:
                out: list[bytes] = []
                for frame in frames:
                    kind = frame.kind
                    if kind is Kind.DATA:
                        if inbox.commit(frame):  # the first body byte commits us to its attempt
                            out.append(frame.data)
                    elif kind is Kind.END:
                        self._finish(frame)
                    elif kind is Kind.ERROR:
                        out.append(b"data: " + frame.data + b"\n\n" + DONE)
                        self._failed(frame)
                    elif kind is Kind.HEAD:
                        outcome.status = frame.status
                if out:
                    if outcome.first_byte_at is None:
                        outcome.first_byte_at = time.monotonic()
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                if outcome.completed or outcome.status >= 400 or self._closed:  # closed: the client left
                    break
                try:
                    frames = await self.next_frames(self._wait_time())
                except APIError as exc:
                    # Given up here (queue or idle timeout): not completed, so close() cancels the work.
                    outcome.status = exc.status
                    body = b"data: " + exc.body() + b"\n\n" + DONE
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    break
                if not frames and inbox.accepted_at is None and not self._closed:
                    await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.stop()
            self.close()

    def _client_gone(self) -> None:
        self.close()  # the worker stops; the stream loop wakes and ends
        self.inbox.interrupt()

    def _failed(self, frame: Frame) -> None:
        """The answer ended with an ERROR frame: the worker's own (it stopped) or one the gateway made
        (attempt "": too large, too slow, lost; the worker may still run, so close() cancels it)."""
        self.outcome.status = frame.status or 502  # an error, even after a 200 head
        self.outcome.completed = bool(frame.attempt)

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
        self.inbox.cancel_timer()
        self.broker.finish(self.inbox.request_id, cancel=not self.outcome.completed)
        hooks, self.on_close = self.on_close, []
        for hook in hooks:
            hook(self)


class SSEResponse(Response[bytes]):
    """A committed stream, answered by ``Relay.stream`` itself rather than by Litestar's ``Stream``,
    whose task group and iterator layers cost more than the rest of the hop for every token."""

    def __init__(
        self, relay: Relay, watch: ClientWatch, frames: list[Frame], media_type: str, headers: dict[str, str]
    ) -> None:
        super().__init__(b"", media_type=media_type)
        self.relay = relay
        self.watch = watch
        self.frames = frames
        self.extra_headers = {**SSE_HEADERS, **headers}

    def to_asgi_response(self, app: object, request: object, **_: object) -> ASGIApp:  # type: ignore[override]
        content_type = self.media_type if "charset" in self.media_type else f"{self.media_type}; charset=utf-8"
        raw_headers = [(b"content-type", content_type.encode("latin-1"))] + [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.extra_headers.items()
        ]

        async def respond(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
            await self.relay.stream(send, self.watch, self.frames)

        return respond


class ClientWatch:
    """Notices the HTTP client leaving, with one task for the whole request (publish, queue, stream).

    Created once the body has been read; whoever ends the request calls ``stop``.
    """

    def __init__(self, receive: Receive) -> None:
        self.gone = asyncio.ensure_future(_wait_for_disconnect(receive))

    async def race(self, work: asyncio.Future[T], timeout: float | None = None) -> T | None:
        """Await ``work`` unless the client disconnects first (then cancel it and return None).
        Past ``timeout`` seconds, cancel it and raise TimeoutError."""
        done, _ = await asyncio.wait((work, self.gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        if not done:
            raise TimeoutError
        return None

    def on_gone(self, callback: Callable[[], None]) -> None:
        self.gone.add_done_callback(lambda gone: gone.cancelled() or callback())

    def stop(self) -> None:
        self.gone.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

"""The reply protocol: how one request's frames get from its worker to its client exactly once.

A request may be delivered more than once by RabbitMQ (its worker died or only lost its
connection, or gave it back because vLLM failed). Each delivery is an *attempt* with its own id,
and numbers its frames 0, 1, 2... (``Frame.seq``). The worker side is ``Attempt``; the gateway side
is ``Inbox``, a small state machine per request:

    WAITING --ACCEPTED(seq 0) of attempt A--> RUNNING(A)
    RUNNING(A) --REQUEUED(A)--> WAITING                  A gave the request back before any output
    RUNNING(A) --ACCEPTED(seq 0) of B--> RUNNING(B)      only while nothing reached the client:
                                                         A's frames not yet relayed are dropped,
                                                         A is told to stop
    RUNNING(A) --commit(A)--> COMMITTED(A)               the first body byte goes to the client
    COMMITTED(A) --ACCEPTED of B--> ENDED (error)        never splice two attempts: the stream ends
                                                         with an error event, B is told to stop
    RUNNING/COMMITTED(A) --frame of A out of order--> ENDED (error)   a gap or reordering
    any --END/ERROR of the current attempt--> ENDED      END: every frame before it arrived

Frames of an attempt that is not the current one are never relayed; ``feed`` returns the attempts
to cancel so that no GPU works for an answer nobody will read.

A redelivered attempt asks before it calls the server (ACCEPTED carrying ``ASK_PROCEED``): the
gateway answers ``Proceed`` when that ACCEPTED made it the current attempt with nothing sent to the
client (``wants``), else the ``Cancel`` that ``feed`` asked for. So an attempt that arrives after
the answer started never generates a token.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable

from llmdispatch.errors import error_body
from llmdispatch.wire import Frame, Kind


class State(enum.Enum):
    WAITING = "waiting"  # in the queue (or back in it)
    RUNNING = "running"  # an attempt runs; nothing reached the client yet
    COMMITTED = "committed"  # body bytes of the current attempt reached the client
    ENDED = "ended"


class Attempt:
    """The worker's side: numbers the frames of one delivery attempt."""

    __slots__ = ("id", "next_seq")

    def __init__(self, attempt_id: str) -> None:
        self.id = attempt_id
        self.next_seq = 0

    def frame(self, request_id: str, kind: Kind, data: bytes = b"", status: int = 0) -> Frame:
        frame = Frame(request_id, kind, data, status, self.id, self.next_seq)
        self.next_seq += 1
        return frame


class Inbox:
    """The gateway's side for one request: accepts, orders and buffers its frames."""

    __slots__ = (
        "_answer_bytes",
        "_buffered_bytes",
        "_deadline",
        "_frames",
        "_loop",
        "_next_seq",
        "_timer",
        "_waiter",
        "accepted_at",
        "attempt",
        "created_at",
        "end_reason",
        "max_answer_bytes",
        "max_buffered_bytes",
        "model",
        "on_abandon",
        "read_at",
        "request_id",
        "state",
    )

    def __init__(
        self, request_id: str, model: str, *, max_buffered_bytes: int = 4 << 20, max_answer_bytes: int | None = None
    ) -> None:
        """A streamed answer is bounded by what waits for its reader (``max_buffered_bytes``); a whole
        (non-streamed) one, given ``max_answer_bytes``, is held until complete: only its size is bounded."""
        self.request_id = request_id
        self.model = model
        self.max_buffered_bytes = max_buffered_bytes
        self.max_answer_bytes = max_answer_bytes
        self._answer_bytes = 0  # body bytes of the current attempt (whole answers)
        self.state = State.WAITING
        self.end_reason = ""  # why the gateway ended it itself (metrics): gap, attempt_lost, overflow...
        self.attempt = ""  # the current attempt
        self._next_seq = 0
        self.accepted_at: float | None = None  # monotonic; None while waiting in the queue
        self.created_at = self.read_at = time.monotonic()
        self._frames: deque[Frame] = deque()
        self._buffered_bytes = 0
        self._waiter: asyncio.Future[None] | None = None  # set while the relay waits for frames
        self._deadline: float | None = None  # loop time at which the current wait times out
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called by the gateway's sweep when nobody has read this inbox for too long.
        self.on_abandon: Callable[[], None] | None = None

    # -- from the reply consumer -------------------------------------------------------------

    def feed(self, frame: Frame) -> list[str]:
        """Take one frame. Returns the attempts that must be told to stop (usually none)."""
        if self.state is State.ENDED:
            return [frame.attempt] if frame.kind not in (Kind.END, Kind.ERROR) else []
        if frame.attempt != self.attempt or self.state is State.WAITING:
            return self._other_attempt(frame)
        if frame.seq != self._next_seq:
            # Frames of one attempt travel in order on one channel: a gap means some were lost.
            self._end(502, "Part of the answer was lost in transit; please retry.", "gap")
            return [frame.attempt]
        self._next_seq += 1
        if frame.kind is Kind.REQUEUED:
            # Back in the queue: drop what this attempt sent (a HEAD at most) and wait again.
            self._drop_buffered()
            self._answer_bytes = 0
            self.state, self.attempt, self.accepted_at = State.WAITING, "", None
            self._wake()
            return []
        if frame.kind in (Kind.END, Kind.ERROR):
            self.state = State.ENDED
        if not self._append(frame):
            return [frame.attempt]  # ended here (too large, or read too slowly): its worker stops
        return []

    def _other_attempt(self, frame: Frame) -> list[str]:
        if frame.kind is not Kind.ACCEPTED or frame.seq != 0:
            return [frame.attempt]  # a stale attempt (one we replaced) still talking
        if self.state is State.COMMITTED:
            # The answer was partly sent by an attempt that is gone: repeating it would splice two
            # answers into one stream.
            self._end(502, "The worker serving this request was lost mid-stream; please retry.", "attempt_lost")
            return [frame.attempt]
        stale = [self.attempt] if self.attempt else []
        self._drop_buffered()
        self._answer_bytes = 0
        self.state, self.attempt, self._next_seq = State.RUNNING, frame.attempt, 1
        self.accepted_at = time.monotonic()
        self._append(frame)
        return stale

    def _append(self, frame: Frame) -> bool:
        """Buffer the frame; False when that ended the request (a bound was passed)."""
        self._frames.append(frame)
        size = len(frame.data)
        self._buffered_bytes += size
        if self.max_answer_bytes is not None:
            # A whole answer is read as a whole: no reader lags behind it, only its size is bounded.
            if frame.kind is Kind.DATA:
                self._answer_bytes += size
                if self._answer_bytes > self.max_answer_bytes and self.state is not State.ENDED:
                    self._drop_buffered()
                    limit = self.max_answer_bytes
                    message = f"The answer is larger than this gateway's limit of {limit} bytes."
                    self._end(502, message, "overflow", code="answer_too_large")
                    return False
        elif self._buffered_bytes > self.max_buffered_bytes and self.state is not State.ENDED:
            # The client reads slower than the answer comes: bound the memory it can pin.
            self._drop_buffered()
            self._end(502, "The client read the answer too slowly; the stream was stopped.", "overflow")
            return False
        self._wake()
        return True

    def _drop_buffered(self) -> None:
        self._frames.clear()
        self._buffered_bytes = 0

    def _end(self, status: int, message: str, reason: str, code: str | None = None) -> None:
        """End the request here with an error frame of our own (attempt "")."""
        self.state = State.ENDED
        self.end_reason = reason
        body = error_body(status, message, code=code)
        self._frames.append(Frame(self.request_id, Kind.ERROR, body, status=status))
        self._wake()

    # -- from the gateway ----------------------------------------------------------------------

    def fail(self, status: int, message: str, reason: str = "broker_lost") -> str:
        """End the request with an error (broker lost, timeout...). Returns the attempt to stop."""
        attempt = self.attempt if self.state is not State.ENDED else ""
        if self.state is not State.ENDED:
            self._end(status, message, reason)
        return attempt

    def wants(self, attempt: str) -> bool:
        """Whether ``attempt`` may serve the request: it is the current one and nothing of the answer
        reached the client yet (the go-ahead to a redelivered attempt)."""
        return self.state is State.RUNNING and attempt == self.attempt

    @property
    def ended(self) -> bool:
        return self.state is State.ENDED

    def current(self, frame: Frame) -> bool:
        """Whether a frame handed out by ``next_frames`` still belongs to the answer."""
        return frame.attempt == self.attempt or not frame.attempt

    def commit(self, frame: Frame) -> bool:
        """Body bytes of ``frame``'s attempt are about to reach the client. False: drop them (the
        attempt was replaced since they were handed out)."""
        if not self.current(frame):
            return False
        if self.state is State.RUNNING:
            self.state = State.COMMITTED
        return True

    def interrupt(self) -> None:
        """Wake ``next_frames`` now (it returns what it has, perhaps nothing): the reader has news."""
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_frames(self, timeout: float | None) -> list[Frame]:
        """Every frame that has arrived, waiting up to ``timeout`` for one ([] on timeout)."""
        self.read_at = time.monotonic()
        if not self._frames:
            # A bare future: asyncio.wait_for would wrap every wait in a new task, and this runs once
            # per batch of frames per stream. The timer is kept across waits and re-armed only when
            # it fires early (a stream's deadline moves on with every token), not made per wait.
            # Kept: on Python 3.11 every get_running_loop() is a getpid() system call, per token here.
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            waiter = self._waiter = loop.create_future()
            if timeout is not None:
                self._deadline = deadline = loop.time() + timeout
                if self._timer is None or self._timer.when() > deadline:
                    if self._timer is not None:
                        self._timer.cancel()
                    self._timer = loop.call_at(deadline, self._on_timer)
            else:
                self._deadline = None
            try:
                await waiter
            finally:
                self._waiter = None
            self.read_at = time.monotonic()
            if not self._frames:
                return []  # timed out (or interrupted)
        frames = list(self._frames)
        self._drop_buffered()
        return frames

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None or self._deadline is None:
            return
        loop = self._loop or asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._wake()
        else:
            self._timer = loop.call_at(self._deadline, self._on_timer)

    def cancel_timer(self) -> None:
        """The reader is done with this inbox: drop its timer now rather than when it fires."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

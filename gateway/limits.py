"""Per-token limits: requests and tokens per window, requests in flight, requests queued.

With Redis the counters are shared by every gateway replica: admission is one Lua script that checks
and counts atomically; it and every other counter update go out in one pipeline per round trip,
shared by all the requests of that moment. A token with no limit at all costs no Redis command.
Without Redis they live in this process, so each replica enforces them separately. A request is never
refused, nor kept waiting, because Redis is down: each Redis call is bounded, and while Redis is
degraded (``dispatcher.dependency``) the limits are counted in this process, as without Redis.

- requests per window (``rpm``): counted at admission, in a fixed window aligned on the clock.
- tokens per window (``tpm``): prompt + completion tokens exactly as the usage ledger bills them,
  charged from the worker's frames: END for an answered request, BILLED (sent once its ledger record
  is committed) for an attempt that ended otherwise: the client left, a timeout, an error after
  output. Admission refuses while the window's total has reached the limit.
- in flight (``max_concurrent``): queued or running, one sorted-set member per request whose score is
  a safety expiry, so a crashed gateway's requests are forgotten eventually.
- queued (``max_queued``, one setting for all tokens): requests published but not yet taken by a
  worker. The queue is FIFO within a priority; this cap bounds how many of one tenant's requests can
  stand in front of another tenant's of the same priority.
- streams (``max_streams``, one setting for all tokens): streamed requests of one token open in this
  gateway process (queued or running). Counted here, not in Redis: what it bounds is this process's
  memory, as each stream may buffer up to ``MAX_BUFFERED_BYTES`` for a slow reader.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from llmdispatch.dependency import Dependency, Unavailable, redis_dependency
from llmdispatch.errors import APIError
from llmdispatch.tokens import TokenInfo
from llmdispatch.wire import Frame, Kind

if TYPE_CHECKING:
    from llmdispatch.gateway.relay import Relay

log = logging.getLogger("dispatcher.gateway.limits")

KEY_PREFIX = "dispatcher:limit:"
# Seconds an ended request still takes its worker's billing: a cancelled attempt reports after the
# cancel reached it, its prompt was counted (bounded, 2 s) and its ledger record committed (bounded, 2 s).
BILLING_GRACE = 60.0

# KEYS: requests (this window), tokens (this window), in-flight set, queued set
# ARGV: now, window ttl (s), rpm, tpm, max_concurrent, max_queued, request id, set expiry (score), set ttl (s)
_ADMIT = """
local now = tonumber(ARGV[1])
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_concurrent, max_queued = tonumber(ARGV[5]), tonumber(ARGV[6])
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local flight, queued = 0, 0
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  flight = redis.call('ZCARD', KEYS[3])
end
if max_queued > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  queued = redis.call('ZCARD', KEYS[4])
end
local reason = ''
if rpm > 0 and requests >= rpm then reason = 'requests'
elseif tpm > 0 and tokens >= tpm then reason = 'tokens'
elseif max_concurrent > 0 and flight >= max_concurrent then reason = 'concurrency'
elseif max_queued > 0 and queued >= max_queued then reason = 'queued'
end
if reason == '' then
  if rpm > 0 then
    requests = redis.call('INCR', KEYS[1])
    redis.call('EXPIRE', KEYS[1], ARGV[2])
  end
  if max_concurrent > 0 then
    redis.call('ZADD', KEYS[3], ARGV[8], ARGV[7])
    redis.call('EXPIRE', KEYS[3], ARGV[9])
    flight = flight + 1
  end
  if max_queued > 0 then
    redis.call('ZADD', KEYS[4], ARGV[8], ARGV[7])
    redis.call('EXPIRE', KEYS[4], ARGV[9])
    queued = queued + 1
  end
end
return {reason, requests, tokens, flight, queued}
"""


@dataclass(frozen=True)
class Counts:
    """A token's counters as admission saw them (after counting this request, if admitted)."""

    refused: str  # "" | "requests" | "tokens" | "concurrency" | "queued"
    requests: int
    tokens: int
    in_flight: int
    queued: int


@dataclass(frozen=True)
class Quota:
    """The limits that apply to one request (0 = none)."""

    rpm: int
    tpm: int
    max_concurrent: int
    max_queued: int

    @classmethod
    def of(cls, token: TokenInfo, max_queued: int) -> Quota:
        return cls(token.rpm or 0, token.tpm or 0, token.max_concurrent or 0, max_queued)

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_concurrent or self.max_queued)


def _keys(name: str, window_index: int) -> tuple[str, str, str, str]:
    # The hash tag keeps a token's keys in one Redis Cluster slot, as Lua scripts need.
    base = f"{KEY_PREFIX}{{{name}}}:"
    return base + f"req:{window_index}", base + f"tok:{window_index}", base + "flight", base + "queued"


Command = tuple[Any, ...]  # a Redis command and its arguments, e.g. ("ZREM", key, member)


class _Pipeline:
    """Every Redis command of this gateway's limits, sent in one pipeline per round trip.

    While one pipeline is on the wire, the next requests' commands queue; they all go in the next
    one. So at any rate there is at most one round trip in flight and one connection in use, instead
    of a command (and, under load, a new connection) per request and event. Updates nobody waits for
    (a request was taken, a request ended) leave with the next admission, or after ``linger`` seconds:
    a request then costs one round trip, not three. The commands are written and read on a pooled
    connection directly: redis-py's Pipeline object costs more CPU than the round trip it saves.
    """

    def __init__(self, redis: aioredis.Redis, linger: float = 0.02) -> None:
        self.redis = redis
        self.linger = linger
        self._queue: list[tuple[list[Command], asyncio.Future[list[Any]] | None]] = []
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None  # a strong reference: the loop keeps weak ones
        self._connection: AbstractConnection | None = None

    def submit(self, commands: list[Command], *, wait: bool) -> asyncio.Future[list[Any]] | None:
        """Queue ``commands``; with ``wait``, a future of their replies (an error reply as its exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future() if wait else None
        self._queue.append((commands, future))
        if wait:
            self._start()
        elif self._timer is None and not self._running:
            self._timer = loop.call_later(self.linger, self._start)
        return future

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._running and self._queue:
            self._running = True
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._running = False

    async def _send(self, batch: list[tuple[list[Command], asyncio.Future[list[Any]] | None]]) -> None:
        commands = [command for group, _ in batch for command in group]
        try:
            replies = await self._round_trip(commands)
        except (RedisError, OSError) as exc:
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(exc)
            if all(future is None for _, future in batch):
                log.debug("limit counters not updated: %s", type(exc).__name__)
            return
        start = 0
        for group, future in batch:
            if future is not None and not future.done():
                future.set_result(replies[start : start + len(group)])
            start += len(group)

    async def _round_trip(self, commands: list[Command]) -> list[Any]:
        # One connection of our own (the pipeline is never in flight twice); it reconnects by itself.
        connection = self._connection
        if connection is None:
            connection = self._connection = self.redis.connection_pool.make_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # an error reply: its command's result, not the batch's
                    replies.append(exc)
        except BaseException:
            await connection.disconnect()  # replies may be left unread: start on a fresh socket
            raise
        return replies

    async def close(self) -> None:
        """Drop the connection (the next round trip opens a new one)."""
        if self._connection is not None:
            await self._connection.disconnect()
            self._connection = None


class RedisCounters:
    """The counters in Redis, shared by every gateway replica; every command goes through one pipeline."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._admit = redis.register_script(_ADMIT)  # knows how to load itself after a NOSCRIPT
        self._pipeline = _Pipeline(redis)

    async def admit(self, name: str, request_id: str, quota: Quota, window: float, expiry: float) -> Counts:
        now = time.time()
        keys = _keys(name, int(now // window))
        args = [now, math.ceil(window) + 1, quota.rpm, quota.tpm, quota.max_concurrent, quota.max_queued,
                request_id, now + expiry, math.ceil(expiry)]  # fmt: skip
        sha = self._admit.sha
        future = self._pipeline.submit([("EVALSHA", sha, len(keys), *keys, *args)], wait=True)
        assert future is not None
        (result,) = await future
        if isinstance(result, NoScriptError):  # first use, or Redis restarted: load it (once) and run it alone
            result = await self._admit(keys=list(keys), args=args)
        elif isinstance(result, Exception):
            raise result
        reason, requests, tokens, flight, queued = result
        refused = reason.decode() if isinstance(reason, bytes) else str(reason)
        return Counts(refused, int(requests), int(tokens), int(flight), int(queued))

    def accepted(self, name: str, request_id: str) -> None:
        queued_key = _keys(name, 0)[3]
        self._pipeline.submit([("ZREM", queued_key, request_id)], wait=False)

    def finish(self, name: str, request_id: str, tokens: int, window: float) -> None:
        now = time.time()
        _, tokens_key, flight_key, queued_key = _keys(name, int(now // window))

        commands: list[Command] = [("ZREM", flight_key, request_id), ("ZREM", queued_key, request_id)]
        if tokens > 0:
            commands += [("INCRBY", tokens_key, tokens), ("EXPIRE", tokens_key, math.ceil(window) + 1)]
        self._pipeline.submit(commands, wait=False)

    def charge(self, name: str, tokens: int, window: float) -> None:
        """Add ``tokens`` (negative: take back) to the token's current window."""
        tokens_key = _keys(name, int(time.time() // window))[1]
        commands: list[Command] = [("INCRBY", tokens_key, tokens), ("EXPIRE", tokens_key, math.ceil(window) + 1)]
        self._pipeline.submit(commands, wait=False)

    async def reconnect(self) -> None:
        """The next round trip on a new socket (after an outage)."""
        await self._pipeline.close()

    async def drain(self) -> None:
        """Until queued updates are sent (on shutdown)."""
        self._pipeline._start()  # now, not after the linger
        for _ in range(50):
            if not self._pipeline._queue and not self._pipeline._running:
                break
            await asyncio.sleep(0.02)
        await self._pipeline.close()


@dataclass
class _Window:
    index: int = -1
    requests: int = 0
    tokens: int = 0


@dataclass
class _TokenState:
    window: _Window = field(default_factory=_Window)
    in_flight: dict[str, float] = field(default_factory=dict)  # request id -> expiry
    queued: dict[str, float] = field(default_factory=dict)


class LocalCounters:
    """The same counters in this process (no Redis): each gateway replica counts for itself."""

    def __init__(self) -> None:
        self._tokens: dict[str, _TokenState] = {}

    def _state(self, name: str, now: float, window: float) -> _TokenState:
        state = self._tokens.setdefault(name, _TokenState())
        index = int(now // window)
        if state.window.index != index:
            state.window = _Window(index)
        for members in (state.in_flight, state.queued):
            for request_id in [r for r, until in members.items() if until <= now]:
                del members[request_id]
        return state

    async def admit(self, name: str, request_id: str, quota: Quota, window: float, expiry: float) -> Counts:
        now = time.time()
        state = self._state(name, now, window)
        current = state.window
        refused = ""
        if quota.rpm and current.requests >= quota.rpm:
            refused = "requests"
        elif quota.tpm and current.tokens >= quota.tpm:
            refused = "tokens"
        elif quota.max_concurrent and len(state.in_flight) >= quota.max_concurrent:
            refused = "concurrency"
        elif quota.max_queued and len(state.queued) >= quota.max_queued:
            refused = "queued"
        if not refused:
            current.requests += 1
            if quota.max_concurrent:
                state.in_flight[request_id] = now + expiry
            if quota.max_queued:
                state.queued[request_id] = now + expiry
        return Counts(refused, current.requests, current.tokens, len(state.in_flight), len(state.queued))

    def accepted(self, name: str, request_id: str) -> None:
        state = self._tokens.get(name)
        if state is not None:
            state.queued.pop(request_id, None)

    def finish(self, name: str, request_id: str, tokens: int, window: float) -> None:
        state = self._state(name, time.time(), window)
        state.in_flight.pop(request_id, None)
        state.queued.pop(request_id, None)
        state.window.tokens += tokens

    def charge(self, name: str, tokens: int, window: float) -> None:
        self._state(name, time.time(), window).window.tokens += tokens


class StreamCap:
    """Streamed requests of each token open in this process (queued or running), at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no cap
        self._open: dict[str, int] = {}

    def acquire(self, name: str) -> Callable[[], None] | None:
        """Count one more stream of ``name`` (raise a 429 APIError at the cap); returns its release."""
        if not self.limit:
            return None
        count = self._open.get(name, 0)
        if count >= self.limit:
            raise APIError(
                429,
                f"Too many streams open for token {name}: limit {self.limit}. Wait for one to finish and try again.",
                code="stream_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self._open[name] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._open.get(name, 1) - 1
            if left > 0:
                self._open[name] = left
            else:
                self._open.pop(name, None)

        return release


class FallbackCounters:
    """The Redis counters, or this process's while Redis is degraded.

    A request admitted here is finished here; tokens of requests that end while Redis is degraded are
    charged here too (Redis would drop them).
    """

    def __init__(self, redis: aioredis.Redis, health: Dependency) -> None:
        self.shared = RedisCounters(redis)
        self.local = LocalCounters()
        self.health = health
        self._local_ids: set[str] = set()
        self._recoveries = health.recoveries
        # Tokens charged while Redis was degraded (name, tokens, window, when): added to the shared
        # window once Redis is back, so that every replica's limit counts them, as the ledger does.
        self._unsent: list[tuple[str, int, float, float]] = []

    async def admit(self, name: str, request_id: str, quota: Quota, window: float, expiry: float) -> Counts:
        if self.health.recoveries != self._recoveries:  # Redis is back: our socket may predate its restart
            self._recoveries = self.health.recoveries
            await self.shared.reconnect()
            self._replay_charges()
        try:
            return await self.health.call(lambda: self.shared.admit(name, request_id, quota, window, expiry))
        except Unavailable:
            self._local_ids.add(request_id)
            return await self.local.admit(name, request_id, quota, window, expiry)

    def accepted(self, name: str, request_id: str) -> None:
        (self.local if request_id in self._local_ids else self.shared).accepted(name, request_id)

    def finish(self, name: str, request_id: str, tokens: int, window: float) -> None:
        if request_id in self._local_ids or self.health.degraded:
            self._local_ids.discard(request_id)
            self.local.finish(name, request_id, tokens, window)
        else:
            self.shared.finish(name, request_id, tokens, window)

    def charge(self, name: str, tokens: int, window: float) -> None:
        if self.health.degraded:
            self.local.charge(name, tokens, window)
            self._unsent.append((name, tokens, window, time.time()))
        else:
            self.shared.charge(name, tokens, window)

    def _replay_charges(self) -> None:
        """Charges made while degraded, into Redis: those of a window that has not ended yet."""
        unsent, self._unsent = self._unsent, []
        now = time.time()
        for name, tokens, window, at in unsent:
            if at // window == now // window:
                self.shared.charge(name, tokens, window)

    async def drain(self) -> None:
        await self.shared.drain()


class Admission:
    """One admitted request: report when a worker took it, when it ended (exactly once), and what
    its worker billed."""

    def __init__(
        self,
        limiter: RateLimiter | None,
        name: str,
        request_id: str,
        headers: dict[str, str],
        release_stream: Callable[[], None] | None = None,
    ) -> None:
        self._limiter = limiter
        self.name = name
        self.request_id = request_id
        self.headers = headers  # x-ratelimit-* for the response
        self._release_stream = release_stream
        self._accepted = False
        self._finished = False
        # What is charged so far, and whether from an answered attempt: the ledger keeps one record
        # per request, an answered one first, then the larger count (dispatcher.usage.unique).
        self._charged = 0
        self._charged_answered = False

    def accepted(self) -> None:
        """A worker took the request off the queue: it no longer counts as queued."""
        if self._limiter is None or self._accepted or self._finished:
            return
        self._accepted = True
        self._limiter.counters.accepted(self.name, self.request_id)  # queued, sent with others: no await

    def release(self, exchange: Relay) -> None:
        """The close hook of the request's Relay: free its slots (tokens come from the worker's frames)."""
        self.finish()

    def finish(self) -> None:
        """The request ended (any way at all): free its slots. Its tokens may still be billed after."""
        if self._finished:
            return
        self._finished = True
        if self._release_stream is not None:
            self._release_stream()
        limiter = self._limiter
        if limiter is not None:
            limiter.counters.finish(self.name, self.request_id, 0, limiter.window)
            limiter.ended(self)

    def bill(self, tokens: int, *, answered: bool) -> None:
        """One attempt's tokens as its worker billed them (END, or BILLED after its ledger record):
        charge what the ledger counts for the request, once, whichever attempts report."""
        limiter = self._limiter
        if limiter is None or (answered, tokens) <= (self._charged_answered, self._charged):
            return
        delta = tokens - self._charged  # negative only when an answered attempt follows a larger failed one
        self._charged, self._charged_answered = tokens, answered
        if delta:
            limiter.counters.charge(self.name, delta, limiter.window)


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        window: float,
        max_queued: int,
        expiry: float,
        max_streams: int = 0,
        health: Dependency | None = None,
    ) -> None:
        self.counters: FallbackCounters | LocalCounters = (
            FallbackCounters(redis, health or redis_dependency(redis, 0.5)) if redis is not None else LocalCounters()
        )
        self.window = window
        self.max_queued = max_queued
        self.expiry = expiry  # safety net: a request counts as in flight at most this long
        self.streams = StreamCap(max_streams)
        self._warned_at = 0.0
        # Admissions of tokens with a tpm, by request id, until BILLING_GRACE after they ended: the
        # worker's billing frames find them here.
        self._billable: dict[str, Admission] = {}
        self._ended: deque[tuple[float, str]] = deque()

    async def admit(self, token: TokenInfo, request_id: str = "", *, stream: bool = False) -> Admission:
        """Count a new request of this token, or raise a 429 APIError when a limit is reached.
        ``request_id``: the id its frames carry (their billing is charged to it)."""
        quota = Quota.of(token, self.max_queued)
        request_id = request_id or uuid.uuid4().hex
        release_stream = self.streams.acquire(token.name) if stream else None
        if not quota.any:
            return Admission(None, token.name, request_id, {}, release_stream)
        try:
            counts = await self.counters.admit(token.name, request_id, quota, self.window, self.expiry)
        except (RedisError, OSError) as exc:  # fail open: limits are not worth an outage
            self._warn(exc)
            return Admission(None, token.name, request_id, {}, release_stream)
        except BaseException:
            if release_stream is not None:
                release_stream()
            raise
        headers = self._headers(quota, counts)
        if counts.refused:
            if release_stream is not None:
                release_stream()
            raise _refusal(token.name, quota, counts, headers, self._reset())
        admission = Admission(self, token.name, request_id, headers, release_stream)
        if quota.tpm:
            self._billable[request_id] = admission
        return admission

    def billed(self, frame: Frame) -> None:
        """A frame with a worker's billing (END or BILLED) of one of this gateway's requests, perhaps
        one that ended here already (the client left): charge its request. Called per frame: no awaits."""
        admission = self._billable.get(frame.request_id)
        if admission is not None:
            admission.bill(frame.prompt_tokens + frame.completion_tokens, answered=frame.kind is Kind.END)

    def ended(self, admission: Admission) -> None:
        """``admission`` ended: keep it for late billing frames, then forget it."""
        now = time.monotonic()
        if admission.request_id in self._billable:
            self._ended.append((now + BILLING_GRACE, admission.request_id))
        while self._ended and self._ended[0][0] <= now:
            self._billable.pop(self._ended.popleft()[1], None)

    async def drain(self) -> None:
        """Let pending counter updates reach Redis (on shutdown)."""
        if isinstance(self.counters, FallbackCounters):
            await self.counters.drain()

    def _reset(self) -> float:
        """Seconds until the current window ends."""
        return self.window - (time.time() % self.window)

    def _headers(self, quota: Quota, counts: Counts) -> dict[str, str]:
        headers: dict[str, str] = {}
        reset = duration(self._reset())
        if quota.rpm:
            headers["x-ratelimit-limit-requests"] = str(quota.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, quota.rpm - counts.requests))
            headers["x-ratelimit-reset-requests"] = reset
        if quota.tpm:
            headers["x-ratelimit-limit-tokens"] = str(quota.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, quota.tpm - counts.tokens))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            log.warning("rate limits unavailable (Redis: %s): letting requests through", type(exc).__name__)


def _refusal(name: str, quota: Quota, counts: Counts, headers: dict[str, str], reset: float) -> APIError:
    retry_after = 1
    if counts.refused == "requests":
        retry_after = math.ceil(reset)
        message = (
            f"Rate limit reached for requests per minute (RPM) on token {name}: "
            f"Limit {quota.rpm}, Used {counts.requests}. Please try again in {duration(reset)}."
        )
        code = "rate_limit_exceeded"
    elif counts.refused == "tokens":
        retry_after = math.ceil(reset)
        message = (
            f"Rate limit reached for tokens per minute (TPM) on token {name}: "
            f"Limit {quota.tpm}, Used {counts.tokens}. Please try again in {duration(reset)}."
        )
        code = "rate_limit_exceeded"
    elif counts.refused == "concurrency":
        message = (
            f"Too many requests in flight for token {name}: limit {quota.max_concurrent}. "
            "Wait for one to finish and try again."
        )
        code = "concurrency_limit_exceeded"
    else:
        message = (
            f"Too many requests queued for token {name}: limit {quota.max_queued}. "
            "Wait for the queue to move and try again."
        )
        code = "too_many_queued_requests"
    return APIError(429, message, code=code, headers={**headers, "Retry-After": str(max(1, retry_after))})


def duration(seconds: float) -> str:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    if minutes:
        return f"{int(minutes)}m{int(rest)}s"
    return f"{rest:.3g}s"

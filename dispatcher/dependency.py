"""A dependency's health as this process sees it (Redis, SQL), and the degraded mode around it.

Every call goes through ``Dependency.call``: bounded by ``timeout`` (on top of the client's own socket
and statement timeouts, so a pool wait, a reconnect or a retry cannot add to it). The first call that
fails or times out marks the dependency degraded: one warning line, ``dispatcher_dependency_degraded``
= 1, and from then on ``call`` raises ``Unavailable`` at once, so callers serve from what they know
(in-process caches and limits) instead of each waiting for the timeout again. A background probe
calls the dependency every ``interval`` seconds (doubling up to ``max_interval``), bounded the same
way; its first success ends the episode (one info line, gauge 0). No request waits on a degraded
dependency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from llmdispatch.metrics import dependency_metrics

log = logging.getLogger("dispatcher.dependency")

T = TypeVar("T")


class Unavailable(Exception):
    """The dependency failed, timed out, or is known to be degraded: serve without it."""

    def __init__(self, name: str, cause: BaseException | None = None) -> None:
        super().__init__(f"{name} unavailable" + (f": {describe(cause)}" if cause is not None else " (degraded)"))
        self.cause = cause


class Dependency:
    def __init__(
        self,
        name: str,
        probe: Callable[[], Awaitable[object]],
        *,
        timeout: float,
        errors: tuple[type[BaseException], ...] = (),
        interval: float = 0.5,
        max_interval: float = 2.0,
        on_recover: Callable[[], Awaitable[object]] | None = None,
        detach: bool = False,
    ) -> None:
        """``detach``: run each call as a task of its own, given up on at the timeout (for clients whose
        cancellation may itself wait on the dead peer); else bounded in the caller's task (cheaper)."""
        self.name = name
        self.detach = detach
        self.probe = probe
        self.on_recover = on_recover
        self.timeout = timeout
        # What counts as "the dependency failed" besides timeouts and OSError (a refused connection).
        self.errors = (TimeoutError, OSError, *errors)
        self.interval = interval
        self.max_interval = max_interval
        self._degraded_since: float | None = None
        self.recoveries = 0  # episodes ended: users holding their own connections reopen them
        self._fallbacks = 0  # in this episode, for the recovery line
        self._task: asyncio.Task[None] | None = None
        metrics = dependency_metrics()
        self._gauge = metrics.degraded.labels(name)
        self._counter = metrics.fallbacks.labels(name)
        self._gauge.set(0)

    @property
    def degraded(self) -> bool:
        return self._degraded_since is not None

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """``await make()`` within the timeout; ``Unavailable`` when degraded (no call) or when it fails."""
        if self._degraded_since is not None:
            self.fallback()
            raise Unavailable(self.name)
        if not self.detach:
            try:
                async with asyncio.timeout(self.timeout):
                    return await make()
            except self.errors as exc:
                self.failed(exc)
                raise Unavailable(self.name, exc) from exc
        # A task of its own, so that the caller's wait ends at the timeout: a cancelled driver may take as
        # long again to clean up (a rollback on a black-holed connection); that happens in the background.
        task = asyncio.ensure_future(make())
        try:
            done, _ = await asyncio.wait((task,), timeout=self.timeout)
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_retrieve)
        try:
            if not done:
                raise TimeoutError(f"no answer within {self.timeout:g}s")
            return task.result()
        except self.errors as exc:
            self.failed(exc)
            raise Unavailable(self.name, exc) from exc

    def fallback(self) -> None:
        """Count one call served without the dependency."""
        self._fallbacks += 1
        self._counter.inc()

    def failed(self, exc: BaseException) -> None:
        """A call failed or timed out: degrade (once per episode) and probe in the background."""
        self.fallback()
        if self._degraded_since is not None:
            return
        self._degraded_since = time.monotonic()
        self._gauge.set(1)
        log.warning("%s unavailable (%s): serving without it until a probe reaches it again", self.name, describe(exc))
        self._task = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        delay = self.interval
        while True:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self.timeout):
                    await self.probe()
                    if self.on_recover is not None:
                        await self.on_recover()
            except asyncio.CancelledError:
                raise
            except Exception:  # still down: any error at all, the probe only asks "can we use it?"
                delay = min(delay * 2, self.max_interval)
                continue
            break
        since = self._degraded_since or time.monotonic()
        log.warning(
            "%s reachable again after %.1fs (%d calls served without it)",
            self.name,
            time.monotonic() - since,
            self._fallbacks,
        )
        self._degraded_since = None
        self.recoveries += 1
        self._fallbacks = 0
        self._gauge.set(0)
        self._task = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def _retrieve(task: asyncio.Future[object]) -> None:
    """Collect the outcome of a call given up on, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    text = str(exc).strip().split("\n", 1)[0][:200]  # a driver's first line, not its SQL statement
    return type(exc).__name__ + (f": {text}" if text else "")


# -- the two dependencies of the gateway ------------------------------------------------------------


def bounded_redis(url: str, timeout: float, max_connections: int = 512) -> aioredis.Redis:
    """A Redis client every call of which is bounded: connect, read and pool wait take ``timeout`` at most.

    A pool that waits for a free connection: redis-py's default pool raises MaxConnectionsError beyond
    100 connections at once, which under a burst of new requests made token lookups fall through to
    SQL and rate limits let requests through unchecked. No retries (redis-py's default retries a
    timed-out call): the caller's degraded mode is the retry.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool)


def redis_dependency(client: aioredis.Redis, timeout: float) -> Dependency:
    async def fresh_connections() -> None:
        # Idle connections may date from before the outage (a restarted server): start on new sockets.
        await client.connection_pool.disconnect(inuse_connections=False)

    return Dependency("redis", client.ping, timeout=timeout, errors=(RedisError,), on_recover=fresh_connections)

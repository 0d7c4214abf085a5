"""Bearer-token authentication: in-process caches, then Redis, then SQL.

Tokens are looked up by their sha256; the secret itself is never stored, cached or logged.

A flood of made-up tokens must not push the valid ones out nor reach the database once each, so:
- valid and unknown tokens live in separate bounded caches (cachetools): misses never evict hits;
- an unknown token is remembered for ``negative_ttl`` seconds (here and in Redis);
- lookups that reach SQL for tokens neither Redis nor this process knows are rate-limited per gateway
  (``sql_lookups_per_second``): beyond it such a token gets a 503 with ``Retry-After`` and no SQL query.
  A token this process has seen valid (its last-known answer) is never charged to that budget.

Redis and SQL calls are bounded and each has a degraded mode (``dispatcher.dependency``): while Redis is
degraded lookups go straight to SQL; while SQL is degraded a token this process has seen valid is
served from its last-known answer and others get a 503. Neither waits on the dependency again.

Revocation: ``dispatcher tokens`` writes a short-lived tombstone over a changed token's Redis entry
(``dispatcher.tokens.TOMBSTONE``); a lookup that read SQL before the change writes its answer back only
where no tombstone is (one Lua script), so a late write-back cannot resurrect the old row. In this
process, an invalidation heard while a lookup is in flight keeps that lookup's answer out of the caches.
"""

from __future__ import annotations

import logging
import time

import msgspec
import redis.asyncio as aioredis
from cachetools import LRUCache, TTLCache

from llmdispatch.dependency import Dependency, Unavailable, bounded_redis, redis_dependency
from llmdispatch.errors import APIError
from llmdispatch.metrics import gateway_metrics
from llmdispatch.tokens import REDIS_KEY, TOMBSTONE, TokenInfo, TokenStore, hash_token
from llmdispatch.wire import MAX_PRIORITY, clamp_priority

log = logging.getLogger("dispatcher.gateway.auth")

# The request header with which a client lowers one request's priority below its token's.
PRIORITY_HEADER = "x-dispatcher-priority"

_UNKNOWN = b"-"  # cached "no such token", so that bad tokens don't hammer SQL

# Write a looked-up token back unless `dispatcher tokens` tombstoned it meanwhile.
# KEYS: the token's key; ARGV: value, ttl (s), tombstone
_CACHE_UNLESS_TOMBSTONED = """
if redis.call('GET', KEYS[1]) == ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

_info_decoder = msgspec.json.Decoder(TokenInfo)
_encoder = msgspec.json.Encoder()


def shared_redis(url: str, timeout: float = 0.5, max_connections: int = 512) -> aioredis.Redis:
    """The gateway's Redis client (see ``dispatcher.dependency.bounded_redis``)."""
    return bounded_redis(url, timeout, max_connections)


class RateBudget:
    """A token bucket: ``rate`` takes per second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level < 1:
            return False
        self._level -= 1
        return True


class TokenAuthenticator:
    def __init__(
        self,
        store: TokenStore,
        redis: aioredis.Redis | None,
        *,
        local_ttl: float = 5.0,
        negative_ttl: float = 2.0,
        redis_ttl: int = 300,
        max_entries: int = 100_000,
        sql_lookups_per_second: float = 50.0,
        redis_health: Dependency | None = None,
        sql_health: Dependency | None = None,
    ) -> None:
        self.store = store
        self.redis = redis
        self.negative_ttl = negative_ttl
        self.redis_ttl = redis_ttl
        self._valid: TTLCache[str, TokenInfo] = TTLCache(max_entries, local_ttl)
        self._unknown: TTLCache[str, bool] = TTLCache(max_entries, negative_ttl)
        # The last answer SQL gave for a valid token: served while the database is unreachable.
        self._known: LRUCache[str, TokenInfo] = LRUCache(max_entries)
        self._sql_budget = RateBudget(sql_lookups_per_second, burst=max(1.0, sql_lookups_per_second))
        self._lookups = gateway_metrics().token_lookups
        self.redis_health = redis_health or (redis_dependency(redis, 0.5) if redis is not None else None)
        self.sql_health = sql_health or store.dependency()
        self._cache_write = redis.register_script(_CACHE_UNLESS_TOMBSTONED) if redis is not None else None
        self._epoch = 0  # counts invalidations: a lookup that saw one while in flight caches nothing

    async def authenticate(self, authorization: str | None) -> TokenInfo:
        secret = _bearer(authorization)
        info = await self.lookup(hash_token(secret))
        if info is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return info

    async def lookup(self, token_hash: str) -> TokenInfo | None:
        info = self._valid.get(token_hash)
        if info is not None:
            self._lookups.labels("cache").inc()
            return info
        if token_hash in self._unknown:
            self._lookups.labels("negative_cache").inc()
            return None
        epoch = self._epoch
        try:
            info = await self._lookup_shared(token_hash)
        except Unavailable as exc:
            stale = self._known.get(token_hash)
            if stale is not None:  # the database is down: a token we knew keeps working
                self._lookups.labels("stale").inc()
                return stale
            raise APIError(503, "The token database is unavailable; try again later.") from exc
        if epoch == self._epoch:  # else the token changed while we looked: this answer may predate it
            if info is None:
                self._unknown[token_hash] = True
                self._known.pop(token_hash, None)  # revoked: not served even while SQL is down
            else:
                self._valid[token_hash] = self._known[token_hash] = info
        return info

    def invalidate(self, token_hash: str | None = None, *, keep_known: bool = False) -> None:
        """Forget a token (or all): ``keep_known`` keeps the last-known answers served while SQL is down."""
        self._epoch += 1
        if token_hash is None:
            self._valid.clear()
            self._unknown.clear()
            if not keep_known:
                self._known.clear()
        else:
            for cache in (self._valid, self._unknown, self._known):
                cache.pop(token_hash, None)

    async def close(self) -> None:
        for health in (self.redis_health, self.sql_health):
            if health is not None:
                await health.close()

    async def _lookup_shared(self, token_hash: str) -> TokenInfo | None:
        key = REDIS_KEY + token_hash
        redis, redis_health = self.redis, self.redis_health
        tombstoned = False
        if redis is not None and redis_health is not None:
            try:
                raw = await redis_health.call(lambda: redis.get(key))
            except Unavailable:  # Redis is a cache: SQL answers (the dependency logged it)
                raw = None
            if raw == TOMBSTONE:
                tombstoned = True  # just changed: ask SQL, and leave the tombstone in place
            elif raw is not None:
                self._lookups.labels("redis").inc()
                return None if raw == _UNKNOWN else _info_decoder.decode(raw)
        # A token seen valid here is a real tenant's: never refused for the flood of made-up ones.
        if token_hash not in self._known and not self.sql_health.degraded and not self._sql_budget.take():
            self._lookups.labels("refused").inc()
            raise APIError(
                503,
                "Too many unknown API keys at once; try again shortly.",
                code="token_lookups_exhausted",
                headers={"Retry-After": "1"},
            )
        self._lookups.labels("sql").inc()
        info = await self.sql_health.call(lambda: self.store.lookup(token_hash))
        if redis_health is not None and self._cache_write is not None and not tombstoned and not redis_health.degraded:
            value = _encoder.encode(info) if info is not None else _UNKNOWN
            ttl = self.redis_ttl if info is not None else max(1, round(self.negative_ttl))
            script = self._cache_write
            try:
                await redis_health.call(lambda: script(keys=[key], args=[value, ttl, TOMBSTONE]))
            except Unavailable:
                pass
        return info


def effective_priority(token: TokenInfo, requested: str | None) -> int:
    """The request's priority: the token's, or lower when the client asks for less.

    ``X-Dispatcher-Priority: N`` may lower a request below its token's priority (a batch job
    yielding to its own interactive traffic), never raise it: higher values count as the token's.
    """
    own = clamp_priority(token.priority)
    if requested is None:
        return own
    try:
        value = int(requested.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise APIError(
            400,
            f"Invalid {PRIORITY_HEADER} header: expected an integer from 0 to {MAX_PRIORITY} (higher = sooner).",
            param=PRIORITY_HEADER,
            code="invalid_priority",
        )
    return min(own, value)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise APIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    scheme, _, secret = authorization.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or len(secret) > 512:
        raise APIError(401, "Malformed Authorization header: expected 'Bearer <token>'.", code="invalid_api_key")
    return secret

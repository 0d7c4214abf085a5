"""Bearer-token authentication: in-process caches, then Redis, then SQL.

Tokens are looked up by their sha256; the secret itself is never stored, cached or logged.

A flood of made-up tokens must not push the valid ones out nor reach the database once each, so:
- valid and unknown tokens live in separate bounded caches (cachetools): misses never evict hits;
- an unknown token is remembered for ``negative_ttl`` seconds (here and in Redis);
- lookups that reach SQL for tokens Redis does not know are rate-limited per gateway
  (``sql_lookups_per_second``): beyond it such a token gets a 503 with ``Retry-After`` and no SQL query.
  A valid token already in Redis or in this process's cache is answered as usual.
"""

from __future__ import annotations

import logging
import time

import msgspec
import redis.asyncio as aioredis
from cachetools import LRUCache, TTLCache
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from dispatcher.errors import APIError
from dispatcher.metrics import gateway_metrics
from dispatcher.tokens import REDIS_KEY, TokenInfo, TokenStore, hash_token
from dispatcher.wire import MAX_PRIORITY, clamp_priority

log = logging.getLogger("dispatcher.gateway.auth")

# The request header with which a client lowers one request's priority below its token's.
PRIORITY_HEADER = "x-dispatcher-priority"

_UNKNOWN = b"-"  # cached "no such token", so that bad tokens don't hammer SQL

_info_decoder = msgspec.json.Decoder(TokenInfo)
_encoder = msgspec.json.Encoder()


def shared_redis(url: str, max_connections: int = 512, wait: float = 5.0) -> aioredis.Redis:
    """The gateway's Redis client: a pool that waits for a free connection.

    redis-py's default pool has 100 connections and raises MaxConnectionsError beyond them at once;
    under a burst of new requests that made token lookups fall through to SQL and rate limits let
    requests through unchecked. This pool waits up to ``wait`` seconds instead.
    """
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=wait)
    return aioredis.Redis(connection_pool=pool)


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
        try:
            info = await self._lookup_shared(token_hash)
        except (SQLAlchemyError, OSError) as exc:  # OSError: the driver could not even connect
            stale = self._known.get(token_hash)
            if stale is not None:  # the database is down: a token we knew keeps working
                log.warning("token database unavailable, serving a cached token: %s", type(exc).__name__)
                self._valid[token_hash] = stale
                return stale
            raise APIError(503, "The token database is unavailable; try again later.") from exc
        if info is None:
            self._unknown[token_hash] = True
        else:
            self._valid[token_hash] = self._known[token_hash] = info
        return info

    def invalidate(self, token_hash: str | None = None) -> None:
        if token_hash is None:
            self._valid.clear()
            self._unknown.clear()
            self._known.clear()
        else:
            for cache in (self._valid, self._unknown, self._known):
                cache.pop(token_hash, None)

    async def _lookup_shared(self, token_hash: str) -> TokenInfo | None:
        if self.redis is not None:
            try:
                raw = await self.redis.get(REDIS_KEY + token_hash)
                if raw is not None:
                    self._lookups.labels("redis").inc()
                    return None if raw == _UNKNOWN else _info_decoder.decode(raw)
            except RedisError as exc:  # Redis is a cache: fall back to SQL
                log.warning("redis unavailable for token lookup: %s", type(exc).__name__)
        if not self._sql_budget.take():
            self._lookups.labels("refused").inc()
            raise APIError(
                503,
                "Too many unknown API keys at once; try again shortly.",
                code="token_lookups_exhausted",
                headers={"Retry-After": "1"},
            )
        self._lookups.labels("sql").inc()
        info = await self.store.lookup(token_hash)
        if self.redis is not None:
            try:
                value = _encoder.encode(info) if info is not None else _UNKNOWN
                ttl = self.redis_ttl if info is not None else max(1, round(self.negative_ttl))
                await self.redis.set(REDIS_KEY + token_hash, value, ex=ttl)
            except RedisError:
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

"""Bearer-token authentication: an in-process TTL cache, then Redis, then SQL.

Tokens are looked up by their sha256; the secret itself is never stored, cached or logged.
"""

from __future__ import annotations

import logging
import time

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from dispatcher.errors import APIError
from dispatcher.tokens import REDIS_KEY, TokenInfo, TokenStore, hash_token
from dispatcher.wire import MAX_PRIORITY, clamp_priority

log = logging.getLogger("dispatcher.gateway.auth")

# The request header with which a client lowers one request's priority below its token's.
PRIORITY_HEADER = "x-dispatcher-priority"

_UNKNOWN = b"-"  # cached "no such token", so that bad tokens don't hammer SQL

_info_decoder = msgspec.json.Decoder(TokenInfo)
_encoder = msgspec.json.Encoder()


class TokenAuthenticator:
    def __init__(
        self,
        store: TokenStore,
        redis: aioredis.Redis | None,
        *,
        local_ttl: float = 5.0,
        negative_ttl: float = 2.0,
        redis_ttl: int = 300,
    ) -> None:
        self.store = store
        self.redis = redis
        self.local_ttl = local_ttl
        self.negative_ttl = negative_ttl
        self.redis_ttl = redis_ttl
        self._local: dict[str, tuple[float, TokenInfo | None]] = {}

    async def authenticate(self, authorization: str | None) -> TokenInfo:
        secret = _bearer(authorization)
        info = await self.lookup(hash_token(secret))
        if info is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return info

    async def lookup(self, token_hash: str) -> TokenInfo | None:
        now = time.monotonic()
        cached = self._local.get(token_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        stale = cached[1] if cached is not None else None
        try:
            info = await self._lookup_shared(token_hash)
        except (SQLAlchemyError, OSError) as exc:  # OSError: the driver could not even connect
            if stale is not None:  # the database is down: a token we knew keeps working
                log.warning("token database unavailable, serving a cached token: %s", type(exc).__name__)
                self._local[token_hash] = (now + self.local_ttl, stale)
                return stale
            raise APIError(503, "The token database is unavailable; try again later.") from exc
        ttl = self.local_ttl if info is not None else self.negative_ttl
        if len(self._local) > 100_000:
            self._local.clear()
        self._local[token_hash] = (now + ttl, info)
        return info

    def invalidate(self, token_hash: str | None = None) -> None:
        if token_hash is None:
            self._local.clear()
        else:
            self._local.pop(token_hash, None)

    async def _lookup_shared(self, token_hash: str) -> TokenInfo | None:
        if self.redis is not None:
            try:
                raw = await self.redis.get(REDIS_KEY + token_hash)
                if raw is not None:
                    return None if raw == _UNKNOWN else _info_decoder.decode(raw)
            except RedisError as exc:  # Redis is a cache: fall back to SQL
                log.warning("redis unavailable for token lookup: %s", type(exc).__name__)
        info = await self.store.lookup(token_hash)
        if self.redis is not None:
            try:
                value = _encoder.encode(info) if info is not None else _UNKNOWN
                ttl = self.redis_ttl if info is not None else int(self.negative_ttl) or 1
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

"""API tokens and their priorities, kept in SQL (SQLite, PostgreSQL or MySQL/MariaDB).

Only the sha256 of a token is stored; the secret is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from llmdispatch.dependency import Dependency
from llmdispatch.local import prepare_database
from llmdispatch.wire import MAX_PRIORITY

log = logging.getLogger("dispatcher.tokens")

# Redis key prefix of cached tokens, and the channel that tells gateways a token changed.
REDIS_KEY = "dispatcher:token:"
INVALIDATE_CHANNEL = "dispatcher:tokens:invalidate"
# What a change leaves in a token's Redis entry for TOMBSTONE_TTL seconds: "ask SQL, and cache nothing
# here". A gateway whose SQL read predates the change cannot write its old answer over it (see
# gateway/auth.py); the TTL outlasts any lookup in flight (each of its calls is bounded).
TOMBSTONE = b"!"
TOMBSTONE_TTL = 60

metadata = sa.MetaData()

tokens_table = sa.Table(
    "dispatcher_tokens",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("priority", sa.Integer, nullable=False, default=1),
    sa.Column("rpm", sa.Integer, nullable=True),  # requests per minute
    sa.Column("tpm", sa.Integer, nullable=True),  # prompt + completion tokens per minute
    sa.Column("max_concurrent", sa.Integer, nullable=True),  # requests in flight (queued or running)
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)


# The columns of a TokenInfo, in its field order.
_INFO_COLUMNS = (
    tokens_table.c.name,
    tokens_table.c.priority,
    tokens_table.c.rpm,
    tokens_table.c.tpm,
    tokens_table.c.max_concurrent,
)


def _add_missing_columns(conn: sa.Connection) -> list[str]:
    """Bring a tokens table made by an older release up to date: add the columns it lacks.

    Migrations are additive only, so that old and new releases can share the table during a rollout
    (old code names its columns and ignores new ones). A column added later must therefore be
    nullable or have a server default; anything else needs a manual migration (docs/operations.md).
    """
    existing = {column["name"] for column in sa.inspect(conn).get_columns(tokens_table.name)}
    added = []
    for column in tokens_table.columns:
        if column.name in existing:
            continue
        kind = column.type.compile(dialect=conn.dialect)
        default = "" if column.server_default is None else f" DEFAULT {column.server_default.arg}"  # type: ignore[attr-defined]
        conn.execute(sa.text(f"ALTER TABLE {tokens_table.name} ADD COLUMN {column.name} {kind}{default}"))
        added.append(column.name)
    return added


def _bounded(database_url: str, timeout: float | None) -> dict[str, Any]:
    """Engine options that bound every call: connect, pool wait and (server side) each statement.

    The server-side limits stop a runaway statement; a server that stops answering is bounded by the
    driver's own timeout where it has one (asyncpg) and by the caller's (``Dependency.call``) everywhere.
    """
    if timeout is None:
        return {}
    url = sa.make_url(database_url)
    backend, driver = url.get_backend_name(), url.get_driver_name()
    options: dict[str, Any] = {"pool_timeout": timeout}
    if backend == "postgresql" and driver == "asyncpg":
        options["connect_args"] = {
            "timeout": timeout,
            "command_timeout": timeout,
            "server_settings": {"statement_timeout": str(max(1, round(timeout * 1000)))},
        }
    elif backend in ("mysql", "mariadb"):
        options["connect_args"] = {"connect_timeout": max(1, math.ceil(timeout))}
    elif backend == "sqlite":
        # Waiting for another writer's lock: ends before the caller's bound, so that the driver fails the
        # statement itself. A statement cancelled inside aiosqlite leaves its connection's read lock held.
        options["connect_args"] = {"timeout": timeout / 2}
    return options


def _limit_mysql_statements(engine: AsyncEngine, timeout: float) -> None:
    """Every new MySQL/MariaDB session gets a statement time limit (each server names it its own way)."""

    @sa.event.listens_for(engine.sync_engine, "connect")
    def limit(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for statement in (
                f"SET SESSION max_statement_time = {timeout:.3f}",  # MariaDB: seconds, every statement
                f"SET SESSION max_execution_time = {max(1, round(timeout * 1000))}",  # MySQL: ms, SELECTs
            ):
                try:
                    cursor.execute(statement)
                    break
                except Exception:  # not this server's variable: try the other one
                    continue
        finally:
            cursor.close()


class TokenInfo(msgspec.Struct, frozen=True):
    """What the gateway needs to know about a valid token (never the secret itself)."""

    name: str
    priority: int
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None


@dataclass
class TokenRow:
    name: str
    priority: int
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    revoked: bool
    created_at: datetime


class TokenError(ValueError):
    """A token command that cannot be carried out (unknown name, duplicate...)."""


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return "sk-" + secrets.token_urlsafe(32)


def check_priority(priority: int) -> int:
    if not 0 <= priority <= MAX_PRIORITY:
        raise TokenError(f"priority must be between 0 and {MAX_PRIORITY}, got {priority}")
    return priority


class TokenStore:
    """Async access to the tokens table; the schema is created on first use."""

    def __init__(self, database_url: str, timeout: float | None = None) -> None:
        """``timeout``: seconds any one connect, pool wait or statement may take (None: the drivers' own)."""
        prepare_database(database_url)
        self.timeout = timeout
        self.engine: AsyncEngine = create_async_engine(
            database_url, pool_pre_ping=True, **_bounded(database_url, timeout)
        )
        self._schema_ready = False
        if timeout is not None and self.engine.dialect.name in ("mysql", "mariadb"):
            _limit_mysql_statements(self.engine, timeout)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    def dependency(self) -> Dependency:
        """The database's health for callers that must not wait on it (the gateway's token lookups)."""
        return Dependency("sql", self.ping, timeout=self.timeout or 2.0, errors=(SQLAlchemyError,), detach=True)

    async def ensure_schema(self) -> None:
        if not self._schema_ready:
            async with self.engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
                added = await conn.run_sync(_add_missing_columns)
            if added:
                log.info("tokens table: added columns %s", ", ".join(added))
            self._schema_ready = True

    async def lookup(self, token_hash: str) -> TokenInfo | None:
        await self.ensure_schema()
        query = sa.select(*_INFO_COLUMNS).where(
            tokens_table.c.token_hash == token_hash, tokens_table.c.revoked.is_(False)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return TokenInfo(row.name, row.priority, row.rpm, row.tpm, row.max_concurrent)

    async def hash_of(self, name: str) -> str | None:
        await self.ensure_schema()
        query = sa.select(tokens_table.c.token_hash).where(tokens_table.c.name == name)
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def add(
        self,
        name: str,
        priority: int,
        *,
        secret: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> str:
        """Create a token and return its secret (generated unless given)."""
        await self.ensure_schema()
        secret = secret or new_secret()
        values = {
            "name": name,
            "token_hash": hash_token(secret),
            "priority": check_priority(priority),
            "rpm": rpm,
            "tpm": tpm,
            "max_concurrent": max_concurrent,
            "revoked": False,
            "created_at": datetime.now(UTC).replace(tzinfo=None),
        }
        async with self.engine.begin() as conn:
            exists = (await conn.execute(sa.select(tokens_table.c.name).where(tokens_table.c.name == name))).first()
            if exists:
                raise TokenError(f"a token named {name!r} already exists")
            await conn.execute(tokens_table.insert().values(**values))
        return secret

    async def update(self, name: str, **values: object) -> str:
        """Change columns of a token; returns its hash (to invalidate caches)."""
        await self.ensure_schema()
        if "priority" in values:
            check_priority(int(values["priority"]))  # type: ignore[call-overload]
        async with self.engine.begin() as conn:
            token_hash = (
                await conn.execute(sa.select(tokens_table.c.token_hash).where(tokens_table.c.name == name))
            ).scalar()
            if token_hash is None:
                raise TokenError(f"no token named {name!r}")
            await conn.execute(tokens_table.update().where(tokens_table.c.name == name).values(**values))
        return token_hash

    async def revoke(self, name: str) -> str:
        return await self.update(name, revoked=True)

    async def delete(self, name: str) -> str | None:
        await self.ensure_schema()
        async with self.engine.begin() as conn:
            token_hash = (
                await conn.execute(sa.select(tokens_table.c.token_hash).where(tokens_table.c.name == name))
            ).scalar()
            await conn.execute(tokens_table.delete().where(tokens_table.c.name == name))
        return token_hash

    async def list(self) -> list[TokenRow]:
        await self.ensure_schema()
        query = sa.select(
            *_INFO_COLUMNS,
            tokens_table.c.revoked,
            tokens_table.c.created_at,
        ).order_by(tokens_table.c.priority.desc(), tokens_table.c.name)
        async with self.engine.connect() as conn:
            return [TokenRow(*row) for row in (await conn.execute(query)).all()]

    async def sync(self, entries: Iterable[SyncEntry], *, revoke: bool = True, dry_run: bool = False) -> SyncResult:
        """Make the table hold these tokens: add new ones, update changed ones, and (``revoke``)
        revoke those not in ``entries``. ``dry_run`` computes the same result and writes nothing."""
        await self.ensure_schema()
        wanted = {entry.name: entry for entry in entries}
        result = SyncResult()
        async with self.engine.begin() as conn:
            rows = (await conn.execute(sa.select(tokens_table))).all()
            existing = {row.name: row for row in rows}
            writes: list[sa.Executable] = []
            for name, row in existing.items():
                if name not in wanted and revoke and not row.revoked:
                    writes.append(tokens_table.update().where(tokens_table.c.name == name).values(revoked=True))
                    result.revoked.append(name)
                    result.hashes.append(row.token_hash)
            for entry in wanted.values():
                values = {
                    "token_hash": hash_token(entry.token),
                    "priority": check_priority(entry.priority),
                    "rpm": entry.rpm,
                    "tpm": entry.tpm,
                    "max_concurrent": entry.max_concurrent,
                    "revoked": False,
                }
                row = existing.get(entry.name)
                if row is None:
                    created = datetime.now(UTC).replace(tzinfo=None)
                    writes.append(tokens_table.insert().values(name=entry.name, created_at=created, **values))
                    result.added.append(entry.name)
                elif any(getattr(row, column) != value for column, value in values.items()):
                    writes.append(tokens_table.update().where(tokens_table.c.name == entry.name).values(**values))
                    result.changed.append(entry.name)
                    result.hashes.append(row.token_hash)
                else:
                    result.unchanged.append(entry.name)
                    continue
                result.hashes.append(str(values["token_hash"]))
            if not dry_run:
                for statement in writes:
                    await conn.execute(statement)
        return result


@dataclass
class SyncResult:
    """What ``TokenStore.sync`` did (or would do): token names per change, and the hashes to invalidate."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.changed)} changed, {len(self.revoked)} revoked, "
            f"{len(self.unchanged)} unchanged"
        )


class SyncEntry(msgspec.Struct, forbid_unknown_fields=True):
    """One token of a sync file (the Helm chart's `tokens` list)."""

    token: str
    priority: int = 1
    name: str = ""
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None


class SyncFile(msgspec.Struct):
    tokens: list[SyncEntry] = []


def load_sync_file(text: str) -> list[SyncEntry]:
    """Parse a YAML tokens file; unnamed tokens are called token-<index>."""
    import yaml

    raw = yaml.safe_load(text) or {}
    if isinstance(raw, list):  # a bare list is accepted too
        raw = {"tokens": raw}
    parsed = msgspec.convert(raw, SyncFile)
    return [
        msgspec.structs.replace(entry, name=entry.name or f"token-{index}") for index, entry in enumerate(parsed.tokens)
    ]


async def publish_invalidation(redis_url: str, token_hashes: list[str], timeout: float = 5.0) -> None:
    """Tell every gateway (through Redis) that these tokens changed.

    Each token's cached entry becomes a tombstone rather than being deleted, so that a gateway whose
    lookup read SQL before the change cannot write the old row back after it (see gateway/auth.py).
    """
    if not redis_url or not token_hashes:
        return
    client = aioredis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for token_hash in token_hashes:
                pipe.set(REDIS_KEY + token_hash, TOMBSTONE, ex=TOMBSTONE_TTL)
            for token_hash in token_hashes:
                pipe.publish(INVALIDATE_CHANNEL, token_hash)
            await pipe.execute()
    except (RedisError, OSError) as exc:
        log.warning("could not invalidate cached tokens in redis: %s", type(exc).__name__)
    finally:
        await client.aclose()

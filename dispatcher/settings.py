"""Settings shared by every part: each one reads a ``DISPATCHER_*`` environment variable.

Command-line flags override them (see ``dispatcher.cli``). Secrets (URLs with passwords) come from
the environment only, so they never show up in ``ps`` output.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field, fields

from llmdispatch.local import default_database_url

ENV_PREFIX = "DISPATCHER_"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting's value is wrong: the message names the variable (``dispatcher`` exits with code 2)."""


def _raw(name: str) -> str | None:
    raw = os.environ.get(ENV_PREFIX + name)
    return None if raw is None or not raw.strip() else raw.strip()


def _fail(name: str, raw: str, expected: str) -> SettingsError:
    return SettingsError(f"{ENV_PREFIX}{name}={raw!r}: expected {expected}")


def _env(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def _env_choice(name: str, default: str, choices: Collection[str]) -> str:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() not in choices:
        raise _fail(name, raw, "one of " + ", ".join(choices))
    return raw.lower()


def _env_bool(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise _fail(name, raw, "true or false (or 1/0, yes/no, on/off)")


def _bounded(name: str, raw: str, value: float, low: float, high: float | None, positive: bool) -> None:
    if math.isnan(value) or math.isinf(value) or value < low or (positive and value <= 0):
        bound = "greater than 0" if positive else f"at least {low:g}"
        raise _fail(name, raw, f"a number {bound}" + (f" and at most {high:g}" if high is not None else ""))
    if high is not None and value > high:
        raise _fail(name, raw, f"a number from {low:g} to {high:g}")


def _env_float(
    name: str, default: float, *, low: float = 0.0, high: float | None = None, positive: bool = False
) -> float:
    """A number of seconds (or another quantity) from ``low`` to ``high``; ``positive``: above 0."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _fail(name, raw, "a number") from None
    _bounded(name, raw, value, low, high, positive)
    return value


def _env_int(name: str, default: int, *, low: int = 0, high: int | None = None) -> int:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise _fail(name, raw, "an integer") from None
    _bounded(name, raw, value, low, high, positive=False)
    return value


def _env_headroom(name: str, default: str) -> str:
    raw = _raw(name)
    if raw is None or raw.lower() == "auto":
        return default if raw is None else "auto"
    if not raw.isdigit():
        raise _fail(name, raw, "auto or a whole number of slots (0 or more)")
    return raw


# RabbitMQ's stream max-age: a number and a unit (Y, M, D, h, m, s), e.g. 30D, 24h.
_MAX_AGE = re.compile(r"\d+[YMDhms]")


def _env_max_age(name: str, default: str) -> str:
    raw = _raw(name)
    if raw is None:
        return default
    if not _MAX_AGE.fullmatch(raw):
        raise _fail(name, raw, "a number and a unit, one of Y M D h m s (e.g. 30D, 24h)")
    return raw


def _env_url(name: str, default: str, schemes: tuple[str, ...]) -> str:
    """A URL (or a comma-separated list of them) of one of ``schemes``; empty stays empty (off)."""
    raw = _raw(name)
    if raw is None:
        return default
    for url in raw.split(","):
        scheme, sep, rest = url.strip().partition("://")
        if not sep or not rest or scheme.lower() not in schemes:
            raise _fail(name, raw, "a URL starting with " + " or ".join(s + "://" for s in schemes))
    return raw


# The async drivers SQLAlchemy can use for the tokens table.
DATABASE_SCHEMES = (
    "sqlite+aiosqlite", "postgresql+asyncpg", "mysql+aiomysql", "mysql+asyncmy", "mariadb+aiomysql", "mariadb+asyncmy",
)  # fmt: skip
PORT = {"low": 0, "high": 65535}
LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")


@dataclass
class CommonSettings:
    amqp_url: str = field(
        default_factory=lambda: _env_url("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/", ("amqp", "amqps"))
    )
    # Unset: tokens are cached in-process only (fine for one gateway replica).
    redis_url: str = field(default_factory=lambda: _env_url("REDIS_URL", "", ("redis", "rediss", "unix")))
    # Default: a SQLite file in $XDG_DATA_HOME/dispatcher/ (never the current directory: see dispatcher.local).
    database_url: str = field(
        default_factory=lambda: _env_url("DATABASE_URL", default_database_url(), DATABASE_SCHEMES)
    )
    # RabbitMQ stream for the usage ledger, e.g. rabbitmq-stream://guest:guest@127.0.0.1:5552/ (unset: off).
    usage_stream_url: str = field(
        default_factory=lambda: _env_url("USAGE_STREAM_URL", "", ("rabbitmq-stream", "rabbitmq-stream+tls"))
    )
    usage_stream_name: str = field(default_factory=lambda: _env("USAGE_STREAM_NAME", "usage"))
    usage_max_age: str = field(default_factory=lambda: _env_max_age("USAGE_MAX_AGE", "30D"))
    usage_max_bytes: int = field(default_factory=lambda: _env_int("USAGE_MAX_BYTES", 5_000_000_000, low=1))
    # Write-ahead log of usage records the stream has not confirmed yet ("" default:
    # $XDG_STATE_HOME/dispatcher/usage-<stream>.wal; "off": none, a crash loses unconfirmed records).
    usage_wal: str = field(default_factory=lambda: _env("USAGE_WAL", ""))
    # Unconfirmed records beyond this many bytes (a long stream outage): the worker takes no new requests.
    usage_wal_max_bytes: int = field(default_factory=lambda: _env_int("USAGE_WAL_MAX_BYTES", 64 * 1024 * 1024, low=1))
    # Seconds the end of a request waits for the stream's confirm of its record (then it stays in the log).
    usage_commit_timeout: float = field(default_factory=lambda: _env_float("USAGE_COMMIT_TIMEOUT", 2.0, positive=True))
    # Seconds a request may wait in the queue before it is answered with 504.
    queue_timeout: float = field(default_factory=lambda: _env_float("QUEUE_TIMEOUT", 300.0, positive=True))
    # Messages per model queue before publishing is refused with 429 (a queue argument: gateways
    # and workers must agree on it). 0: no argument; a RabbitMQ policy sets max-length and
    # overflow=reject-publish instead (the chart renders one), and can change it later.
    max_queue_length: int = field(default_factory=lambda: _env_int("MAX_QUEUE_LENGTH", 10_000))
    # Priorities at or above this go to the model's express queue, whose requests may also use the
    # worker's headroom (11: off; priorities are 0..10). Gateways and workers must agree.
    express_priority: int = field(default_factory=lambda: _env_int("EXPRESS_PRIORITY", 8, low=0, high=11))
    # classic (priorities 0-10; lost with its node) or quorum (replicated; on RabbitMQ 4.x two
    # priority classes: above 4 is high). Gateways and workers must agree.
    queue_type: str = field(default_factory=lambda: _env_choice("QUEUE_TYPE", "classic", ("classic", "quorum")))
    # A gateway that sends no heartbeat (every 0.2 s) for this long is gone: workers abort its
    # requests. A gateway that loses its connection says so at once; this bounds the GPU time spent
    # for a crashed one. Shorter aborts live streams of a gateway whose CPU is starved.
    gateway_liveness_timeout: float = field(
        default_factory=lambda: _env_float("GATEWAY_LIVENESS_TIMEOUT", 3.0, positive=True)
    )
    # Seconds any one Redis call may take (connect, pool wait, reply); beyond it Redis counts as degraded:
    # the gateway serves from its in-process token caches and limits until a background probe reaches it.
    redis_timeout: float = field(default_factory=lambda: _env_float("REDIS_TIMEOUT", 0.5, positive=True))
    # Seconds any one SQL call may take (connect, pool wait, statement: also set as the server's statement
    # timeout); beyond it the database counts as degraded: tokens seen valid are served from memory.
    sql_timeout: float = field(default_factory=lambda: _env_float("SQL_TIMEOUT", 1.0, positive=True))
    log_level: str = field(default_factory=lambda: _env_choice("LOG_LEVEL", "info", LOG_LEVELS))
    log_format: str = field(default_factory=lambda: _env_choice("LOG_FORMAT", "text", ("text", "json")))  # text | json
    # Label request and token-count metrics with the token's name (false: the label is "").
    per_token_metrics: bool = field(default_factory=lambda: _env_bool("PER_TOKEN_METRICS", True))

    def override(self, **values: object) -> None:
        """Apply command-line values; ``None`` means "flag not given"."""
        names = {f.name for f in fields(self)}
        for key, value in values.items():
            if key in names and value is not None:
                setattr(self, key, value)


@dataclass
class GatewaySettings(CommonSettings):
    host: str = field(default_factory=lambda: _env("HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: _env_int("PORT", 8080, **PORT))
    max_body_bytes: int = field(default_factory=lambda: _env_int("MAX_BODY_BYTES", 10 * 1024 * 1024, low=1))
    # A stream whose worker stays silent this long (no frame, no heartbeat) ends with an error.
    idle_timeout: float = field(default_factory=lambda: _env_float("IDLE_TIMEOUT", 30.0, positive=True))
    # Seconds between SSE comment lines while a streamed request waits in the queue.
    keepalive_interval: float = field(default_factory=lambda: _env_float("KEEPALIVE_INTERVAL", 10.0, positive=True))
    # Seconds a SIGTERM'd gateway keeps serving its open streams.
    shutdown_grace: float = field(default_factory=lambda: _env_float("SHUTDOWN_GRACE", 30.0))
    # Seconds a SIGTERM'd gateway keeps accepting while /ready says 503, so load balancers stop routing.
    drain_delay: float = field(default_factory=lambda: _env_float("DRAIN_DELAY", 5.0))
    # Seconds a gateway trusts a token it looked up (changes also arrive at once through Redis).
    token_cache_ttl: float = field(default_factory=lambda: _env_float("TOKEN_CACHE_TTL", 5.0))
    # Length of the rate-limit window in seconds: a token's rpm/tpm are counted per window
    # (60 = per minute; shorter only for tests).
    rate_limit_window: float = field(default_factory=lambda: _env_float("RATE_LIMIT_WINDOW", 60.0, positive=True))
    # Requests of one token waiting in the queue (not yet taken by a worker) before more are
    # refused with 429, so that one tenant cannot bury another of the same priority. 0 = no cap.
    max_queued_per_token: int = field(default_factory=lambda: _env_int("MAX_QUEUED_PER_TOKEN", 64))
    # Streamed requests of one token open at once in one gateway process (queued or running) before
    # more are refused with 429: each may buffer up to max_buffered_bytes for a slow reader. 0 = no cap.
    max_streams_per_token: int = field(default_factory=lambda: _env_int("MAX_STREAMS_PER_TOKEN", 64))
    # Models this deployment serves (comma-separated): their queues are declared by the gateway, so
    # their requests wait in the queue while no worker runs (scale from zero) instead of a 404.
    models: str = field(default_factory=lambda: _env("MODELS", ""))
    # Bytes of answer buffered for one stream whose client reads slowly; beyond, the stream ends.
    max_buffered_bytes: int = field(default_factory=lambda: _env_int("MAX_BUFFERED_BYTES", 4 << 20, low=1))
    # Bytes of one non-streamed answer (a JSON body, e.g. embeddings) the gateway accepts; beyond, 502.
    # Whole answers are held until complete, so this, not MAX_BUFFERED_BYTES, bounds their memory.
    max_answer_bytes: int = field(default_factory=lambda: _env_int("MAX_ANSWER_BYTES", 128 << 20, low=1))
    # Seconds a publish may take before the request is refused with 503.
    publish_timeout: float = field(default_factory=lambda: _env_float("PUBLISH_TIMEOUT", 10.0, positive=True))
    # Sequences one request may ask for with n or best_of (each runs in the server's batch, while the
    # request takes one worker slot): above, 400. OpenAI allows n up to 128; 0: no cap.
    max_sequences: int = field(default_factory=lambda: _env_int("MAX_SEQUENCES", 8, low=0))
    # Port of /metrics, apart from the API port so that an Ingress routing the API does not publish it
    # (0: /metrics on the API port).
    metrics_port: int = field(default_factory=lambda: _env_int("METRICS_PORT", 9091, low=-1, high=65535))
    # Seconds a client has to send a request's head (line and headers): slower ones are disconnected, so
    # a flood of slow-header clients cannot hold connections open.
    header_timeout: float = field(default_factory=lambda: _env_float("HEADER_TIMEOUT", 10.0, positive=True))
    # Open connections (streams included) one gateway process serves; beyond it requests get a 503.
    max_connections: int = field(default_factory=lambda: _env_int("MAX_CONNECTIONS", 4096, low=1))
    # Gateway processes sharing the port (SO_REUSEPORT), each with its own AMQP connections: one per core.
    gateway_workers: int = field(default_factory=lambda: _env_int("GATEWAY_WORKERS", os.cpu_count() or 1, low=1))


@dataclass
class WorkerSettings(CommonSettings):
    model: str = field(default_factory=lambda: _env("MODEL", ""))
    vllm_url: str = field(default_factory=lambda: _env_url("VLLM_URL", "http://127.0.0.1:8000/v1", ("http", "https")))
    vllm_api_key: str = field(default_factory=lambda: _env("VLLM_API_KEY", "EMPTY"))
    # Requests the worker runs at once on its server (the server must run at least this many sequences).
    max_concurrency: int = field(default_factory=lambda: _env_int("MAX_CONCURRENCY", 24, low=1))
    # Of max_concurrency, the sequences kept for express (high) priorities: the normal lane runs at most
    # max_concurrency - headroom, so a high request starts at once, inside the server's batch, instead of
    # waiting for a slot to free. "auto": a third (24 -> 16 + 8); 0: one lane for all.
    priority_headroom: str = field(default_factory=lambda: _env_headroom("PRIORITY_HEADROOM", "auto"))
    # A hard reserve, the older name of the headroom: when set (> 0) it is the headroom.
    reserved_slots: int = field(default_factory=lambda: _env_int("RESERVED_SLOTS", 0))
    # Pass the token priority to vLLM (needs vLLM started with --scheduling-policy priority).
    vllm_priority: bool = field(default_factory=lambda: _env_bool("VLLM_PRIORITY", False))
    # Kind of inference server beside the worker: vllm | sglang | llamacpp | generic | auto (detected from
    # /metrics). Decides the load metrics read, the health semantics and whether priority is passed
    # (see worker/backends.py).
    backend: str = field(
        default_factory=lambda: _env_choice("BACKEND", "vllm", ("vllm", "sglang", "llamacpp", "generic", "auto"))
    )
    # Worker processes beside the one server, sharing max_concurrency and the headroom (and the HTTP
    # port): one process relays 15,000-35,000 tokens/s on a core, less than a large batch of a fast GPU.
    processes: int = field(default_factory=lambda: _env_int("WORKER_PROCESSES", 1, low=1))
    # Port of the worker's own /health, /ready and /metrics.
    http_host: str = field(default_factory=lambda: _env("WORKER_HOST", "0.0.0.0"))
    http_port: int = field(default_factory=lambda: _env_int("WORKER_PORT", 9090, **PORT))
    # Seconds a SIGTERM'd worker lets its running requests finish.
    shutdown_grace: float = field(default_factory=lambda: _env_float("SHUTDOWN_GRACE", 120.0))
    # Seconds between heartbeat frames while vLLM is silent.
    heartbeat_interval: float = field(default_factory=lambda: _env_float("HEARTBEAT_INTERVAL", 5.0, positive=True))
    # Max delay before buffered frames are flushed to a gateway (seconds).
    flush_interval: float = field(default_factory=lambda: _env_float("FLUSH_INTERVAL", 0.005))
    # Seconds without a byte from vLLM before a request is aborted as stalled (0: never).
    vllm_stall_timeout: float = field(default_factory=lambda: _env_float("VLLM_STALL_TIMEOUT", 120.0))
    # Seconds a non-streamed request may take in all (the server sends nothing until it is done, so
    # the stall timeout cannot apply); then it is aborted with 504 (0: never).
    vllm_request_timeout: float = field(default_factory=lambda: _env_float("VLLM_REQUEST_TIMEOUT", 1800.0))
    # Send vLLM a per-tenant cache_salt (HMAC of the token name under CACHE_SALT_KEY), so tenants
    # never share prefix-cache blocks (see docs/tenancy.md).
    cache_salt: bool = field(default_factory=lambda: _env_bool("CACHE_SALT", False))
    cache_salt_key: str = field(default_factory=lambda: _env("CACHE_SALT_KEY", ""))

    @property
    def headroom(self) -> int:
        """Slots of max_concurrency only express requests may use (see ``priority_headroom``)."""
        if self.reserved_slots > 0:
            return min(self.reserved_slots, self.max_concurrency - 1)
        value = self.priority_headroom.strip().lower()
        headroom = self.max_concurrency // 3 if value in ("", "auto") else int(value)
        return max(0, min(headroom, self.max_concurrency - 1))

"""The usage ledger: one record per finished request on a RabbitMQ stream, and reading it back.

Workers append records (``worker/usage.py``); ``dispatcher usage`` reads them from a point in time
and totals them per token and model. Records are JSON, sent as plain bytes (one codec for the whole
stream: never mix in AMQP 1.0 messages).

Token counts are the ones the server reported. Where it reported none, the worker counts the content
chunks it relayed and marks the record ``estimated``; a request that ended before any output has
``usage_reported = False`` and zero counts. Requests the gateway refused (429 from a rate limit or a
full queue) have a record too, with outcome ``rejected`` and zero counts.

Each request is counted once: the producer deduplicates on the stream (``dispatcher/ledger.py``), and
``summarize`` keeps one record per request id should a request still appear twice (e.g. a worker
that died after its record but before its ack, and the request's redelivery).
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
import re
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
from rstream import Consumer, ConsumerOffsetSpecification, MessageContext, OffsetType

DEFAULT_PORT = 5552


class UsageRecord(msgspec.Struct, kw_only=True):
    request_id: str
    token: str  # the token's name, never its secret
    model: str
    priority: int
    endpoint: str
    stream: bool
    outcome: str  # ok | error | cancelled | rejected (refused at the gateway, never queued)
    status: int  # vLLM's HTTP status, or the error status the client got (0: never reached vLLM)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False  # are there counts at all (False: cancelled/failed before any output)
    estimated: bool = False  # counted from the content chunks relayed: the server reported no usage
    queue_wait: float | None = None  # seconds from publish to the worker taking it
    ttft: float | None = None  # seconds from publish to the first token (streamed requests)
    duration: float = 0.0  # seconds from publish to the end
    worker: str = ""
    time: float = 0.0  # unix time of the end


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(UsageRecord)


def encode_record(record: UsageRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> UsageRecord | None:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        return None  # someone else's message on our stream: skip it


@dataclass(frozen=True)
class StreamAddress:
    """Where the stream lives, from ``rabbitmq-stream://user:password@host:port/vhost``."""

    host: str
    port: int
    username: str
    password: str
    vhost: str

    @classmethod
    def parse(cls, url: str) -> StreamAddress:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("rabbitmq-stream", "rabbitmq-stream+tls") or not parts.hostname:
            raise ValueError(f"not a stream URL (rabbitmq-stream://user:password@host:5552/): {url!r}")
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        return cls(
            host=parts.hostname,
            port=parts.port or DEFAULT_PORT,
            username=urllib.parse.unquote(parts.username or "guest"),
            password=urllib.parse.unquote(parts.password or "guest"),
            vhost=vhost,
        )

    def connect_kwargs(self) -> dict[str, object]:
        return {"port": self.port, "vhost": self.vhost, "username": self.username, "password": self.password}


# -- reading ----------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Unix time from ``1h``/``30m``/``7d`` (ago), an ISO date or datetime (UTC unless it says), or a number."""
    now = time.time() if now is None else now
    if match := _RELATIVE.match(text):
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (try 1h, 30m, 7d, 2026-11-01 or 2026-11-01T08:00+01:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# Chunks are timestamped by the broker when written, a little after the record's own end time;
# starting this much earlier keeps records of a slightly skewed worker clock (they are filtered
# by their own time afterwards).
_CLOCK_SLACK = 300.0


async def _last_offset(address: StreamAddress, stream: str, wait: float) -> int | None:
    """The offset of the stream's last message now (None: empty). RabbitMQ 3.10 has no stream
    statistics command, so subscribe at LAST (the last chunk) and take its highest offset."""
    consumer = Consumer(address.host, connection_name="dispatcher-usage-probe", **address.connect_kwargs())  # type: ignore[arg-type]
    last: list[int] = []
    arrived = asyncio.Event()

    def on_message(_: bytes, context: MessageContext) -> None:
        last.append(context.offset)
        arrived.set()

    try:
        await consumer.subscribe(
            stream, on_message, offset_specification=ConsumerOffsetSpecification(OffsetType.LAST, None)
        )
        try:
            await asyncio.wait_for(arrived.wait(), wait)
        except TimeoutError:
            return None
        return max(last)
    finally:
        await consumer.close()


async def read_usage(
    url: str, stream: str, since: float, until: float | None = None, *, idle: float = 1.0
) -> list[UsageRecord]:
    """Every record that ended in [since, until), reading the stream up to its end as of now.

    Each call is its own consumer without a stored offset, so any number of readers can run at
    once, beside the workers that keep writing.
    """
    address = StreamAddress.parse(url)
    end = await _last_offset(address, stream, wait=idle)
    if end is None:
        return []
    records: list[UsageRecord] = []
    done = asyncio.Event()
    progress = [0]

    def on_message(data: bytes, context: MessageContext) -> None:
        progress[0] += 1
        if context.offset > end:
            done.set()
            return
        record = decode_record(data)
        if record is not None and record.time >= since and (until is None or record.time < until):
            records.append(record)
        if context.offset == end:
            done.set()

    consumer = Consumer(address.host, connection_name="dispatcher-usage-reader", **address.connect_kwargs())  # type: ignore[arg-type]
    start_ms = max(0, int((since - _CLOCK_SLACK) * 1000))
    try:
        await consumer.subscribe(
            stream,
            on_message,
            offset_specification=ConsumerOffsetSpecification(OffsetType.TIMESTAMP, start_ms),
            initial_credit=32,
        )
        # Stop at the end offset; or once nothing arrives for `idle` seconds (the reader started
        # past the end: nothing was written since `since`).
        while not done.is_set():
            seen = progress[0]
            try:
                await asyncio.wait_for(done.wait(), idle)
            except TimeoutError:
                if progress[0] == seen:
                    break
    finally:
        await consumer.close()
    return records


# -- totals -----------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _preference(record: UsageRecord) -> tuple[bool, bool, int]:
    """Which of two records of one request counts: an answered one, with reported counts, the most tokens."""
    return (record.outcome == "ok", not record.estimated, record.prompt_tokens + record.completion_tokens)


def unique(records: Iterable[UsageRecord]) -> list[UsageRecord]:
    """One record per request id, in stream order (the first of equals wins)."""
    kept: dict[str, UsageRecord] = {}
    for record in records:
        seen = kept.get(record.request_id)
        if seen is None or _preference(record) > _preference(seen):
            kept[record.request_id] = record
    return list(kept.values())


@dataclass
class UsageTotals:
    token: str
    model: str
    requests: int = 0
    ok: int = 0
    errors: int = 0
    cancelled: int = 0
    rejected: int = 0
    estimated: int = 0  # requests whose counts were estimated from the chunks
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttfts: list[float] = field(default_factory=list, repr=False)

    def add(self, record: UsageRecord) -> None:
        self.requests += 1
        if record.outcome == "ok":
            self.ok += 1
        elif record.outcome == "cancelled":
            self.cancelled += 1
        elif record.outcome == "rejected":
            self.rejected += 1
        else:
            self.errors += 1
        self.estimated += record.estimated
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        if record.ttft is not None:
            self.ttfts.append(record.ttft)

    def row(self) -> dict[str, object]:
        p50, p95 = percentile(self.ttfts, 0.5), percentile(self.ttfts, 0.95)
        return {
            "token": self.token,
            "model": self.model,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "rejected": self.rejected,
            "estimated": self.estimated,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_p50": None if p50 is None else round(p50, 4),
            "ttft_p95": None if p95 is None else round(p95, 4),
        }


def summarize(records: Iterable[UsageRecord]) -> list[dict[str, object]]:
    """One row per (token, model), sorted by token then model; each request counted once."""
    totals: dict[tuple[str, str], UsageTotals] = {}
    for record in unique(records):
        key = (record.token, record.model)
        if key not in totals:
            totals[key] = UsageTotals(*key)
        totals[key].add(record)
    return [totals[key].row() for key in sorted(totals)]


COLUMNS = (
    "token", "model", "requests", "ok", "errors", "cancelled", "rejected", "estimated",
    "prompt_tokens", "completion_tokens", "ttft_p50", "ttft_p95",
)  # fmt: skip


def render_table(rows: list[dict[str, object]]) -> str:
    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    headers = [c.upper() for c in COLUMNS]
    body = [[cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = []
    for line in [headers, *body]:
        # Names left-aligned, numbers right-aligned.
        lines.append(
            "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True)))
        )
    return "\n".join(lines)


def render_csv(rows: list[dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()

"""Ledger records for requests the gateway refused before they were queued (429 from a rate limit or a
full queue, 400 on bad input…): zero tokens and the outcome, so a tenant's bill lists them too.

Only requests of an authenticated token are recorded (a refused 401 has no tenant to bill). The
ledger (``dispatcher/ledger.py``, with its write-ahead log) starts with the first refusal, so a
gateway that refuses nothing never connects to the stream; nothing here waits for the stream.
"""

from __future__ import annotations

import logging
import time

from llmdispatch.gateway.accounting import RequestRecord
from llmdispatch.ledger import Ledger, wal_setting
from llmdispatch.settings import GatewaySettings
from llmdispatch.usage import UsageRecord

log = logging.getLogger("dispatcher.gateway.ledger")

_ledger: Ledger | None = None
_configured = False  # settings read (once: a storm of 429s must not re-read the environment each time)


def _open() -> Ledger | None:
    global _ledger, _configured
    if not _configured:
        _configured = True
        settings = GatewaySettings()
        if not settings.usage_stream_url:
            return None
        _ledger = Ledger(
            settings.usage_stream_url,
            settings.usage_stream_name,
            max_age=settings.usage_max_age,
            max_bytes=settings.usage_max_bytes,
            wal=wal_setting(settings.usage_wal),
            max_pending_bytes=settings.usage_wal_max_bytes,
            connection_name="dispatcher-gateway-usage",
        )
        _ledger.start_soon()
    return _ledger


def record_refusal(record: RequestRecord | None, status: int, outcome: str = "rejected") -> None:
    """Append a zero-token record for a refused request (no-op without a usage stream or a token)."""
    if record is None or not record.token:
        return
    try:
        ledger = _open()
        if ledger is None:
            return
        usage = UsageRecord(
            request_id=record.request_id,
            token=record.token,
            model=record.model or record.requested_model,
            priority=record.priority or 0,
            endpoint=record.endpoint,
            stream=record.stream,
            outcome=outcome,
            status=status,
            duration=round(time.monotonic() - record.started_at, 6),
            worker="gateway",
            time=time.time(),
        )
        ledger.record(usage)  # in the log at once; sent in the background
    except Exception:  # accounting must never turn a clean refusal into a 500
        log.exception("could not record a refused request in the usage ledger")


async def close_ledger(timeout: float = 5.0) -> None:
    """At shutdown: send what is pending (what is not stays in the log for the next gateway)."""
    global _ledger, _configured
    ledger, _ledger, _configured = _ledger, None, False
    if ledger is not None:
        await ledger.close(timeout)

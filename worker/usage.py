"""The worker's usage ledger: the shared durable producer (``dispatcher/ledger.py``) with the worker's settings.

A request's record is committed before its END frame goes out and before its message is acked
(``WorkerAccounting.finish_durably``): once the client has its answer, the record is on the stream
or, if the stream did not confirm within ``DISPATCHER_USAGE_COMMIT_TIMEOUT``, in the local
write-ahead log, sent from there when the stream is back (also after a crash and restart).
"""

from __future__ import annotations

from dispatcher.ledger import Ledger, wal_setting
from dispatcher.settings import CommonSettings


class UsageLedger(Ledger):
    def __init__(
        self,
        url: str,
        stream: str,
        *,
        max_age: str,
        max_bytes: int,
        settings: CommonSettings | None = None,
        **options: object,
    ) -> None:
        """Write-ahead log, its bound and the commit timeout come from ``settings`` (the environment
        when not given) unless passed in ``options``."""
        settings = settings or CommonSettings()
        options.setdefault("wal", wal_setting(settings.usage_wal))
        options.setdefault("max_pending_bytes", settings.usage_wal_max_bytes)
        options.setdefault("commit_timeout", settings.usage_commit_timeout)
        options.setdefault("connection_name", "dispatcher-worker-usage")
        super().__init__(url, stream, max_age=max_age, max_bytes=max_bytes, **options)  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> UsageLedger | None:
        """The ledger these settings ask for (None: no usage stream configured)."""
        if not settings.usage_stream_url:
            return None
        return cls(
            settings.usage_stream_url,
            settings.usage_stream_name,
            max_age=settings.usage_max_age,
            max_bytes=settings.usage_max_bytes,
            settings=settings,
        )

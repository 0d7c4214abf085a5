"""The worker's usage ledger: the shared durable producer (``dispatcher/ledger.py``) with the worker's settings.

A request's record is committed before its END frame goes out and before its message is acked
(``WorkerAccounting.finish_durably``): once the client has its answer, the record is on the stream
or, if the stream did not confirm within ``DISPATCHER_USAGE_COMMIT_TIMEOUT``, in the local
write-ahead log, sent from there when the stream is back (also after a crash and restart).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from llmdispatch.ledger import Ledger, wal_setting
from llmdispatch.settings import CommonSettings

if TYPE_CHECKING:
    from llmdispatch.worker.backends import Backend

# Seconds the end of a request cut short may spend asking the server to count its prompt.
PROMPT_COUNT_TIMEOUT = 2.0
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers, for estimates


async def prompt_tokens(backend: Backend, endpoint: str, body: dict[str, Any] | None) -> int:
    """The prompt tokens of a request cut short without the server's usage (it was prefilled all the
    same): the server's own count where its adapter knows how to ask (``Backend.count_prompt``,
    bounded by ``PROMPT_COUNT_TIMEOUT``), else an estimate (the record is marked estimated either way,
    its completion tokens being counted from the chunks). Only ever called for such requests."""
    if body is None:
        return 0
    count = await backend.count_prompt(endpoint, body, PROMPT_COUNT_TIMEOUT)
    return estimate_prompt_tokens(body) if count is None else count


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """About as many tokens as the prompt's text has characters / 4 (at least 1)."""
    return max(1, math.ceil(_text_length(body.get("messages", body.get("prompt"))) / CHARS_PER_TOKEN))


def _text_length(value: Any) -> int:
    """Characters of text in a prompt, a message list or content parts (images etc. are not counted)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    if isinstance(value, dict):
        return _text_length(value.get("content")) + _text_length(value.get("text"))
    return 0


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

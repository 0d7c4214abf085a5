"""What the gateway records about each request when it ends: Prometheus metrics and one log line.

The log line carries the request id the client got in ``x-request-id`` and the token's *name*;
the secret never reaches it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from llmdispatch.gateway.relay import Outcome, Relay
from llmdispatch.metrics import gateway_metrics, lane_of

log = logging.getLogger("dispatcher.gateway.requests")


def outcome_name(outcome: Outcome) -> str:
    """ok | error | cancelled, from how the exchange ended."""
    if outcome.completed:
        return "ok" if 200 <= outcome.status < 300 else "error"
    # Not completed: the client left (status 0, or 200 once a stream was committed), or the
    # gateway gave up on it (queue timeout, lost worker: an error status).
    return "error" if outcome.status >= 400 else "cancelled"


# The gateway's own errors (gateway/relay.py) as stream end reasons.
_CODE_REASONS = {"queue_timeout": "queue_timeout", "worker_lost": "idle"}


def end_reason(exchange: Relay, name: str) -> str:
    """Why a stream ended: one of ``dispatcher.metrics.STREAM_END_REASONS``."""
    if name == "ok":
        return "completed"
    if name == "cancelled":
        return "client_left"
    outcome = exchange.outcome
    return _CODE_REASONS.get(outcome.error_code) or exchange.inbox.end_reason or "upstream_error"


@dataclass
class RequestRecord:
    request_id: str
    endpoint: str
    started_at: float = field(default_factory=time.monotonic)
    model: str = ""  # set once the model is known to be served (bounded label values)
    requested_model: str = ""  # the name the client asked for, cut to 64 characters (log line only)
    token: str = ""  # the token's name, once authenticated
    priority: int | None = None
    stream: bool = False
    queued: bool = False  # published: counted in flight until it ends
    ended: bool = False

    def published(self) -> None:
        self.queued = True
        gateway_metrics().in_flight.labels(self.model).inc()

    def rejected(self, status: int, outcome: str = "rejected") -> None:
        """Refused before it reached the queue (auth, validation, unknown model, full queue, limits)."""
        self._emit(outcome, status, Outcome(status=status))

    def finished(self, exchange: Relay) -> None:
        """Called once by ``Relay.close``."""
        outcome = exchange.outcome
        name = outcome_name(outcome)
        status = outcome.status or (499 if name == "cancelled" else 0)
        if self.queued:
            metrics = gateway_metrics()
            if self.stream:
                metrics.streams_ended.labels(self.model, end_reason(exchange, name)).inc()
            if name == "cancelled":
                stage = "queued" if exchange.inbox.accepted_at is None else "running"
                metrics.cancels.labels(self.model, stage).inc()
        self._emit(name, status, outcome)

    def _emit(self, name: str, status: int, outcome: Outcome) -> None:
        self.ended = True
        now = time.monotonic()
        duration = now - self.started_at
        ttft = None if outcome.first_byte_at is None else outcome.first_byte_at - self.started_at
        metrics = gateway_metrics()
        metrics.requests.labels(self.model, self.token, name).inc()
        if self.queued:
            self.queued = False
            metrics.in_flight.labels(self.model).dec()
            priority = str(self.priority)
            metrics.duration.labels(self.model, name).observe(duration)
            if outcome.queue_wait is not None:
                metrics.queue_wait.labels(self.model, lane_of(self.priority), priority).observe(outcome.queue_wait)
            if ttft is not None:
                metrics.time_to_first_token.labels(self.model, priority).observe(ttft)
            if outcome.prompt_tokens:
                metrics.prompt_tokens.labels(self.model, self.token).inc(outcome.prompt_tokens)
            if outcome.completion_tokens:
                metrics.completion_tokens.labels(self.model, self.token).inc(outcome.completion_tokens)
        log.info(
            "request",
            extra={
                "request_id": self.request_id,
                "endpoint": self.endpoint,
                "model": self.requested_model or self.model,
                "token": self.token,
                "priority": self.priority,
                "stream": self.stream,
                "status": status,
                "outcome": name,
                "queue_wait_s": _round(outcome.queue_wait),
                "ttft_s": _round(ttft),
                "duration_s": _round(duration),
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
            },
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)

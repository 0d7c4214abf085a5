"""What gateway and worker say to each other over RabbitMQ: names, headers and reply frames.

A request travels as one AMQP message whose body is the client's JSON, unchanged. Replies travel
back on direct reply-to as *batches* of frames (one AMQP message carries many frames), because one
message per token tops out near 2,000 messages/s on a small machine.
"""

from __future__ import annotations

import enum

import msgspec

QUEUE_PREFIX = "dispatcher.model."
# Fanout exchange for small control messages: cancellations, worker announcements, discovery.
CONTROL_EXCHANGE = "dispatcher.control"
REPLY_TO = "amq.rabbitmq.reply-to"

# RabbitMQ priorities: classic queues with x-max-priority; keep it <= 10 (higher costs broker CPU).
MAX_PRIORITY = 10

# AMQP headers on a request message.
H_ENDPOINT = "x-endpoint"  # "chat/completions" | "completions" | "embeddings"
H_TOKEN = "x-token-name"
H_PRIORITY = "x-priority"  # the effective token priority (0..MAX_PRIORITY, higher = first)
H_DEADLINE = "x-deadline"  # unix time (integer ms) after which the request must not be served
H_TRACEPARENT = "traceparent"
H_ENQUEUED_AT = "x-enqueued-at"  # unix time (integer ms) the gateway published it: queue wait, TTFT

ENDPOINTS = ("chat/completions", "completions", "embeddings")


def unix_ms(seconds: float) -> int:
    """Times travel as integer milliseconds: pamqp encodes a Python float as a 32-bit float, which
    rounds a unix time by up to a minute."""
    return round(seconds * 1000)


def queue_name(model: str, *, express: bool = False) -> str:
    """A model's queue; the express one carries priorities at or above the express threshold."""
    return QUEUE_PREFIX + model + (".express" if express else "")


def queue_arguments(max_length: int) -> dict[str, int | str]:
    """Arguments of a model queue. Everyone declaring it must pass exactly these."""
    return {"x-max-priority": MAX_PRIORITY, "x-max-length": max_length, "x-overflow": "reject-publish"}


def clamp_priority(priority: int) -> int:
    return max(0, min(MAX_PRIORITY, priority))


def vllm_priority(priority: int) -> int:
    """Our priority is "higher = answered first"; vLLM's is "lower = scheduled first"."""
    return MAX_PRIORITY - clamp_priority(priority)


class Kind(enum.IntEnum):
    ACCEPTED = 0  # a worker took the request off the queue
    HEAD = 1  # vLLM answered: status code (and content type in data)
    DATA = 2  # body bytes: one whole SSE event ("data: ...\n\n") or a chunk of a JSON body
    END = 3  # finished; usage filled in
    ERROR = 4  # failed; status and an OpenAI-style error body in data
    HEARTBEAT = 5  # the worker is alive while vLLM is silent


class Frame(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    kind: Kind
    data: bytes = b""
    status: int = 0
    worker: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ControlMessage(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class Cancel(ControlMessage, tag="cancel"):
    request_id: str
    worker: str = ""  # only this worker should drop it ("" = whoever has it)


class Announce(ControlMessage, tag="announce"):
    """A worker saying it is alive, which model it serves and how much room it has."""

    worker: str
    model: str
    free_slots: int
    max_concurrency: int
    ready: bool


class Discover(ControlMessage, tag="discover"):
    """A gateway asking every worker to announce itself now (on gateway start)."""


frames_encoder = msgspec.msgpack.Encoder()
frames_decoder = msgspec.msgpack.Decoder(list[Frame])
control_encoder = msgspec.json.Encoder()
control_decoder = msgspec.json.Decoder(Cancel | Announce | Discover)

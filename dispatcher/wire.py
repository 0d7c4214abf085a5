"""What gateway and worker say to each other over RabbitMQ: names, headers and reply frames.

A request travels as one AMQP message whose body is the client's JSON, unchanged. Replies travel
back on direct reply-to as *batches* of frames (one AMQP message carries many frames), because one
message per token tops out near 2,000 messages/s on a small machine.
"""

from __future__ import annotations

import enum
import re

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
H_TIMEOUT = "x-timeout-ms"  # how long (ms) after publishing the request may still be served
H_TRACEPARENT = "traceparent"
# The gateway's wall clock (unix ms) when it published. Workers never compare it with their own
# clock: they translate it with the offset measured from that gateway's heartbeats.
H_ENQUEUED_AT = "x-enqueued-at"
H_GATEWAY = "x-gateway"  # the publishing gateway's incarnation: replies die with it

ENDPOINTS = ("chat/completions", "completions", "embeddings")


def unix_ms(seconds: float) -> int:
    """Times travel as integer milliseconds: pamqp encodes a Python float as a 32-bit float, which
    rounds a unix time by up to a minute."""
    return round(seconds * 1000)


# -- model names and their queues: the only place a client's string turns into a broker name ---------

# AMQP names are at most 255 bytes: the prefix, a model name and the express suffix must fit.
MAX_MODEL_NAME = 200
EXPRESS_SUFFIX = ".express"
# What real model names use (Hugging Face "org/name-7B", Ollama "name:tag", "name@revision", LoRA names).
_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/@+-]+")


class InvalidModelName(ValueError):
    """A string that can be no model's name. ``reserved``: a well-formed name we never give a model."""

    def __init__(self, message: str, *, reserved: bool = False) -> None:
        super().__init__(message)
        self.reserved = reserved


def check_model_name(model: str) -> str:
    """``model`` if a model may have that name, else InvalidModelName (its message is for the client).

    A name ending in the express suffix is refused, so that no model's normal queue is another's
    express queue (the mapping below is one-to-one).
    """
    if len(model) > MAX_MODEL_NAME:
        raise InvalidModelName(f"Invalid 'model': at most {MAX_MODEL_NAME} characters, got {len(model)}.")
    if not _MODEL_NAME.fullmatch(model):
        raise InvalidModelName(
            "Invalid 'model': a model name is made of letters, digits and the characters . _ - : / @ +"
        )
    if model.endswith(EXPRESS_SUFFIX):
        raise InvalidModelName(f"The model `{model}` does not exist.", reserved=True)
    return model


def is_express(priority: int, express_priority: int) -> bool:
    """Whether requests of this token priority use the express lane: decided by the priority alone."""
    return priority >= express_priority


def queue_name(model: str, *, express: bool = False) -> str:
    """A model's queue; the express one carries priorities at or above the express threshold."""
    return QUEUE_PREFIX + check_model_name(model) + (EXPRESS_SUFFIX if express else "")


def request_queue(model: str, priority: int, express_priority: int) -> str:
    """The queue a request of this priority for this model goes to (the lane never comes from the client)."""
    return queue_name(model, express=is_express(priority, express_priority))


QUEUE_TYPES = ("classic", "quorum")
# Quorum queues (RabbitMQ 4.0+) know two priority classes: a message priority above 4 is "high".
QUORUM_HIGH = 5


def queue_arguments(max_length: int, queue_type: str = "classic") -> dict[str, int | str]:
    """Arguments of a model queue. Everyone declaring it must pass exactly these.

    Nothing RabbitMQ 4.3 denies: no ``x-queue-mode``/``x-queue-version``/``x-queue-master-locator``.
    """
    # max_length 0: the length is left to a RabbitMQ policy (which can then raise it as well as lower it).
    length: dict[str, int | str] = {"x-max-length": max_length, "x-overflow": "reject-publish"} if max_length else {}
    if queue_type == "quorum":
        return {"x-queue-type": "quorum", **length}
    if queue_type != "classic":
        raise ValueError(f"unknown queue type {queue_type!r} (classic or quorum)")
    return {"x-max-priority": MAX_PRIORITY, **length}


def message_priority(priority: int, queue_type: str = "classic") -> int:
    """The AMQP priority of a request: 0..10 on classic queues, normal/high on quorum queues."""
    if queue_type == "quorum":
        return QUORUM_HIGH if clamp_priority(priority) >= QUORUM_HIGH else 0
    return clamp_priority(priority)


def clamp_priority(priority: int) -> int:
    return max(0, min(MAX_PRIORITY, priority))


def vllm_priority(priority: int) -> int:
    """Our priority is "higher = answered first"; vLLM's is "lower = scheduled first"."""
    return MAX_PRIORITY - clamp_priority(priority)


# ACCEPTED's data when the attempt is a redelivery: it waits for the gateway's ``Proceed`` (or
# ``Cancel``) before calling the server, so that no GPU works for an answer already cut short.
# Older gateways ignore ACCEPTED's data.
ASK_PROCEED = b"proceed?"


class Kind(enum.IntEnum):
    ACCEPTED = 0  # a worker took the request off the queue: the first frame of a delivery attempt
    HEAD = 1  # vLLM answered: status code (and content type in data)
    DATA = 2  # body bytes: one whole SSE event ("data: ...\n\n") or a chunk of a JSON body
    END = 3  # finished; usage filled in; every frame of the attempt before it has been sent
    ERROR = 4  # failed; status and an OpenAI-style error body in data
    HEARTBEAT = 5  # the worker is alive while vLLM is silent
    REQUEUED = 6  # the attempt gave the request back to the queue before any output (vLLM failed)
    # What the usage ledger billed an attempt that ended without END (the client left, an error after
    # output): its last frame, sent once the record is committed, so that TPM limits charge the same.
    BILLED = 7


class Frame(msgspec.Struct, array_like=True, omit_defaults=True):
    """One step of one delivery attempt. ``attempt`` names the delivery (a worker may get the same
    request twice: after a reconnect it is a new attempt); ``seq`` numbers its frames from 0."""

    request_id: str
    kind: Kind
    data: bytes = b""
    status: int = 0
    attempt: str = ""
    seq: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ControlMessage(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class Cancel(ControlMessage, tag="cancel"):
    request_id: str
    attempt: str = ""  # only this delivery attempt should stop ("" = whoever has the request)


class Proceed(ControlMessage, tag="proceed"):
    """The gateway's go-ahead to a redelivered attempt that asked for it (ACCEPTED with ``ASK_PROCEED``):
    nothing of the answer reached the client yet, so this attempt may serve it."""

    request_id: str
    attempt: str


class Announce(ControlMessage, tag="announce"):
    """A worker saying it is alive, which model it serves and whether it takes requests."""

    worker: str
    model: str
    ready: bool


class GatewayAlive(ControlMessage, tag="alive"):
    """A gateway incarnation's heartbeat: workers abort the work of one that goes quiet. ``now`` is
    its wall clock (unix ms), from which workers learn its offset to their own."""

    gateway: str
    now: int


class GatewayGone(ControlMessage, tag="gone"):
    """A gateway incarnation that can no longer receive replies (its connection was lost)."""

    gateway: str


class Discover(ControlMessage, tag="discover"):
    """A gateway asking every worker to announce itself now (on gateway start)."""


frames_encoder = msgspec.msgpack.Encoder()
frames_decoder = msgspec.msgpack.Decoder(list[Frame])
control_encoder = msgspec.json.Encoder()
control_decoder = msgspec.json.Decoder(Cancel | Proceed | Announce | Discover | GatewayAlive | GatewayGone)

"""Just enough of an OpenAI request to route it; the body itself is forwarded unchanged.

The gateway checks the types of the fields that it or the worker reads (``model``, ``stream``,
``stream_options``, ``max_tokens``/``max_completion_tokens``, the prompt field) and answers 400 in
OpenAI's shape when one is wrong; every other field goes to vLLM unchanged, for vLLM to judge.
"""

from __future__ import annotations

import re

import msgspec

from llmdispatch.errors import APIError
from llmdispatch.wire import InvalidModelName, check_model_name

# Fields each endpoint cannot do without (OpenAI answers 400 when one is missing).
REQUIRED = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}


class StreamOptions(msgspec.Struct):
    """The options the worker reads; other keys pass through unchecked."""

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class RequestHead(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None  # choices: each one a sequence of the server's batch
    best_of: int | None = None  # completions: sequences generated, of which n are returned
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()


_decoder = msgspec.json.Decoder(RequestHead)

# msgspec: "Expected `int | null`, got `str` - at `$.max_tokens`"
_MSGSPEC_ERROR = re.compile(r"Expected `(?P<expected>[^`]+)`, got `(?P<got>[^`]+)`(?: - at `\$\.(?P<path>[^`]+)`)?")
_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a decimal number",
    "bool": "a boolean",
    "null": "null",
    "array": "an array",
    "object": "an object",
}


def parse_head(endpoint: str, body: bytes, *, max_sequences: int = 0) -> RequestHead:
    """The fields the gateway routes by, checked; ``max_sequences``: the cap of n and best_of (0: none)."""
    if not body.strip():
        raise APIError(400, "The request body is empty; expected a JSON object.")
    try:
        head = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _type_error(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}") from None
    except UnicodeDecodeError:  # msgspec lets invalid UTF-8 inside strings through as this
        raise APIError(400, "The JSON body of your request is not valid UTF-8.") from None
    except RecursionError:
        raise APIError(400, "The JSON body of your request is nested too deeply.") from None
    if not head.model:
        raise APIError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    _check_sequences(head, max_sequences)
    required = REQUIRED[endpoint]
    raw = getattr(head, required)
    if not len(raw) or bytes(raw) == b"null":
        raise APIError(
            400, f"Missing required parameter: '{required}'.", param=required, code="missing_required_parameter"
        )
    if endpoint == "chat/completions" and not bytes(raw).startswith(b"["):
        raise APIError(400, "Invalid type for 'messages': expected an array.", param="messages", code="invalid_type")
    return head


def check_model(model: str) -> str:
    """The model asked for, if a model may have that name (``dispatcher.wire`` decides): 400, or 404
    for a well-formed name no model is given (the express suffix)."""
    try:
        return check_model_name(model)
    except InvalidModelName as exc:
        if exc.reserved:
            raise APIError(404, str(exc), param="model", code="model_not_found") from None
        raise APIError(400, str(exc), param="model", code="invalid_value") from None


def _check_sequences(head: RequestHead, cap: int) -> None:
    """One request runs n (or best_of) sequences in the server's batch, in one of the worker's slots:
    beyond the cap it would crowd out other tenants' requests without waiting for slots."""
    if not cap:
        return
    for name in ("n", "best_of"):
        value = getattr(head, name)
        if value is not None and value > cap:
            raise APIError(
                400,
                f"Invalid '{name}': at most {cap} sequences per request on this service, got {value}.",
                param=name,
                code="invalid_value",
            )


def _type_error(message: str) -> APIError:
    """An OpenAI-style 400 from msgspec's message, naming the field (``param``) when there is one."""
    match = _MSGSPEC_ERROR.search(message)
    if match is None:
        return APIError(400, f"Invalid request: {message}", param=_param_of(message))
    path = match["path"]
    expected = " or ".join(_TYPE_NAMES.get(t, t) for t in match["expected"].split(" | ") if t != "null")
    got = _TYPE_NAMES.get(match["got"], match["got"])
    if path is None:  # the body itself
        return APIError(400, f"Invalid request body: expected {expected}, but got {got} instead.")
    return APIError(
        400,
        f"Invalid type for '{path}': expected {expected}, but got {got} instead.",
        param=path,
        code="invalid_type",
    )


def _param_of(message: str) -> str | None:
    # msgspec says "... - at `$.model`"
    marker = "at `$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0]
    return None

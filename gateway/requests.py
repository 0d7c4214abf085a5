"""Just enough of an OpenAI request to route it; the body itself is forwarded unchanged."""

from __future__ import annotations

import msgspec

from dispatcher.errors import APIError

# Fields each endpoint cannot do without (OpenAI answers 400 when one is missing).
REQUIRED = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}


class RequestHead(msgspec.Struct):
    model: str | None = None
    stream: bool | None = None
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()


_decoder = msgspec.json.Decoder(RequestHead)


def parse_head(endpoint: str, body: bytes) -> RequestHead:
    if not body.strip():
        raise APIError(400, "The request body is empty; expected a JSON object.")
    try:
        head = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        param = _param_of(str(exc))
        raise APIError(400, f"Invalid request: {exc}", param=param) from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}") from None
    except UnicodeDecodeError:  # msgspec lets invalid UTF-8 inside strings through as this
        raise APIError(400, "The JSON body of your request is not valid UTF-8.") from None
    except RecursionError:
        raise APIError(400, "The JSON body of your request is nested too deeply.") from None
    if not head.model:
        raise APIError(400, "you must provide a model parameter", param="model", code="missing_required_parameter")
    required = REQUIRED[endpoint]
    raw = getattr(head, required)
    if not len(raw) or bytes(raw) == b"null":
        raise APIError(
            400, f"Missing required parameter: '{required}'.", param=required, code="missing_required_parameter"
        )
    if endpoint == "chat/completions" and not bytes(raw).startswith(b"["):
        raise APIError(400, "'messages' must be an array.", param="messages", code="invalid_type")
    return head


def _param_of(message: str) -> str | None:
    # msgspec says "... - at `$.model`"
    marker = "at `$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0]
    return None

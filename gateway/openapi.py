"""The request bodies of the OpenAI routes, for the OpenAPI schema only.

The handlers take the raw request and forward the client's bytes unchanged, so Litestar cannot infer
a body schema; these declare the fields the gateway itself reads (and a few common ones) so that
clients and fuzzers (schemathesis) see what a valid request looks like. Extra fields stay allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema

_STRING = Schema(type=OpenAPIType.STRING)
_STRINGS = Schema(type=OpenAPIType.ARRAY, items=_STRING)

# The fields the gateway checks itself (gateway/requests.py): a wrong type is a 400 naming the field.
_STREAM_OPTIONS = Schema(
    type=[OpenAPIType.OBJECT, OpenAPIType.NULL],
    properties={
        "include_usage": Schema(type=[OpenAPIType.BOOLEAN, OpenAPIType.NULL]),
        "continuous_usage_stats": Schema(type=[OpenAPIType.BOOLEAN, OpenAPIType.NULL]),
    },
)

_COMMON: dict[str, Schema] = {
    "model": Schema(type=OpenAPIType.STRING, description="A model served by a live worker (see /v1/models)."),
    "stream": Schema(type=[OpenAPIType.BOOLEAN, OpenAPIType.NULL]),
    "stream_options": _STREAM_OPTIONS,
    "max_tokens": Schema(type=[OpenAPIType.INTEGER, OpenAPIType.NULL], minimum=1),
    "temperature": Schema(type=OpenAPIType.NUMBER, minimum=0, maximum=2),
    "user": _STRING,
}

_MESSAGE = Schema(
    type=OpenAPIType.OBJECT,
    required=["role", "content"],
    properties={
        "role": Schema(type=OpenAPIType.STRING, enum=["system", "user", "assistant"]),
        "content": _STRING,
    },
)

BODIES: dict[str, Schema] = {
    "chat/completions": Schema(
        type=OpenAPIType.OBJECT,
        required=["model", "messages"],
        properties={
            **_COMMON,
            "messages": Schema(type=OpenAPIType.ARRAY, items=_MESSAGE, min_items=1),
            "max_completion_tokens": Schema(type=[OpenAPIType.INTEGER, OpenAPIType.NULL], minimum=1),
        },
    ),
    "completions": Schema(
        type=OpenAPIType.OBJECT,
        required=["model", "prompt"],
        properties={**_COMMON, "prompt": Schema(one_of=[_STRING, _STRINGS])},
    ),
    "embeddings": Schema(
        type=OpenAPIType.OBJECT,
        required=["model", "input"],
        properties={"model": _COMMON["model"], "input": Schema(one_of=[_STRING, _STRINGS]), "user": _STRING},
    ),
}


def operation_with_body(endpoint: str) -> type[Operation]:
    """An ``operation_class`` for a route decorator: the operation, with ``endpoint``'s JSON body."""
    body = RequestBody(content={"application/json": OpenAPIMediaType(schema=BODIES[endpoint])}, required=True)

    @dataclass
    class WithBody(Operation):
        def __post_init__(self, *args: Any) -> None:
            if self.request_body is None:
                self.request_body = body

    WithBody.__name__ = WithBody.__qualname__ = "Operation"
    return WithBody

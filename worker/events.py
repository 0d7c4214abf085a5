"""What one server-sent event of an OpenAI-compatible stream says, by parsing it (never by grepping bytes).

Servers differ in how they write JSON: vLLM and llama.cpp write it compact (``"usage":{``), many Python
servers use ``json.dumps``' default separators (``"usage": {``), and key order varies. A byte search for
``"usage":{`` misses the latter, so the usage chunk is forwarded to clients that did not ask for it and
the ledger records 0 tokens. Here each event is decoded with msgspec into Structs that declare only the
fields we read (everything else is skipped unparsed). The caller always forwards the original bytes.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Usage(msgspec.Struct):
    """Token counts the server reported (the fields the ledger and the TPM limits use)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class EventInfo(msgspec.Struct, frozen=True):
    """The facts the worker needs about one SSE event.

    - ``usage``: the event's usage object (None: none, or not JSON);
    - ``usage_only``: a usage chunk without choices (``include_usage``'s last chunk): drop it for a client
      that did not ask for usage;
    - ``finish_reasons``: the non-null ``finish_reason`` of each choice, in order;
    - ``tokens``: some choice carries output (text, content, reasoning or tool calls), unlike a role-only
      first chunk, a usage chunk or ``[DONE]``;
    - ``is_done``: the ``data: [DONE]`` sentinel;
    - ``parsed``: the data was a JSON object (False for comments, ``[DONE]`` and anything unparsable).
    """

    usage: Usage | None = None
    usage_only: bool = False
    finish_reasons: tuple[str, ...] = ()
    tokens: bool = False
    is_done: bool = False
    parsed: bool = False


class _Usage(msgspec.Struct):
    # Some servers write null for a count they do not know: accept it, count it as 0.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct):
    finish_reason: str | None = None
    text: str | None = None  # /v1/completions
    delta: _Delta | None = None  # chat chunks


class _Chunk(msgspec.Struct):
    # None = the key is absent, [] = present and empty: only the latter makes a chunk "usage only" by itself.
    choices: list[_Choice] | None = None
    usage: _Usage | None = None


class _Body(msgspec.Struct):
    usage: _Usage | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_body_decoder = msgspec.json.Decoder(_Body)

NOT_JSON = EventInfo()
DONE = EventInfo(is_done=True)


def _data(event: bytes) -> bytes | None:
    """The data field of one SSE event (its ``data:`` lines joined by newlines), or None if it has none."""
    if event.startswith(b"data: "):
        end = event.find(b"\n")
        if end < 0 or end >= len(event) - 2:
            return event[6:]  # the usual shape, one data line (msgspec ignores the trailing blank line)
    lines: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines) if lines else None


def _usage(raw: _Usage | None) -> Usage | None:
    if raw is None:
        return None
    return Usage(raw.prompt_tokens or 0, raw.completion_tokens or 0)


def inspect(event: bytes) -> EventInfo:
    """Parse one whole SSE event (``data: {...}\\n\\n``, or several ``data:`` lines, or ``data: [DONE]``)."""
    data = _data(event)
    if data is None:
        return NOT_JSON
    if data.strip() == b"[DONE]":
        return DONE
    try:
        chunk = _chunk_decoder.decode(data)
    except msgspec.DecodeError:  # ValidationError included: not an object of the expected shape
        return NOT_JSON
    choices = chunk.choices
    usage = _usage(chunk.usage)
    finish: tuple[str, ...] = ()
    tokens = False
    if choices:
        # A list, not a generator: this runs per token, and a generator costs more than one choice.
        finish = tuple([c.finish_reason for c in choices if c.finish_reason is not None])
        for c in choices:
            d = c.delta
            if c.text or (d is not None and (d.content or d.reasoning_content or d.reasoning or d.tool_calls)):
                tokens = True
                break
    return EventInfo(
        usage=usage,
        usage_only=usage is not None and not choices,
        finish_reasons=finish,
        tokens=tokens,
        parsed=True,
    )


def body_usage(body: bytes) -> Usage | None:
    """The usage object of a whole (non-streamed) JSON response, if it has one."""
    try:
        return _usage(_body_decoder.decode(body).usage)
    except msgspec.DecodeError:
        return None

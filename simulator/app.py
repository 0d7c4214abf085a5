"""OpenAI-compatible vLLM stand-in (Starlette + sse-starlette) over the simulated batching engine.

Endpoints: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``; ``GET /v1/models``,
``/health``, ``/metrics``, ``/version``. Streams are byte-identical in shape to vLLM's
(``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``); closing the connection aborts the request.

Test hooks:
- a body ``"user": "simulate-error-400"`` answers 400 (BadRequestError), ``"simulate-error-500"``
  answers 500 (InternalServerError), before anything is queued;
- ``GET /sim/stats``: ``started``/``finished``/``aborted``/``running``/``waiting``/``generated_tokens``/
  ``steps``/``admitting_steps`` (steps that admitted a sequence, paying the prefill time)
  and ``log`` (last 10,000 ``queued``/``started``/``first_output`` (streams: the first token's chunk
  handed to the HTTP layer)/``finished``/``aborted`` events, each with the request id, user, priority,
  received ``traceparent`` and ``time.monotonic()``); ``POST /sim/reset``
  clears the counters and the log;
- an ``X-Request-Id`` header names the request in the log (and in the response ids, as vLLM does);
- ``json_style="spaced"`` (``dispatcher simulate --json-style spaced``) writes JSON the way servers built on
  Python's ``json.dumps`` do (``"usage": {``) and with every object's keys in reverse order, so that the
  worker's event parsing is tested against another dialect than vLLM's compact one;
- ``line_ending="crlf"`` (``--line-ending crlf``) ends the SSE lines of streams with ``\r\n``, as some
  servers do (the SSE spec allows CRLF, LF and CR);
- embeddings take ``dimensions`` (1..``MAX_EMBEDDING_DIM``, default ``EMBEDDING_DIM``), as vLLM does for
  Matryoshka models, so tests can ask for answers of realistic size (2,048 inputs x 1,024 dimensions).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from sse_starlette.sse import AppStatus, EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from llmdispatch.simulator import metrics
from llmdispatch.simulator.engine import ABORTED, FINISHED, Engine, Sequence

VERSION = "0.10.1"  # the vLLM version whose wire format this mimics
EMBEDDING_DIM = 16
MAX_EMBEDDING_DIM = 4096

_VOCAB = [
    " " + w
    for w in (
        "hello world the a quick brown fox jumps over lazy dog and then it runs away to find some food "
        "in forest where birds sing all day long while sun shines bright on green leaves of old trees "
        "that grow near river bank with cold water flowing fast past stones fish swim under small bridge "
        "built by people from town long ago yes now"
    ).split()
]
assert len(_VOCAB) == 64  # a power of two: any odd stride walks the whole vocabulary
_VOCAB_JSON = [msgspec.json.encode(w) for w in _VOCAB]
_DONE = b"data: [DONE]\n\n"
_decoder = msgspec.json.Decoder()
_encode = msgspec.json.encode


class ApiError(Exception):
    """An OpenAI-shaped error answered with ``status``."""

    def __init__(
        self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.status,
            }
        }
        return JSONResponse(body, status_code=self.status)


def _count_words(value: Any) -> int:
    """Cheap deterministic token count: whitespace words of strings, one per int."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        return _count_words(value.get("text"))
    return 0


def _int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(f"{name}: Input should be a valid integer", param=name)
    if isinstance(value, float) and not value.is_integer():
        raise ApiError(f"{name}: Input should be a valid integer", param=name)
    return int(value)


class Simulator:
    """Request handling shared by the routes; owns the engine."""

    def __init__(
        self,
        model: str,
        engine: Engine,
        *,
        max_tokens_default: int,
        seed: int | None,
        priority_scheduling: bool,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.engine = engine
        self.max_tokens_default = max_tokens_default
        self.seed = seed
        self.priority_scheduling = priority_scheduling
        self.max_model_len = max_model_len
        self.created = int(time.time())
        self.spaced = False  # json_style="spaced" (see create_app)
        self.crlf = False  # line_ending="crlf"

    # --- request parsing -------------------------------------------------------------------------

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise ApiError(f"JSON decode error: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError("Input should be a valid dictionary or object")
        user = body.get("user")
        if user == "simulate-error-400":
            raise ApiError("Simulated bad request (user=simulate-error-400).")
        if user == "simulate-error-500":
            raise ApiError("Simulated internal error (user=simulate-error-500).", 500, "InternalServerError")
        model = body.get("model")
        if model is not None and model != self.model:
            raise ApiError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")
        return body

    def _sequence(
        self, request: Request, body: dict[str, Any], prompt: Any, prompt_tokens: int, *, chat: bool
    ) -> tuple[Sequence, dict[str, Any]]:
        """Validate the generation fields and build the engine sequence plus formatting options."""
        max_tokens = _int_field(body, "max_tokens", None)
        if chat:
            # vLLM: max_completion_tokens wins over the deprecated max_tokens.
            max_tokens = _int_field(body, "max_completion_tokens", None) or max_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens_default
        if max_tokens < 1:
            raise ApiError(f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ApiError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        priority = _int_field(body, "priority", 0)
        assert priority is not None
        if priority != 0 and not self.priority_scheduling:
            raise ApiError(f"Got priority {priority} but Priority scheduling is not enabled.", param="priority")
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise ApiError("stream: Input should be a valid boolean", param="stream")
        stream_options = body.get("stream_options")
        if stream_options is not None:
            if not isinstance(stream_options, dict):
                raise ApiError("stream_options: Input should be a valid dictionary", param="stream_options")
            if not stream:
                raise ApiError("Stream options can only be defined when `stream=True`.", param="stream_options")
        include_usage = bool(stream_options and stream_options.get("include_usage"))
        continuous = include_usage and bool(stream_options and stream_options.get("continuous_usage_stats"))
        seed = _int_field(body, "seed", self.seed)
        if seed is None:
            h = random.getrandbits(32)
        else:
            h = zlib.crc32(_encode(prompt), seed & 0xFFFFFFFF)
        user = body.get("user")
        rid = request.headers.get("x-request-id") or os.urandom(16).hex()
        seq = Sequence(
            rid,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            priority=priority,
            user=user if isinstance(user, str) else None,
            stream=bool(stream),
            traceparent=request.headers.get("traceparent"),
        )
        opts = {
            "stream": bool(stream),
            "include_usage": include_usage,
            "continuous": continuous,
            "start": h & 63,
            "stride": ((h >> 6) & 63) | 1,
        }
        return seq, opts

    # --- endpoints -------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError("messages: Field required (a non-empty list)", param="messages")
            if not all(isinstance(m, dict) for m in messages):
                raise ApiError("messages: each message must be an object", param="messages")
            prompt_tokens = max(1, sum(_count_words(m.get("content")) for m in messages))
            seq, opts = self._sequence(request, body, messages, prompt_tokens, chat=True)
        except ApiError as exc:
            return exc.response()
        return await self._generate(request, seq, opts, chat=True)

    async def completions(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            prompt = body.get("prompt")
            if prompt is None or prompt == "" or prompt == []:
                raise ApiError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
            if not isinstance(prompt, (str, list)):
                raise ApiError("prompt: Input should be a valid string or list", param="prompt")
            prompt_tokens = max(1, _count_words(prompt))
            seq, opts = self._sequence(request, body, prompt, prompt_tokens, chat=False)
        except ApiError as exc:
            return exc.response()
        return await self._generate(request, seq, opts, chat=False)

    async def _generate(self, request: Request, seq: Sequence, opts: dict[str, Any], *, chat: bool) -> Response:
        created = int(time.time())
        resp_id = ("chatcmpl-" if chat else "cmpl-") + seq.request_id
        if opts["stream"]:
            fmt = _StreamFormat(resp_id, created, self.model, seq, opts, chat=chat)
            # Chunks are yielded pre-framed as bytes (sse-starlette sends bytes verbatim): the same wire
            # format as sep="\n" JSON strings, without its per-event regex split and StringIO.
            events = _stream(self.engine, seq, fmt)
            if self.spaced:
                events = _respaced(events)
            if self.crlf:
                events = _crlf(events)
            return EventSourceResponse(events, sep="\n", ping=0)
        self.engine.add(seq)
        watcher = asyncio.create_task(_abort_on_disconnect(request.receive, self.engine, seq))
        try:
            await seq.finished()
        finally:
            watcher.cancel()
            if not seq.done:
                self.engine.abort(seq)
        if seq.state == ABORTED:
            # The client is gone; this body is never read, but vLLM answers the same way.
            return ApiError("Client disconnected").response()
        text = "".join(_VOCAB[(opts["start"] + i * opts["stride"]) & 63] for i in range(seq.generated))
        usage = {
            "prompt_tokens": seq.prompt_tokens,
            "total_tokens": seq.prompt_tokens + seq.generated,
            "completion_tokens": seq.generated,
            "prompt_tokens_details": None,
        }
        if chat:
            message = {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            }
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
            body: dict[str, Any] = {
                "id": resp_id,
                "object": "chat.completion",
                "created": created,
                "model": self.model,
                "choices": [choice],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "prompt_logprobs": None,
                "kv_transfer_params": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None,
            }
            body = {
                "id": resp_id,
                "object": "text_completion",
                "created": created,
                "model": self.model,
                "choices": [choice],
                "service_tier": None,
                "system_fingerprint": None,
                "usage": usage,
                "kv_transfer_params": None,
            }
        return Response(_spaced(body) if self.spaced else _encode(body), media_type="application/json")

    async def embeddings(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            inputs = body.get("input")
            if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
                inputs = [inputs]
            if not isinstance(inputs, list) or not inputs:
                raise ApiError("input: Field required (a string or a list)", param="input")
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise ApiError("encoding_format: Input should be 'float' or 'base64'", param="encoding_format")
            dims = _int_field(body, "dimensions", EMBEDDING_DIM)
            assert dims is not None
            if not 1 <= dims <= MAX_EMBEDDING_DIM:
                raise ApiError(f"dimensions must be between 1 and {MAX_EMBEDDING_DIM}.", param="dimensions")
        except ApiError as exc:
            return exc.response()
        data: list[dict[str, Any]] = []
        tokens = 0
        for i, item in enumerate(inputs):
            tokens += max(1, _count_words(item))
            packed = _embedding(item, dims)
            emb: Any = (
                base64.b64encode(packed).decode() if fmt == "base64" else list(struct.unpack(f"<{dims}f", packed))
            )
            data.append({"index": i, "object": "embedding", "embedding": emb})
        result = {
            "id": "embd-" + (request.headers.get("x-request-id") or os.urandom(16).hex()),
            "object": "list",
            "created": int(time.time()),
            "model": self.model,
            "data": data,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
        return Response(_encode(result), media_type="application/json")

    async def tokenize(self, request: Request) -> Response:
        """vLLM's ``POST /tokenize``: a chat request's ``messages`` or a completion's ``prompt``, counted as
        the generation endpoints count them (so ``count`` equals their ``usage.prompt_tokens``)."""
        try:
            body = await self._body(request)
            messages, prompt = body.get("messages"), body.get("prompt")
            if isinstance(messages, list):
                count = max(1, sum(_count_words(m.get("content")) for m in messages if isinstance(m, dict)))
            elif isinstance(prompt, str):
                count = _count_words(prompt)
            else:
                raise ApiError("Either messages or prompt must be provided.", param="prompt")
        except ApiError as exc:
            return exc.response()
        self.engine.tokenized += 1
        return JSONResponse({"count": count, "max_model_len": self.max_model_len, "tokens": list(range(count))})

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def metrics(self, request: Request) -> Response:
        return Response(metrics.render(self.engine, self.model), media_type=metrics.CONTENT_TYPE)

    async def sim_stats(self, request: Request) -> Response:
        log = request.query_params.get("log") != "0"  # ?log=0: the counters alone, cheap to ask often
        return Response(_encode(self.engine.stats(log=log)), media_type="application/json")

    async def sim_reset(self, request: Request) -> Response:
        self.engine.reset_stats()
        return JSONResponse({"ok": True})


def _embedding(item: Any, dims: int = EMBEDDING_DIM) -> bytes:
    """``dims`` little-endian float32 values in [-1, 1), deterministic from the input."""
    digest = hashlib.shake_256(_encode(item)).digest(4 * dims)
    ints = struct.unpack(f"<{dims}I", digest)
    return struct.pack(f"<{dims}f", *(v / 2147483648.0 - 1.0 for v in ints))


class _StreamFormat:
    """Pre-encoded pieces of one request's SSE chunks, so each token costs a few byte joins."""

    __slots__ = (
        "chat",
        "continuous",
        "head",
        "include_usage",
        "max_tokens",
        "prompt_tokens",
        "start",
        "stride",
    )

    def __init__(
        self, resp_id: str, created: int, model: str, seq: Sequence, opts: dict[str, Any], *, chat: bool
    ) -> None:
        obj = b"chat.completion.chunk" if chat else b"text_completion"
        self.head = (
            b'data: {"id":'
            + _encode(resp_id)
            + b',"object":"'
            + obj
            + b'","created":'
            + str(created).encode()
            + b',"model":'
            + _encode(model)
            + b',"choices":['
        )
        self.chat = chat
        self.continuous: bool = opts["continuous"]
        self.include_usage: bool = opts["include_usage"]
        self.start: int = opts["start"]
        self.stride: int = opts["stride"]
        self.prompt_tokens = seq.prompt_tokens
        self.max_tokens = seq.max_tokens

    def _usage(self, completion: int) -> bytes:
        p = self.prompt_tokens
        return b'"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}' % (
            p,
            p + completion,
            completion,
        )

    def role(self) -> bytes:
        tail = b"]," + self._usage(0) + b"}\n\n" if self.continuous else b"]}\n\n"
        return (
            self.head + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
            b'"finish_reason":null}' + tail
        )

    def token(self, i: int) -> bytes:
        text = _VOCAB_JSON[(self.start + i * self.stride) & 63]
        last = i + 1 >= self.max_tokens
        if self.chat:
            mid = (
                b'{"index":0,"delta":{"content":'
                + text
                + (
                    b'},"logprobs":null,"finish_reason":"length","stop_reason":null}'
                    if last
                    else b'},"logprobs":null,"finish_reason":null}'
                )
            )
        else:
            mid = (
                b'{"index":0,"text":'
                + text
                + (
                    b',"logprobs":null,"finish_reason":"length","stop_reason":null}'
                    if last
                    else b',"logprobs":null,"finish_reason":null,"stop_reason":null}'
                )
            )
        tail = b"]," + self._usage(i + 1) + b"}\n\n" if self.continuous else b"]}\n\n"
        return self.head + mid + tail

    def final_usage(self) -> bytes:
        return self.head + b"]," + self._usage(self.max_tokens) + b"}\n\n"


async def _stream(engine: Engine, seq: Sequence, fmt: _StreamFormat) -> AsyncIterator[bytes]:
    # Queued here, not in the endpoint: if the client leaves before the body starts, this generator
    # never runs, and nothing must be left in the engine.
    engine.add(seq)
    seen = 0
    try:
        while True:
            await seq.wait(seen)
            if seq.state == ABORTED:
                return  # engine shut down under us
            generated = seq.generated
            parts: list[bytes] = []
            if seen == 0 and generated:
                engine.record("first_output", seq)  # where the engine's share of TTFT ends
                if fmt.chat:
                    parts.append(fmt.role())  # vLLM sends the role chunk with the first output
            for i in range(seen, generated):
                parts.append(fmt.token(i))
            seen = generated
            if seq.state == FINISHED:
                if fmt.include_usage:
                    parts.append(fmt.final_usage())
                parts.append(_DONE)
                yield b"".join(parts)
                return
            # A consumer that lagged gets its events in one write: same bytes on the wire, fewer sends.
            yield b"".join(parts)
    finally:
        # CancelledError (disconnect seen by sse-starlette) or GeneratorExit (send failed): free the slot.
        if not seq.done:
            engine.abort(seq)


def _reversed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reversed_keys(v) for k, v in reversed(value.items())}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


def _spaced(value: Any) -> bytes:
    """``value`` as ``json.dumps`` writes it by default (``", "`` and ``": "``), keys in reverse order."""
    return json.dumps(_reversed_keys(value)).encode()


async def _respaced(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream's JSON events rewritten by ``_spaced`` (slow, for tests only); [DONE] unchanged."""
    async with contextlib.aclosing(events):  # closing it runs _stream's finally (the abort)
        async for block in events:
            out: list[bytes] = []
            for event in block.split(b"\n\n"):
                if event.startswith(b"data: {"):
                    event = b"data: " + _spaced(_decoder.decode(event[6:]))
                if event:
                    out.append(event + b"\n\n")
            yield b"".join(out)


async def _crlf(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream with CRLF line ends (JSON strings escape newlines: every LF here ends a line)."""
    async with contextlib.aclosing(events):  # closing it runs _stream's finally (the abort)
        async for block in events:
            yield block.replace(b"\n", b"\r\n")


async def _abort_on_disconnect(receive: Receive, engine: Engine, seq: Sequence) -> None:
    # The body is already read, so the next ASGI message is http.disconnect when the client leaves;
    # uvicorn does not cancel a non-streaming handler itself.
    while (await receive())["type"] != "http.disconnect":
        pass
    engine.abort(seq)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(
    model: str = "sim-model",
    max_num_seqs: int = 16,
    *,
    decode_ms: float = 10.0,
    decode_ms_per_seq: float = 0.25,
    prefill_ms: float = 5.0,
    max_tokens_default: int = 64,
    seed: int | None = None,
    json_style: str = "compact",
    priority_scheduling: bool = True,
    max_model_len: int = 4096,
    scheduling_policy: str | None = None,
    kv_cache_tokens: int | None = None,
    line_ending: str = "lf",
) -> Starlette:
    """Build the simulator app; each engine step lasts ``decode_ms + decode_ms_per_seq * running`` ms.

    ``scheduling_policy`` is vLLM's ``--scheduling-policy`` (fcfs|priority; default: priority, unlike
    vLLM, so that tests may pass priorities; ``priority_scheduling=False`` means fcfs). Under fcfs a
    non-zero ``priority`` is refused, as vLLM does. ``kv_cache_tokens`` bounds the KV cache (None:
    unlimited, no preemption); like vLLM, it must hold at least one request of ``max_model_len``.
    """
    policy = scheduling_policy or ("priority" if priority_scheduling else "fcfs")
    if kv_cache_tokens is not None and kv_cache_tokens < max_model_len:
        raise ValueError(f"kv_cache_tokens ({kv_cache_tokens}) is smaller than max_model_len ({max_model_len})")
    engine = Engine(
        max_num_seqs,
        decode_ms=decode_ms,
        decode_ms_per_seq=decode_ms_per_seq,
        prefill_ms=prefill_ms,
        policy=policy,
        kv_cache_tokens=kv_cache_tokens,
    )
    sim = Simulator(
        model,
        engine,
        max_tokens_default=max_tokens_default,
        seed=seed,
        priority_scheduling=policy == "priority",
        max_model_len=max_model_len,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # sse-starlette's flag is process-global and never reset: a previous server's shutdown in this
        # process would otherwise end every new stream at once.
        AppStatus.should_exit = False
        try:
            yield
        finally:
            await engine.aclose()

    routes = [
        Route("/v1/chat/completions", sim.chat_completions, methods=["POST"]),
        Route("/v1/completions", sim.completions, methods=["POST"]),
        Route("/v1/embeddings", sim.embeddings, methods=["POST"]),
        Route("/v1/models", sim.models, methods=["GET"]),
        Route("/tokenize", sim.tokenize, methods=["POST"]),
        Route("/health", sim.health, methods=["GET"]),
        Route("/version", sim.version, methods=["GET"]),
        Route("/metrics", sim.metrics, methods=["GET"]),
        Route("/sim/stats", sim.sim_stats, methods=["GET"]),
        Route("/sim/reset", sim.sim_reset, methods=["POST"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {HTTPException: _http_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.simulator = sim
    app.state.engine = engine
    if json_style not in ("compact", "spaced"):
        raise ValueError(f"json_style must be compact or spaced, not {json_style!r}")
    sim.spaced = json_style == "spaced"
    if line_ending not in ("lf", "crlf"):
        raise ValueError(f"line_ending must be lf or crlf, not {line_ending!r}")
    sim.crlf = line_ending == "crlf"
    return app


def run(host: str = "127.0.0.1", port: int = 8000, **create_app_kwargs: Any) -> None:
    """Serve the simulator with uvicorn until interrupted (uvloop/httptools when installed)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(**create_app_kwargs),
        host=host,
        port=port,
        loop="auto",
        http="auto",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        backlog=4096,
    )
    uvicorn.Server(config).run()

"""Issue 19, item 7: a matrix, not a list. Every endpoint x stream x size x fault through the real stack.

endpoint: chat, completions, embeddings; stream: yes, no (embeddings: no only); size: tiny (5 tokens,
1 input) or large (2,000 tokens; 300 inputs x 1,024 dimensions, about 6 MB of JSON); fault: none,
``worker-cut`` (the worker's consuming broker connection closed with ``rabbitmqctl close_connection``),
``vllm-restart`` (the simulator killed and started again on its port), ``redis-stalled`` (SIGSTOP of a
redis-server the test started itself). One shared stack (simulator, worker, gateway) for all cells,
the real openai client, a token per cell.

When the fault lands (``Cell.moment``), deterministically:
- mid-stream (streamed large answers): once the client has its first content chunk. A restart kills
  the simulator at that moment; for a cut the simulator is frozen (SIGSTOP) until the cut has landed,
  since ``rabbitmqctl`` takes a second or more: the answer cannot end before the cut.
- mid-generation (non-streamed large answers): once the simulator has started the request, frozen
  likewise; nothing has reached the gateway yet.
- before output (tiny answers, embeddings): the simulator is frozen before the request is sent, and
  the fault lands once the worker holds the request.
- redis-stalled: from before the request until its answer is in.
A freeze lasts a few seconds, far below the stall and idle timeouts: alone it is no fault.

Each cell checks:
- status and body agree: a 200 carries a well-formed answer with content (completion tokens =
  max_tokens, one content chunk per token when streamed, the embeddings asked for); an error status
  has an OpenAI-shaped error body; a stream ends with a finish reason and [DONE], or with one
  OpenAI-shaped error event (and [DONE]); it never just stops;
- nothing fails without a cause: every cell is answered 200 in full, except that a stream hit by a
  cut or a restart after its first output may end with an error event after that output (until a
  later issue adds resume); before any output the request is redelivered and must be served;
- nothing hangs: a cell ends within ``CELL_TIMEOUT``; with Redis stalled a request takes at most
  ``REDIS_SLACK`` (or half its time, for a long one) longer than its fault-free twin;
- billed and limited once: one ledger record for the request id, with the counts the client got when
  answered (a stream ended early: its prompt and at least the chunks it got); the token's TPM counter
  (read from a probe request's ``x-ratelimit-remaining-tokens``) moved by exactly that record's
  tokens; after all cells, no request id has a second record (a late one from a redelivery).
At the end the module prints a table of the cells (outcome, time) to quote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pydantic
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from llmdispatch.tokens import TokenStore
from tests.faults import (
    BrokerConnection,
    RedisServer,
    broker_connections,
    close_broker_connections,
    local_ports,
    until,
    until_event,
)
from tests.ledger import LedgerFollower
from tests.stack import AMQP_URL, STREAM_URL, Process, Stack, delete_stream, free_slots, run_sync

ENDPOINTS = ("chat", "completions", "embeddings")
SIZES = ("tiny", "large")
FAULTS = ("none", "worker-cut", "vllm-restart", "redis-stalled")
TOKENS = {"tiny": 5, "large": 2000}  # max_tokens: the simulator always generates all of them
EMBEDDINGS = {"tiny": (1, None), "large": (300, 1024)}  # inputs, dimensions (None: the server's 16)
TYPES = {"chat": ChatCompletion, "completions": Completion, "embeddings": CreateEmbeddingResponse}
SLOTS = 4
TPM = 10**9  # a limit never reached: the counter is what is looked at
CELL_TIMEOUT = 30.0  # a cell that is not answered by then hangs
REDIS_SLACK = 3.0  # the issue: answered within 1 s of the normal time with Redis stopped; 2 s for noise
STALL_TIMEOUT = 30.0  # the worker's vLLM watchdog: far above a freeze (rabbitmqctl: 1-3 s, 8 s when busy)
BROKER_PORT = urlsplit(AMQP_URL.split(",")[0]).port or 5672


@dataclass(frozen=True)
class Cell:
    endpoint: str
    stream: bool
    size: str
    fault: str

    @property
    def id(self) -> str:
        return f"{self.endpoint}-{'stream' if self.stream else 'whole'}-{self.size}-{self.fault}"

    @property
    def moment(self) -> str:
        if self.fault in ("none", "redis-stalled"):
            return ""
        if self.size == "tiny" or self.endpoint == "embeddings":
            return "before output"
        return "mid-stream" if self.stream else "mid-generation"

    @property
    def twin(self) -> str:
        """The same request without a fault."""
        return Cell(self.endpoint, self.stream, self.size, "none").id


CELLS = [
    Cell(endpoint, stream, size, fault)
    for endpoint in ENDPOINTS
    for stream in ((False,) if endpoint == "embeddings" else (True, False))
    for size in SIZES
    for fault in FAULTS
]


@dataclass
class Figure:
    cell: str
    passed: bool = False
    seconds: float = 0.0  # the whole cell: probes, fault, request, checks
    request: float = 0.0  # the request alone, as the client saw it
    outcome: str = "not run"
    request_id: str = ""
    phases: list[str] = field(default_factory=list)  # where the cell's time went
    _last: float = field(default_factory=time.monotonic)

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases.append(f"{phase} {now - self._last:.1f}")
        self._last = now


FIGURES: dict[str, Figure] = {}


@dataclass
class Rig:
    stack: Stack
    redis: RedisServer
    ledger: LedgerFollower
    worker: Process
    secrets: dict[str, str]  # cell id -> its token's secret
    listing: asyncio.Task[list[BrokerConnection]] | None = None  # see list_ahead

    def simulator(self) -> Process:
        return next(p for p in reversed(self.stack.processes) if p.name == "simulator" and p.alive())


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("matrix")
    stream = "test-matrix-" + uuid.uuid4().hex[:10]
    redis = RedisServer(tmp / "redis").start()
    stack = Stack(
        tmp,
        redis_url=redis.url,
        env={
            "DISPATCHER_USAGE_STREAM_URL": STREAM_URL,
            "DISPATCHER_USAGE_STREAM_NAME": stream,
            "DISPATCHER_USAGE_WAL": str(tmp / "usage.wal"),
            "DISPATCHER_RATE_LIMIT_WINDOW": "10000000",  # one window for the whole run: counters never reset
            "DISPATCHER_PRIORITY_HEADROOM": "0",  # one lane: SLOTS requests at once
            "DISPATCHER_VLLM_STALL_TIMEOUT": str(STALL_TIMEOUT),
        },
    )
    ledger: LedgerFollower | None = None
    try:
        stack.start_simulator(max_num_seqs=8, decode_ms=0.2)  # 2,000 tokens in about a second
        worker = stack.start_worker(SLOTS)
        stack.start_gateway()
        ledger = LedgerFollower(STREAM_URL, stream).start()  # the worker has made the stream

        async def make_tokens() -> dict[str, str]:
            store = TokenStore(stack.database_url or "")
            try:
                return {cell.id: await store.add("matrix-" + cell.id, 5, tpm=TPM) for cell in CELLS}
            finally:
                await store.close()

        yield Rig(stack, redis, ledger, worker, run_sync(make_tokens))
    finally:
        try:
            if ledger is not None:
                ledger.close()
            stack.close()
            redis.close()
            run_sync(lambda: delete_stream(stream))
        finally:
            _print_figures(pytestconfig)


def _print_figures(config: pytest.Config) -> None:
    """The table, on the terminal past pytest's output capture (also with -q)."""
    if not FIGURES:
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        figures = list(FIGURES.values())
        total = sum(f.seconds for f in figures)
        print(f"\nmatrix: {len(figures)} cells, {sum(f.passed for f in figures)} passed, {total:.1f} s in all "
              f"({total / len(figures):.1f} s a cell)")  # fmt: skip
        print(f"{'cell':<42} {'ok':<3} {'cell s':>6} {'req s':>6}  {'outcome':<62} where the time went (s)")
        for f in figures:
            print(f"{f.cell:<42} {'yes' if f.passed else 'NO':<3} {f.seconds:6.1f} {f.request:6.1f}  "
                  f"{f.outcome[:62]:<62} {', '.join(f.phases)}")  # fmt: skip


# -- the request and what the client got --------------------------------------------------------------


@dataclass
class Answer:
    status: int = 0
    request_id: str = ""
    usage: dict[str, int] | None = None  # the usage the client was told
    error: dict[str, Any] | None = None  # the error object of an error status or an error event
    chunks: int = 0  # content chunks of a stream
    started: float = 0.0
    seconds: float = 0.0  # until the answer was in (checks aside)
    error_at: float = 0.0  # monotonic time of a stream's error event
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.error is not None:
            where = f"error event after {self.chunks} chunks" if self.status == 200 else f"HTTP {self.status}"
            return f"{where}: {str(self.error.get('message'))[:60]}"
        if self.problems:
            return f"HTTP {self.status}: {self.problems[0][:70]}"
        return f"HTTP {self.status} complete"


def arguments(rig: Rig, cell: Cell, user: str) -> dict[str, Any]:
    model = rig.stack.model
    if cell.endpoint == "embeddings":
        inputs, dimensions = EMBEDDINGS[cell.size]
        args: dict[str, Any] = {
            "model": model,
            "input": [f"passage {i} of the matrix test" for i in range(inputs)],
            "encoding_format": "float",  # the openai client asks for base64 unless told
            "user": user,
        }
        if dimensions:
            args["dimensions"] = dimensions
        return args
    args = {"model": model, "max_tokens": TOKENS[cell.size], "user": user, "stream": cell.stream}
    if cell.endpoint == "chat":
        args["messages"] = [{"role": "user", "content": "Tell me a story"}]
    else:
        args["prompt"] = "Once upon a time"
    if cell.stream:
        args["stream_options"] = {"include_usage": True}
    return args


def _error_shape(body: Any) -> str | None:
    """What is wrong with an OpenAI error body ``{"error": {message, type, param, code}}`` (None: nothing)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"not an OpenAI error body: {str(body)[:200]}"
    if not {"message", "type", "param", "code"} <= set(error) or not error["message"]:
        return f"an error without message, type, param and code: {error}"
    return None


def _content(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or [{}]
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def call(client: openai.AsyncOpenAI, cell: Cell, args: dict[str, Any], output: asyncio.Event) -> Answer:
    """Send the cell's request and judge what came back as a client would see it (``output`` is set
    at the first content chunk of a stream)."""
    answer = Answer()
    answer.started = time.monotonic()
    try:
        if cell.stream:
            await _streamed(client, cell, args, output, answer)
        else:
            await _whole(client, cell, args, answer)
    except openai.APIStatusError as exc:  # an error status: the body must say why, OpenAI's way
        answer.status = exc.status_code
        answer.request_id = exc.response.headers.get("x-request-id", "")
        try:
            body = exc.response.json()
        except ValueError:
            body = exc.response.text
        if problem := _error_shape(body):
            answer.problems.append(f"HTTP {exc.status_code} with {problem}")
        else:
            answer.error = body["error"]
    except openai.APITimeoutError:
        answer.problems.append(f"hung: nothing for {CELL_TIMEOUT} s")
    except (openai.APIConnectionError, httpx.HTTPError) as exc:
        answer.problems.append(f"the connection broke without an error event or status: {exc!r}")
    answer.seconds = answer.seconds or time.monotonic() - answer.started
    return answer


async def _streamed(
    client: openai.AsyncOpenAI, cell: Cell, args: dict[str, Any], output: asyncio.Event, answer: Answer
) -> None:
    chat = cell.endpoint == "chat"
    api = client.chat.completions if chat else client.completions
    events: list[Any] = []
    async with api.with_streaming_response.create(**args) as response:  # type: ignore[attr-defined]
        answer.status = response.status_code
        answer.request_id = response.headers.get("x-request-id", "")
        async for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # the blank line between events, keep-alive comments
            payload = line[5:].strip()
            try:
                event = payload if payload == "[DONE]" else json.loads(payload)
            except ValueError:
                answer.problems.append(f"an event that is not JSON: {payload[:160]}")
                return
            events.append(event)
            if isinstance(event, dict) and "error" in event and not answer.error_at:
                answer.error_at = time.monotonic()
            if isinstance(event, dict) and _content(event, chat):
                output.set()
    answer.seconds = time.monotonic() - answer.started
    chunks = [e for e in events if isinstance(e, dict) and "error" not in e]
    answer.chunks = sum(1 for c in chunks if _content(c, chat))
    if len({c.get("id") for c in chunks}) > 1:
        answer.problems.append("the chunk id changed within the stream")
    errors = [i for i, e in enumerate(events) if isinstance(e, dict) and "error" in e]
    if errors:
        if problem := _error_shape(events[errors[0]]):
            answer.problems.append(f"error event: {problem}")
        else:
            answer.error = events[errors[0]]["error"]
        if events[errors[0] + 1 :] not in ([], ["[DONE]"]):
            answer.problems.append(f"events after the error event: {events[errors[0] + 1 :][:3]}")
        return
    if not events or events[-1] != "[DONE]":
        answer.problems.append(f"the stream stopped after {answer.chunks} chunks without [DONE] or an error event")
        return
    finished = [c for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    if not finished:
        answer.problems.append("[DONE] without a finish reason")
    if not usage:
        answer.problems.append("no usage chunk though include_usage was asked")
        return
    answer.usage = usage[-1]
    _check_tokens(cell, answer)
    if answer.chunks != answer.usage["completion_tokens"]:
        answer.problems.append(f"{answer.chunks} content chunks for {answer.usage['completion_tokens']} tokens")


async def _whole(client: openai.AsyncOpenAI, cell: Cell, args: dict[str, Any], answer: Answer) -> None:
    api = {"chat": client.chat.completions, "completions": client.completions, "embeddings": client.embeddings}
    raw = await api[cell.endpoint].with_raw_response.create(**args)  # type: ignore[attr-defined]
    answer.seconds = time.monotonic() - answer.started
    answer.status = raw.http_response.status_code
    answer.request_id = raw.headers.get("x-request-id", "")
    try:
        body = raw.http_response.json()
    except ValueError:
        answer.problems.append(f"HTTP {answer.status} whose body is not JSON: {raw.http_response.text[:160]}")
        return
    if "error" in body:  # a 200 that is an error: the status lies
        answer.problems.append(f"HTTP {answer.status} whose body is an error: {str(body['error'])[:160]}")
        return
    # The openai client's type, validated (its own parse() only constructs, taking seconds for 6 MB).
    try:
        parsed = TYPES[cell.endpoint].model_validate(body)
    except pydantic.ValidationError as exc:
        answer.problems.append(f"HTTP {answer.status} whose body is no {TYPES[cell.endpoint].__name__}: {exc}"[:300])
        return
    answer.usage = body.get("usage")
    if cell.endpoint == "embeddings":
        inputs, dimensions = EMBEDDINGS[cell.size]
        sizes = {len(item.embedding) for item in parsed.data}
        if len(parsed.data) != inputs or sizes != {dimensions or 16}:
            answer.problems.append(f"{len(parsed.data)} embeddings of {sizes} values (asked {inputs} x {dimensions})")
        if not answer.usage or answer.usage.get("prompt_tokens", 0) < inputs:
            answer.problems.append(f"embeddings usage {answer.usage}")
        return
    choice = parsed.choices[0]
    text = choice.message.content if cell.endpoint == "chat" else choice.text
    if not text or not choice.finish_reason:
        answer.problems.append(f"no content or finish reason: {str(choice)[:160]}")
    _check_tokens(cell, answer)


def _check_tokens(cell: Cell, answer: Answer) -> None:
    if not answer.usage or answer.usage.get("completion_tokens") != TOKENS[cell.size]:
        answer.problems.append(f"usage {answer.usage}, expected {TOKENS[cell.size]} completion tokens")


# -- faults at their moment ---------------------------------------------------------------------------


class Freeze:
    """The simulator frozen (SIGSTOP) and thawed; a killed simulator needs no thaw."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.process: Process | None = None

    def __enter__(self) -> Freeze:
        return self

    def freeze(self) -> None:
        self.process = self.rig.simulator()
        os.kill(self.process.popen.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.alive():
            os.kill(self.process.popen.pid, signal.SIGCONT)
        self.process = None

    def __exit__(self, *_: object) -> None:
        self.thaw()


async def _consumer_connections(rig: Rig) -> list[BrokerConnection]:
    """The worker's consuming connection(s) as the broker lists them (``-out`` publishes, ``-replies-``
    send frames; the consuming one holds the deliveries)."""
    rows = await asyncio.to_thread(broker_connections)
    ports = local_ports(rig.worker.popen.pid, BROKER_PORT)
    return [
        c
        for c in rows
        if c.peer_port in ports and c.name.startswith("dispatcher-worker-")
        if not c.name.endswith("-out") and "-replies-" not in c.name
    ]


def list_ahead(rig: Rig) -> None:
    """List the worker's connections in the background for the next cut: ``rabbitmqctl`` takes
    seconds to start on a busy machine, and the connection stays the same until it is cut."""
    if rig.listing is None:
        rig.listing = asyncio.create_task(_consumer_connections(rig))


async def consumer_connection(rig: Rig) -> list[BrokerConnection]:
    """The worker's consuming connection, from the listing made ahead if it is still the one."""
    deadline = time.monotonic() + 20
    while True:
        listing, rig.listing = rig.listing or asyncio.create_task(_consumer_connections(rig)), None
        ports = local_ports(rig.worker.popen.pid, BROKER_PORT)
        found = [c for c in await listing if c.peer_port in ports]
        if len(found) == 1:
            return found
        assert time.monotonic() < deadline, f"the worker's consuming connection on the broker: {found}"
        await asyncio.sleep(0.2)


class MissedMoment(Exception):
    """The request ended (or nothing happened) before the moment its fault was to land."""


async def _moment(request: asyncio.Task[Answer], waiting: Any, what: str) -> None:
    """Until ``waiting`` is done; MissedMoment if the request ends first or nothing comes in time."""
    waiter = asyncio.ensure_future(waiting)
    done, _ = await asyncio.wait({request, waiter}, timeout=CELL_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        waiter.result()
        return
    waiter.cancel()
    ended = request.result().summary() if request in done else "nothing at all"
    raise MissedMoment(f"the fault's moment ({what}) never came; the request got {ended}")


async def land(
    rig: Rig, cell: Cell, user: str, output: asyncio.Event, freeze: Freeze, request: asyncio.Task[Answer],
    known: list[BrokerConnection],
) -> float:  # fmt: skip
    """Land ``cell``'s fault at its moment (the simulator is already frozen for "before output");
    returns when it landed (monotonic), 0.0 for no fault."""
    if not cell.moment:
        return 0.0
    if cell.moment == "before output":

        async def held() -> None:
            await until(lambda: asyncio.to_thread(lambda: free_slots(rig.worker) < SLOTS), CELL_TIMEOUT, "held")

        await _moment(request, held(), "the worker holds the request")
    elif cell.moment == "mid-generation":

        async def started() -> None:
            async with httpx.AsyncClient(timeout=10) as http:
                await until_event(http, rig.stack, user, "started", timeout=CELL_TIMEOUT)

        await _moment(request, started(), "the simulator started it")
        freeze.freeze()
    else:
        await _moment(request, output.wait(), "the first content chunk")
        if cell.fault == "worker-cut":
            freeze.freeze()
    landed = time.monotonic()
    if cell.fault == "worker-cut":
        ports = {connection.peer_port for connection in known}
        closed = await asyncio.to_thread(close_broker_connections, ports, "test: matrix cut", known=known)
        assert closed, "the worker's consuming connection was not found on the broker"
        freeze.thaw()
    else:
        freeze.process = None  # killed, not thawed
        await asyncio.to_thread(rig.stack.restart_simulator)
    return landed


# -- the limits and the ledger ------------------------------------------------------------------------


@dataclass
class Probe:
    used: int  # the token's TPM counter when the probe was admitted
    cost: int  # the probe's own tokens (charged after it)


async def probe(client: openai.AsyncOpenAI, model: str) -> Probe:
    """One small embeddings request; its x-ratelimit-remaining-tokens is the token's TPM counter."""
    raw = await client.embeddings.with_raw_response.create(model=model, input="probe", encoding_format="float")
    remaining = raw.headers.get("x-ratelimit-remaining-tokens")
    assert remaining is not None, f"no x-ratelimit-remaining-tokens (limits not applied): {dict(raw.headers)}"
    usage = raw.http_response.json()["usage"]
    return Probe(TPM - int(remaining), usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))


async def charged_since(client: openai.AsyncOpenAI, model: str, first: Probe, expected: int) -> tuple[int, list[int]]:
    """What the TPM counter gained since ``first`` beside the probes (waiting up to 5 s for ``expected``),
    and the counter as each probe read it (``first`` included)."""
    spent = first.cost
    readings = [first.used]
    deadline = time.monotonic() + 5
    while True:
        now = await probe(client, model)
        readings.append(now.used)
        charged = now.used - first.used - spent
        if charged == expected or time.monotonic() > deadline:
            return charged, readings
        spent += now.cost
        await asyncio.sleep(0.1)


# -- the matrix ---------------------------------------------------------------------------------------


async def run_cell(rig: Rig, cell: Cell, figure: Figure) -> list[str]:
    """The cell's request under its fault; the problems found."""
    stack = rig.stack
    client = openai.AsyncOpenAI(
        base_url=stack.gateway_url + "/v1",
        api_key=rig.secrets[cell.id],
        max_retries=0,
        timeout=openai.Timeout(CELL_TIMEOUT, connect=5),
    )
    user = f"matrix-{cell.id}-{uuid.uuid4().hex[:6]}"  # names it in the simulator's log
    # The token is new: its counter is at 0. With Redis to stall, a first request puts it in the
    # gateway's caches, as a token in use is (a new one may be refused while Redis hangs).
    before = await probe(client, stack.model) if cell.fault == "redis-stalled" else Probe(0, 0)
    figure.mark("probe")
    known = await consumer_connection(rig) if cell.fault == "worker-cut" else []
    figure.mark("list")
    output = asyncio.Event()
    landed = 0.0
    with Freeze(rig) as freeze:
        if cell.fault == "redis-stalled":
            rig.redis.pause()
        if cell.moment == "before output":
            freeze.freeze()
        request = asyncio.create_task(call(client, cell, arguments(rig, cell, user), output))
        try:
            landed = await land(rig, cell, user, output, freeze, request, known)
            figure.mark("fault")
            answer = await asyncio.wait_for(asyncio.shield(request), CELL_TIMEOUT)
        except TimeoutError:
            answer = Answer(problems=[f"hung: no answer {CELL_TIMEOUT} s after the fault"])
        finally:
            if cell.fault == "redis-stalled":
                rig.redis.resume()
            if not request.done():
                request.cancel()
                with contextlib.suppress(BaseException):
                    await request
    figure.request, figure.outcome, figure.request_id = answer.seconds, answer.summary(), answer.request_id
    figure.mark("answer")
    problems = list(answer.problems)

    # Status and cause: all is answered in full, but a stream hit after its first output may end
    # with an error event after that output.
    if answer.error is not None:
        legitimate = cell.moment == "mid-stream" and answer.status == 200 and answer.error_at >= landed > 0
        if not legitimate:
            problems.append(f"{answer.summary()} (fault: {cell.fault}, moment: {cell.moment or '-'})")
    elif answer.status != 200 and not problems:
        problems.append(f"HTTP {answer.status}")
    twin = FIGURES.get(cell.twin)
    if cell.fault == "redis-stalled" and twin is not None and twin.passed:
        # Additive (a hung Redis costs its timeout once or more), with room for a busy machine.
        if answer.seconds > twin.request + max(REDIS_SLACK, twin.request / 2):
            problems.append(f"{answer.seconds:.1f} s with Redis stalled, {twin.request:.1f} s without")

    # Billed once, and the limits charged what the ledger bills.
    if answer.request_id:
        records = await rig.ledger.wait(answer.request_id)
        if len(records) != 1:
            problems.append(f"{len(records)} ledger records for the request (want 1)")
        if records:
            record = records[0]
            billed = record.prompt_tokens + record.completion_tokens
            if answer.usage is not None and answer.error is None:
                got = (answer.usage.get("prompt_tokens", 0), answer.usage.get("completion_tokens", 0))
                if (record.outcome, record.prompt_tokens, record.completion_tokens) != ("ok", *got):
                    problems.append(f"ledger: {record.outcome} {record.prompt_tokens}+{record.completion_tokens}"
                                    f" tokens, the client got ok {got[0]}+{got[1]}")  # fmt: skip
            elif answer.chunks and (record.prompt_tokens == 0 or record.completion_tokens < answer.chunks):
                # Ended early after output: its prompt was prefilled and its chunks generated.
                problems.append(f"ledger: {record.outcome} {record.prompt_tokens}+{record.completion_tokens}"
                                f" tokens for a stream that got {answer.chunks} chunks")  # fmt: skip
            charged, readings = await charged_since(client, stack.model, before, billed)
            if charged != billed:
                # Each probe costs its own tokens (1): a counter that stays put reads as a negative charge.
                problems.append(f"TPM counter charged {charged} tokens, the ledger billed {billed} (the counter "
                                f"read {readings[0]} before, then {readings[1:6]} by probes of 1 token)")  # fmt: skip
    elif not problems:
        problems.append("no x-request-id")
    figure.mark("billing")

    # The stack serves again before the next cell (a restarted server, a reconnected worker).
    async def ready() -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            return (await http.get(rig.worker.url + "/ready")).status_code == 200  # type: ignore[attr-defined]

    if cell.moment:
        await until(ready, 20, "the worker ready again")
        figure.mark("ready")
    list_ahead(rig)
    await client.close()
    return problems


@pytest.mark.parametrize("cell", CELLS, ids=[cell.id for cell in CELLS])
async def test_cell(rig: Rig, cell: Cell) -> None:
    figure = FIGURES[cell.id] = Figure(cell.id)
    started = time.monotonic()
    try:
        problems = await asyncio.wait_for(run_cell(rig, cell, figure), 3 * CELL_TIMEOUT)
    except MissedMoment as exc:
        problems = [str(exc)]
    finally:
        figure.seconds = time.monotonic() - started
    if problems and figure.outcome.endswith("complete"):
        figure.outcome = problems[0][:80]
    figure.passed = not problems
    assert not problems, "\n".join(problems)


async def test_no_request_billed_twice(rig: Rig) -> None:
    """After every cell (late records of redelivered or cancelled attempts included): one record per request."""
    if not FIGURES:
        pytest.skip("no cell ran")
    if rig.listing is not None:
        await rig.listing
    await asyncio.sleep(1.0)
    cells = {figure.request_id: figure.cell for figure in FIGURES.values() if figure.request_id}
    seen: dict[str, list[str]] = {}
    for r in rig.ledger.records:
        seen.setdefault(r.request_id, []).append(f"{r.outcome} {r.status} {r.prompt_tokens}+{r.completion_tokens}")
    twice = {cells.get(request_id, request_id): found for request_id, found in seen.items() if len(found) > 1}
    assert seen and not twice, twice

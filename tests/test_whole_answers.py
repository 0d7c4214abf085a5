"""Every path as solid as the streamed one (issue 19): whole answers, large bodies, [DONE], CRLF, timeouts.

Real processes throughout (simulator, worker, gateway, RabbitMQ, the openai client). Each stack is
built for one fault with small timeouts, so that what takes minutes in production takes seconds here:
- a non-streamed answer longer than the stall timeout succeeds; one past VLLM_REQUEST_TIMEOUT is a
  504 that leaves the worker consuming (``slow``);
- embeddings of 2,048 inputs x 1,024 dimensions (~40 MB of JSON) go through, in several reply
  messages; an answer above MAX_ANSWER_BYTES is a 502, not a 200 with an error body (``big``);
- ``[DONE]`` reaches the client only once the usage record is durable (``ledger``);
- a server that ends its SSE lines with CRLF streams event by event (``crlf``);
- a gateway-side timeout cancels the work on the GPU (``idle``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import psutil
import pytest

from llmdispatch.wire import Frame, Kind, frames_encoder
from llmdispatch.worker.replies import MAX_BATCH_BYTES, _batches
from llmdispatch.worker.serve import WHOLE_CHUNK
from tests.amqp_audit import AuditProxy
from tests.faults import chat, sim_log, until_event
from tests.stack import AMQP_URL, Process, Stack, free_port

STALL_TIMEOUT = 2.0
REQUEST_TIMEOUT = 9.0
DECODE_MS = 100.0  # the slow stack: 10 tokens a second


def _start(
    stack: Stack, *, decode_ms: float = 10.0, sim: tuple[str, ...] = (), worker: dict[str, str] | None = None
) -> Stack:
    stack.start_simulator(8, decode_ms, *sim)
    stack.start_worker(4, env=worker)
    stack.start_gateway()
    stack.token = stack.add_token("whole", priority=5)
    return stack


def _client(stack: Stack, url: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=(url or stack.gateway_url) + "/v1", api_key=stack.token, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("slow"),
        env={
            "DISPATCHER_VLLM_STALL_TIMEOUT": str(STALL_TIMEOUT),
            "DISPATCHER_VLLM_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
            "DISPATCHER_HEARTBEAT_INTERVAL": "0.5",
            "DISPATCHER_IDLE_TIMEOUT": "3",  # heartbeats, not the answer, keep the gateway waiting
        },
    )
    try:
        yield _start(stack, decode_ms=DECODE_MS)
    finally:
        stack.close()


def _worker(stack: Stack) -> Process:
    return next(p for p in stack.processes if p.name == "worker")


async def test_a_whole_answer_longer_than_the_stall_timeout_succeeds(slow: Stack) -> None:
    """vLLM sends nothing for a non-streamed request until it is done: that silence is no stall."""
    started = time.monotonic()
    answer = await _client(slow).chat.completions.create(
        model=slow.model, messages=[{"role": "user", "content": "long"}], max_tokens=60, user="whole-60"
    )
    took = time.monotonic() - started
    print(f"\nwhole answer of 60 tokens: {took:.1f} s (stall timeout {STALL_TIMEOUT} s)")
    assert answer.usage is not None and answer.usage.completion_tokens == 60
    assert took > 3 * STALL_TIMEOUT * 0.9  # it did outlive the stall timeout
    # Nobody judged vLLM failed: the worker never paused its queue.
    assert "pausing" not in _worker(slow).log() and "vLLM failed" not in _worker(slow).log()


async def test_a_whole_answer_past_the_request_timeout_is_a_504(slow: Stack) -> None:
    """The bound of a whole answer is its total time: past it, 504, the GPU stops, the worker goes on."""
    async with httpx.AsyncClient(timeout=60) as http:
        body = chat("whole-150", 150, model=slow.model, stream=False)
        headers = {"Authorization": f"Bearer {slow.token}"}
        response = await http.post(slow.gateway_url + "/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["code"] == "inference_timeout" and f"{REQUEST_TIMEOUT:g} s" in error["message"]
        await until_event(http, slow, "whole-150", "aborted", timeout=5)
        # A request's own time limit is no failure of the server: still consuming, at once.
        after = await http.post(
            slow.gateway_url + "/v1/chat/completions", json=chat("after", 3, model=slow.model, stream=False),
            headers=headers,
        )  # fmt: skip
        assert after.status_code == 200
    assert "pausing" not in _worker(slow).log()


# -- large whole answers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The worker reaches RabbitMQ through a recording proxy: the size of each message it publishes."""
    proxy = AuditProxy(urlsplit(AMQP_URL.split(",")[0]).port or 5672).open()
    stack = Stack(tmp_path_factory.mktemp("big"))
    stack.proxy = proxy  # type: ignore[attr-defined]
    try:
        yield _start(stack, worker={"DISPATCHER_AMQP_URL": proxy.url()})
    finally:
        try:
            stack.close()
        finally:
            proxy.close()


def _inputs(count: int) -> list[str]:
    return [f"passage {i} of a batch being ingested" for i in range(count)]


def _peak_rss(process: Process) -> int:
    """Peak resident memory (VmHWM) of the process and its children, bytes."""
    peak = 0
    root = psutil.Process(process.popen.pid)
    for proc in [root, *root.children(recursive=True)]:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) * 1024)
    return peak


async def test_embeddings_of_300_inputs_of_1024_dimensions(big: Stack) -> None:
    """About 6 MB of JSON: more than the streaming buffer cap (4 MiB), which whole answers do not have."""
    result = await _client(big).embeddings.create(
        model=big.model, input=_inputs(300), dimensions=1024, encoding_format="float"
    )
    assert [d.index for d in result.data] == list(range(300))
    assert all(len(d.embedding) == 1024 for d in result.data)


async def test_embeddings_of_2048_inputs_of_1024_dimensions(big: Stack) -> None:
    """OpenAI's per-request limit, about 40 MB of JSON, through the real stack; its time and memory."""
    gateway = next(p for p in big.processes if p.name == "gateway")
    body = {"model": big.model, "input": _inputs(2048), "dimensions": 1024, "encoding_format": "float"}
    async with httpx.AsyncClient(timeout=120) as http:
        started = time.monotonic()
        direct = await http.post(big.simulator_url + "/v1/embeddings", json=body)
        direct_took = time.monotonic() - started
        started = time.monotonic()
        response = await http.post(
            big.gateway_url + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {big.token}"}
        )
        took = time.monotonic() - started
    assert response.status_code == 200, response.text[:300]
    answer, expected = response.json(), direct.json()
    print(
        f"\nembeddings 2048 x 1024: {len(response.content) / 1e6:.1f} MB in {took:.2f} s through the stack "
        f"({direct_took:.2f} s from the simulator directly); "
        f"peak RSS gateway {_peak_rss(gateway) / 2**20:.0f} MiB, worker {_peak_rss(_worker(big)) / 2**20:.0f} MiB"
    )
    assert len(response.content) > 30e6
    # Carried by several messages, each well under RabbitMQ 4.x's default max_message_size (16 MiB).
    sizes = big.proxy.body_sizes()  # type: ignore[attr-defined]
    large = [size for size in sizes if size > 1 << 20]
    print(f"worker messages above 1 MiB: {len(large)}, largest {max(sizes) / 2**20:.1f} MiB")
    assert len(large) >= 8 and max(sizes) < 8 << 20
    assert answer["data"] == expected["data"] and answer["usage"] == expected["usage"]


def test_a_large_answer_travels_in_messages_well_under_16_mib() -> None:
    """RabbitMQ 4.x refuses messages above 16 MiB by default: 40 MB leaves in 1 MiB frames, batched by 4 MiB."""
    frames = [Frame("r", Kind.DATA, b"x" * WHOLE_CHUNK, seq=i) for i in range(40)]
    batches = _batches([Frame("r", Kind.HEAD, b"application/json"), *frames])
    assert [f for batch in batches for f in batch][1:] == frames  # all of them, in order
    assert all(len(frames_encoder.encode(batch)) < MAX_BATCH_BYTES + 4096 < 16 << 20 for batch in batches)


# -- [DONE] after the usage record ----------------------------------------------------------------------

COMMIT_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The worker's usage stream is unreachable: each record waits COMMIT_TIMEOUT for a confirm that
    never comes, then stays in the write-ahead log (durable there)."""
    tmp = tmp_path_factory.mktemp("ledger")
    stack = Stack(tmp)
    stack.wal = tmp / "usage.wal"  # type: ignore[attr-defined]
    worker = {
        "DISPATCHER_USAGE_STREAM_URL": f"rabbitmq-stream://guest:guest@127.0.0.1:{free_port()}/",
        "DISPATCHER_USAGE_STREAM_NAME": "test-whole-done",
        "DISPATCHER_USAGE_WAL": str(stack.wal),  # type: ignore[attr-defined]
        "DISPATCHER_USAGE_COMMIT_TIMEOUT": str(COMMIT_TIMEOUT),
    }
    try:
        yield _start(stack, worker=worker)
    finally:
        stack.close()


async def test_done_comes_only_after_the_usage_record_is_durable(ledger: Stack) -> None:
    body = {**chat("done-last", 10, model=ledger.model), "stream_options": {"include_usage": True}}
    arrivals: list[tuple[float, bytes]] = []
    async with httpx.AsyncClient(timeout=60) as http:
        headers = {"Authorization": f"Bearer {ledger.token}"}
        async with http.stream("POST", ledger.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
            request_id = r.headers["x-request-id"]
            wal_at_done = b""
            async for chunk in r.aiter_raw():
                arrivals.append((time.monotonic(), chunk))
                if b"data: [DONE]" in chunk and not wal_at_done:
                    wal_at_done = ledger.wal.read_bytes()  # type: ignore[attr-defined]
    raw = b"".join(chunk for _, chunk in arrivals)
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    usage_at = next(at for at, chunk in arrivals if b'"usage":{' in chunk)
    done_at = next(at for at, chunk in arrivals if b"[DONE]" in chunk)
    print(f"\n[DONE] {done_at - usage_at:.2f} s after the usage chunk (commit timeout {COMMIT_TIMEOUT} s)")
    # The worker waited for the ledger before [DONE]: the record was in its write-ahead log by then.
    assert request_id.encode() in wal_at_done
    assert done_at - usage_at > COMMIT_TIMEOUT * 0.8


# -- SSE with CRLF line ends ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crlf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server that ends its SSE lines with CRLF; the gateway has a small answer bound (1 MiB), which
    streams do not feel (it bounds whole answers; a slow stream reader is bounded otherwise)."""
    stack = Stack(tmp_path_factory.mktemp("crlf"), env={"DISPATCHER_MAX_ANSWER_BYTES": str(1 << 20)})
    try:
        yield _start(stack, decode_ms=50, sim=("--line-ending", "crlf"))
    finally:
        stack.close()


async def test_a_server_writing_crlf_streams_event_by_event(crlf: Stack) -> None:
    body = {**chat("crlf", 30, model=crlf.model), "seed": 3, "stream_options": {"include_usage": True}}
    arrivals: list[tuple[float, bytes]] = []
    async with httpx.AsyncClient(timeout=60) as http:
        direct = await http.post(crlf.simulator_url + "/v1/chat/completions", json={**body, "user": "direct"})
        headers = {"Authorization": f"Bearer {crlf.token}"}
        async with http.stream("POST", crlf.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_raw():
                arrivals.append((time.monotonic(), chunk))
    raw = b"".join(chunk for _, chunk in arrivals)
    events = [e for e in raw.split(b"\r\n\r\n") if e]
    expected = [e for e in direct.content.split(b"\r\n\r\n") if e]
    # The server's bytes, CRLF and all, event for event (ids and times aside).
    assert raw.endswith(b"data: [DONE]\r\n\r\n") and b"\n\n" not in raw.replace(b"\r\n\r\n", b"")
    assert [_without_ids(e) for e in events] == [_without_ids(e) for e in expected]
    # Streamed: 30 tokens at 50 ms came over 1.5 s, not in one piece at the end.
    first = next(at for at, chunk in arrivals if b'"content":" ' in chunk)
    print(f"\nCRLF stream: {len(arrivals)} writes over {arrivals[-1][0] - first:.2f} s")
    assert arrivals[-1][0] - first > 0.5 and len(arrivals) > 5


async def test_an_answer_above_the_bound_is_a_502_not_a_200(crlf: Stack) -> None:
    """The status is the one the answer ended with: HEAD said 200, the gateway's bound ended it with 502."""
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            crlf.gateway_url + "/v1/embeddings",
            json={"model": crlf.model, "input": _inputs(300), "dimensions": 1024},
            headers={"Authorization": f"Bearer {crlf.token}"},
        )
    assert response.status_code == 502, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "answer_too_large" and str(1 << 20) in error["message"]
    assert {"message", "type", "param", "code"} <= set(error)


def _without_ids(event: bytes) -> Any:
    if not event.startswith(b"data: {"):
        return event
    chunk = json.loads(event[6:])
    chunk.pop("id"), chunk.pop("created")
    return chunk


# -- gateway-side timeouts cancel the work --------------------------------------------------------------


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway that gives up on a silent worker after 1 s; the worker sends no heartbeat for 30 s and
    its server takes 8 s for a token: only a Cancel can stop the work in between."""
    stack = Stack(
        tmp_path_factory.mktemp("idle"),
        env={"DISPATCHER_IDLE_TIMEOUT": "1", "DISPATCHER_HEARTBEAT_INTERVAL": "30"},
    )
    try:
        yield _start(stack, decode_ms=8000)
    finally:
        stack.close()


async def test_an_idle_timeout_in_a_stream_cancels_the_work(idle: Stack) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        headers = {"Authorization": f"Bearer {idle.token}"}
        body = chat("idle-stream", 5, model=idle.model)
        async with http.stream("POST", idle.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
            raw = await r.aread()
        ended_at = time.monotonic()
        assert r.status_code == 200 and b'"code":"worker_lost"' in raw and raw.endswith(b"data: [DONE]\n\n")
        aborted = await until_event(http, idle, "idle-stream", "aborted", timeout=20)
        print(f"\nidle timeout: the server aborted {aborted['t'] - ended_at:.2f} s after the client's error")
        assert aborted["t"] - ended_at < 4.0  # the first token (the worker's next frame) comes after 8 s
        assert "finished" not in [e["event"] for e in await sim_log(http, idle) if e["user"] == "idle-stream"]

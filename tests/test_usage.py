"""The usage ledger on a real RabbitMQ stream: one record per request, and `dispatcher usage` totals."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmdispatch.usage import (
    StreamAddress,
    UsageRecord,
    parse_time,
    percentile,
    read_usage,
    summarize,
)
from llmdispatch.worker.usage import UsageLedger
from tests.stack import STREAM_URL, Stack, delete_stream, free_port, run_sync


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stream = "test-usage-" + uuid.uuid4().hex[:10]
    tmp = tmp_path_factory.mktemp("ledger")
    stack = Stack(
        tmp,
        env={
            "DISPATCHER_USAGE_STREAM_URL": STREAM_URL,
            "DISPATCHER_USAGE_STREAM_NAME": stream,
            "DISPATCHER_USAGE_WAL": str(tmp / "usage.wal"),
        },
    )
    stack.stream = stream  # type: ignore[attr-defined]
    try:
        stack.start_simulator(max_num_seqs=16, decode_ms=5)
        stack.start_worker(max_concurrency=4)
        stack.start_gateway()
        yield stack
    finally:
        stack.close()
        run_sync(lambda: delete_stream(stream))


def body(stack: Stack, *, stream: bool, max_tokens: int = 8, usage: bool = True, **extra: object) -> dict[str, object]:
    out: dict[str, object] = {
        "model": stack.model,
        "messages": [{"role": "user", "content": "What is a usage ledger for?"}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }
    if stream and usage:
        out["stream_options"] = {"include_usage": True}
    return out


def usage_chunk(raw: bytes) -> dict[str, int] | None:
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage":{' in event:
            return json.loads(event[6:])["usage"]
    return None


async def wait_records(stack: Stack, since: float, token: str, count: int) -> list[UsageRecord]:
    """The token's records once ``count`` have arrived (a cancelled request's may come a little later)."""
    deadline = time.monotonic() + 20
    while True:
        records = [r for r in await read_usage(STREAM_URL, stack.stream, since) if r.token == token]  # type: ignore[attr-defined]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.3)


async def test_one_record_per_request_with_the_clients_counts(ledger: Stack) -> None:
    since = time.time()
    secret = ledger.add_token("ledger-a", priority=6)
    expected: dict[str, dict[str, object]] = {}  # request id -> what the client saw
    auth = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(base_url=ledger.gateway_url, headers=auth, timeout=30) as client:
        r = await client.post("/v1/chat/completions", json=body(ledger, stream=True, max_tokens=9))
        expected[r.headers["x-request-id"]] = {"outcome": "ok", "usage": usage_chunk(r.content), "stream": True}
        r = await client.post("/v1/completions", json={"model": ledger.model, "prompt": "Once", "max_tokens": 4})
        expected[r.headers["x-request-id"]] = {"outcome": "ok", "usage": r.json()["usage"], "stream": False}
        # The client did not ask for usage: vLLM still reported it to the worker.
        r = await client.post("/v1/chat/completions", json=body(ledger, stream=True, max_tokens=6, usage=False))
        assert usage_chunk(r.content) is None
        expected[r.headers["x-request-id"]] = {"outcome": "ok", "completion_tokens": 6, "stream": True}
        r = await client.post("/v1/chat/completions", json=body(ledger, stream=False, user="simulate-error-500"))
        assert r.status_code == 500
        expected[r.headers["x-request-id"]] = {"outcome": "error", "usage": None, "status": 500}
        r = await client.post("/v1/chat/completions", json=body(ledger, stream=True, user="simulate-error-400"))
        assert r.status_code == 400
        expected[r.headers["x-request-id"]] = {"outcome": "error", "usage": None, "status": 400}
        # Cancelled mid-stream: the client leaves after the first chunk of a long answer.
        async with client.stream("POST", "/v1/chat/completions", json=body(ledger, stream=True, max_tokens=3000)) as s:
            await anext(s.aiter_bytes())
            # Charged what was generated before the client left (issue 13), not zero.
            expected[s.headers["x-request-id"]] = {"outcome": "cancelled", "charged": True}
    records = await wait_records(ledger, since, "ledger-a", len(expected))
    by_id: dict[str, list[UsageRecord]] = {}
    for record in records:
        by_id.setdefault(record.request_id, []).append(record)
    assert sorted(by_id) == sorted(expected), [(seen, rid in by_id) for rid, seen in expected.items()]
    for request_id, seen in expected.items():
        assert len(by_id[request_id]) == 1, request_id
        record = by_id[request_id][0]
        assert record.outcome == seen["outcome"], record
        assert record.model == ledger.model and record.priority == 6 and record.worker
        assert since <= record.time <= time.time()
        if "charged" in seen:
            assert record.completion_tokens > 0 and record.usage_reported
        elif "usage" in seen:
            usage = seen["usage"] or {"prompt_tokens": 0, "completion_tokens": 0}
            assert (record.prompt_tokens, record.completion_tokens) == (
                usage["prompt_tokens"],  # type: ignore[index]
                usage["completion_tokens"],  # type: ignore[index]
            )
            assert record.usage_reported is (seen["usage"] is not None)
        else:
            assert record.completion_tokens == seen["completion_tokens"] and record.usage_reported
        if "status" in seen:
            assert record.status == seen["status"]
        if seen["outcome"] == "ok":
            assert record.queue_wait is not None and 0 <= record.queue_wait <= record.duration
        if seen.get("stream") and seen["outcome"] == "ok":
            assert record.ttft is not None and record.queue_wait <= record.ttft <= record.duration  # type: ignore[operator]
    # No second record turns up later (e.g. from the cancellation).
    await asyncio.sleep(0.6)
    again = [r for r in await read_usage(STREAM_URL, ledger.stream, since) if r.token == "ledger-a"]  # type: ignore[attr-defined]
    assert len(again) == len(expected)


async def test_requests_refused_at_the_gateway_have_a_zero_token_record(ledger: Stack) -> None:
    since = time.time()
    secret = ledger.add_token("ledger-limited", priority=4, rpm=1)
    auth = {"Authorization": f"Bearer {secret}"}
    async with httpx.AsyncClient(base_url=ledger.gateway_url, headers=auth, timeout=30) as client:
        answered = await client.post("/v1/chat/completions", json=body(ledger, stream=True, max_tokens=3))
        refused = await client.post("/v1/chat/completions", json=body(ledger, stream=True, max_tokens=3))
    assert answered.status_code == 200 and refused.status_code == 429
    records = {r.request_id: r for r in await wait_records(ledger, since, "ledger-limited", 2)}
    record = records[refused.headers["x-request-id"]]
    assert (record.outcome, record.status, record.prompt_tokens, record.completion_tokens) == ("rejected", 429, 0, 0)
    assert (record.model, record.priority, record.stream, record.worker) == (ledger.model, 4, True, "gateway")
    assert records[answered.headers["x-request-id"]].outcome == "ok"
    (row,) = summarize(records.values())
    assert (row["requests"], row["ok"], row["rejected"], row["completion_tokens"]) == (2, 1, 1, 3)


def run_cli(stack: Stack, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_USAGE_STREAM_URL"] = STREAM_URL
    return subprocess.Popen(
        [sys.executable, "-m", "llmdispatch.cli", "usage", "--stream", stack.stream, *args],  # type: ignore[attr-defined]
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out


async def test_usage_cli_totals_per_token_and_model(ledger: Stack) -> None:
    start = time.time()
    secrets = {name: ledger.add_token(name, priority=2) for name in ("cli-x", "cli-y")}
    sent = {"cli-x": [5, 7, 11], "cli-y": [3]}
    prompt_tokens = {"cli-x": 0, "cli-y": 0}
    async with httpx.AsyncClient(base_url=ledger.gateway_url, timeout=30) as client:
        for name, lengths in sent.items():
            for n in lengths:
                r = await client.post(
                    "/v1/chat/completions",
                    json=body(ledger, stream=True, max_tokens=n),
                    headers={"Authorization": f"Bearer {secrets[name]}"},
                )
                prompt_tokens[name] += usage_chunk(r.content)["prompt_tokens"]  # type: ignore[index]
    await wait_records(ledger, start, "cli-y", 1)
    await wait_records(ledger, start, "cli-x", 3)
    since = str(start)
    # Several readers at once, in every format, while the stack runs.
    readers = [run_cli(ledger, "--since", since, "--json") for _ in range(3)]
    table = run_cli(ledger, "--since", since)
    as_csv = run_cli(ledger, "--since", since, "--csv")
    as_records = run_cli(ledger, "--since", since, "--records")
    outputs = [await asyncio.to_thread(finish, p) for p in readers]
    for out in outputs:
        assert json.loads(out) == json.loads(outputs[0])
    rows = {row["token"]: row for row in json.loads(outputs[0])}
    assert set(rows) == {"cli-x", "cli-y"}
    for name, lengths in sent.items():
        row = rows[name]
        assert row["model"] == ledger.model
        assert (row["requests"], row["ok"], row["errors"], row["cancelled"]) == (len(lengths), len(lengths), 0, 0)
        assert row["completion_tokens"] == sum(lengths)
        assert row["prompt_tokens"] == prompt_tokens[name]
        assert 0 < row["ttft_p50"] <= row["ttft_p95"]
    text = await asyncio.to_thread(finish, table)
    assert text.splitlines()[0].split()[:3] == ["TOKEN", "MODEL", "REQUESTS"]
    assert any(line.split()[:3] == ["cli-x", ledger.model, "3"] for line in text.splitlines())
    parsed = list(csv.DictReader(io.StringIO(await asyncio.to_thread(finish, as_csv))))
    assert {r["token"]: int(r["completion_tokens"]) for r in parsed} == {"cli-x": 23, "cli-y": 3}
    lines = [json.loads(line) for line in (await asyncio.to_thread(finish, as_records)).splitlines()]
    assert sorted((r["token"], r["completion_tokens"]) for r in lines) == [
        ("cli-x", 5), ("cli-x", 7), ("cli-x", 11), ("cli-y", 3),
    ]  # fmt: skip
    assert all(r["estimated"] is False and r["usage_reported"] and r["request_id"] for r in lines)
    # A window that ends before these requests holds none of them; one starting after them, neither.
    before = json.loads(await asyncio.to_thread(finish, run_cli(ledger, "--since", "1h", "--until", since, "--json")))
    assert not {r["token"] for r in before} & {"cli-x", "cli-y"}
    after = json.loads(await asyncio.to_thread(finish, run_cli(ledger, "--since", str(time.time()), "--json")))
    assert after == []


async def test_usage_cli_errors_clearly() -> None:
    missing = run_cli_raw("--stream", "no-such-stream-" + uuid.uuid4().hex[:6], "--since", "1h")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    bad = run_cli_raw("--stream", "x", "--since", "yesterday-ish")
    assert bad.returncode != 0 and "not a time" in bad.stderr


def run_cli_raw(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_USAGE_STREAM_URL"] = STREAM_URL
    return subprocess.run(
        [sys.executable, "-m", "llmdispatch.cli", "usage", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_time_parsing_and_percentiles() -> None:
    now = 1_800_000_000.0
    assert parse_time("1h", now) == now - 3600
    assert parse_time("30m", now) == now - 1800
    assert parse_time("7d", now) == now - 7 * 86400
    assert parse_time("2026-11-01", now) == 1_793_491_200.0  # midnight UTC
    assert parse_time("2026-11-01T01:00+01:00", now) == 1_793_491_200.0
    assert parse_time("1793491200.5", now) == 1_793_491_200.5
    with pytest.raises(ValueError):
        parse_time("soon")
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    records = [
        UsageRecord(
            request_id=str(i), token="t", model="m", priority=1, endpoint="completions", stream=True,
            outcome=outcome, status=200, prompt_tokens=2, completion_tokens=3, ttft=0.1 * (i + 1),
        )
        for i, outcome in enumerate(["ok", "ok", "error", "cancelled"])
    ]  # fmt: skip
    (row,) = summarize(records)
    assert row == {
        "token": "t", "model": "m", "requests": 4, "ok": 2, "errors": 1, "cancelled": 1, "rejected": 0,
        "estimated": 0, "prompt_tokens": 8, "completion_tokens": 12, "ttft_p50": 0.2, "ttft_p95": 0.4,
    }  # fmt: skip
    address = StreamAddress.parse("rabbitmq-stream://u%40x:p%2Fw@broker:5553/%2Fprod")
    assert (address.host, address.port, address.username, address.password, address.vhost) == (
        "broker", 5553, "u@x", "p/w", "/prod",
    )  # fmt: skip


def stream_arguments(name: str) -> str:
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl is not installed here")
    listing = subprocess.run(
        [rabbitmqctl, "list_queues", "-q", "name", "type", "arguments"], capture_output=True, text=True, timeout=30
    )
    return next(line for line in listing.stdout.splitlines() if line.startswith(name + "\t"))


async def test_ledger_creates_the_stream_with_the_retention_asked_and_never_blocks_in_an_outage(
    tmp_path: Path,
) -> None:
    name = "test-usage-" + uuid.uuid4().hex[:10]
    ledger = UsageLedger(STREAM_URL, name, max_age="7D", max_bytes=50_000_000, wal=tmp_path / "a.wal")
    since = time.time()
    record = UsageRecord(
        request_id="req-direct", token="direct", model="m", priority=1, endpoint="completions", stream=False,
        outcome="ok", status=200, prompt_tokens=4, completion_tokens=2, usage_reported=True, time=time.time(),
    )  # fmt: skip
    try:
        await ledger.start()
        ledger.record(record)
        await ledger.close()
        line = await asyncio.to_thread(stream_arguments, name)
        assert "stream" in line and '"x-max-age","7D"' in line and '"x-max-length-bytes",50000000' in line
        assert await read_usage(STREAM_URL, name, since) == [record]
    finally:
        await delete_stream(name)
    # Nobody listens on this port: recording never raises or blocks, and close() gives up in time,
    # keeping the records in the write-ahead log.
    dead = UsageLedger(
        f"rabbitmq-stream://guest:guest@127.0.0.1:{free_port()}/", name, max_age="1h", max_bytes=1000,
        wal=tmp_path / "b.wal",
    )  # fmt: skip
    await dead.start()
    started = time.monotonic()
    for _ in range(1000):
        dead.record(record)
    assert time.monotonic() - started < 1.0
    await dead.close(timeout=1.0)
    assert dead.pending == 1000 and len((tmp_path / "b.wal").read_bytes().splitlines()) == 1001

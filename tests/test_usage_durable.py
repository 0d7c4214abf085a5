"""The usage ledger keeps every record through crashes, broker restarts and outages, and counts each once.

Against the real stream plugin: the machine's broker (5552) and, for the restart, a private RabbitMQ
node with the stream plugin on its own ports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from llmdispatch.ledger import Ledger
from llmdispatch.usage import UsageRecord, read_usage, summarize, unique
from llmdispatch.wal import WriteAheadLog
from tests import rabbit_node
from tests.rabbit_node import RabbitNode
from tests.stack import STREAM_URL, Stack, delete_stream, free_port, run_sync


def make_record(request_id: str, token: str = "durable", tokens: int = 3, **fields: object) -> UsageRecord:
    values: dict[str, object] = {
        "request_id": request_id, "token": token, "model": "m", "priority": 1, "endpoint": "chat/completions",
        "stream": True, "outcome": "ok", "status": 200, "prompt_tokens": 5, "completion_tokens": tokens,
        "usage_reported": True, "time": time.time(),
    }  # fmt: skip
    values.update(fields)
    return UsageRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
def stream_name() -> Iterator[str]:
    name = "test-durable-" + uuid.uuid4().hex[:10]
    yield name
    run_sync(lambda: delete_stream(name))


def id_counts(records: list[UsageRecord]) -> Counter[str]:
    return Counter(record.request_id for record in records)


async def test_commit_waits_for_the_confirm_and_concurrent_commits_share_frames(
    stream_name: str, tmp_path: Path
) -> None:
    since = time.time()
    ledger = Ledger(STREAM_URL, stream_name, wal=tmp_path / "usage.wal")
    await ledger.start()
    try:
        assert await ledger.commit(make_record("first"))
        # Confirmed means stored: a reader sees it now, with nothing flushed or closed.
        assert [r.request_id for r in await read_usage(STREAM_URL, stream_name, since)] == ["first"]
        ids = [f"burst-{i}" for i in range(64)]
        results = await asyncio.gather(*(ledger.commit(make_record(i)) for i in ids))
        assert all(results) and ledger.pending == 0
        records = await read_usage(STREAM_URL, stream_name, since)
        assert id_counts(records) == Counter(["first", *ids])
        # The log only keeps what is unconfirmed: nothing, once closed, and the file is gone.
    finally:
        await ledger.close()
    assert not (tmp_path / "usage.wal").exists()


KILLED_LEDGER = textwrap.dedent(
    """
    import asyncio, sys, time
    from llmdispatch.ledger import Ledger
    from llmdispatch.usage import UsageRecord

    async def main() -> None:
        url, stream, wal, count, wait = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        ledger = Ledger(url, stream, wal=wal, commit_timeout=10)
        await ledger.start()
        records = [
            UsageRecord(request_id=f"killed-{i}", token="killed", model="m", priority=1, endpoint="completions",
                        stream=False, outcome="ok", status=200, completion_tokens=i, usage_reported=True,
                        time=time.time())
            for i in range(count)
        ]
        if wait == "confirmed":
            assert all(await asyncio.gather(*(ledger.commit(r) for r in records)))
        else:
            for r in records:
                ledger.record(r)
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def run_and_kill(url: str, stream: str, wal: Path, count: int, wait: str) -> None:
    """A process that writes ``count`` records, then dies by SIGKILL (no shutdown code runs)."""
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_LEDGER, url, stream, str(wal), str(count), wait],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


async def test_records_of_a_killed_process_are_replayed_once(stream_name: str, tmp_path: Path) -> None:
    since = time.time()
    wal = tmp_path / "usage.wal"
    # Confirmed, then SIGKILL: the log still lists them (not compacted yet); the replay is deduplicated.
    await asyncio.to_thread(run_and_kill, STREAM_URL, stream_name, wal, 40, "confirmed")
    assert len(await read_usage(STREAM_URL, stream_name, since)) == 40
    # Stream unreachable, then SIGKILL: only the log has them.
    dead = f"rabbitmq-stream://guest:guest@127.0.0.1:{free_port()}/"
    other = tmp_path / "other.wal"
    await asyncio.to_thread(run_and_kill, dead, stream_name, other, 25, "recorded")
    assert len(other.read_bytes().splitlines()) == 1 + 25  # header + one line per record
    for path, count in ((wal, 40), (other, 25)):
        ledger = Ledger(STREAM_URL, stream_name, wal=path)
        await ledger.start()
        assert ledger.pending == count  # replayed from the log
        assert await ledger.flush(20)
        await ledger.close()
    records = await read_usage(STREAM_URL, stream_name, since)
    expected = Counter([f"killed-{i}" for i in range(40)]) + Counter([f"killed-{i}" for i in range(25)])
    # The 40 confirmed ones are on the stream once, not twice (the stream dropped the replayed ids)...
    assert id_counts(records) == expected
    # ...and the 25 that reuse request ids of the first process (two processes, two publisher names)
    # are written, but the reader counts each request once.
    (row,) = summarize(records)
    assert row["requests"] == 40 and row["completion_tokens"] == sum(range(40))


async def test_side_by_side_processes_get_their_own_log_file(stream_name: str, tmp_path: Path) -> None:
    first = Ledger(STREAM_URL, stream_name, wal=tmp_path / "usage.wal")
    second = Ledger(STREAM_URL, stream_name, wal=tmp_path / "usage.wal")
    await first.start()
    await second.start()
    try:
        assert first.wal is not None and second.wal is not None
        assert first.wal.path != second.wal.path and first.publisher != second.publisher
        assert all(await asyncio.gather(first.commit(make_record("a")), second.commit(make_record("b"))))
    finally:
        await first.close()
        await second.close()


def gone(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not path.exists()


async def test_a_log_left_by_a_process_that_is_not_restarted_is_sent_by_a_neighbour(
    stream_name: str, tmp_path: Path
) -> None:
    since = time.time()
    wal = tmp_path / "usage.wal"
    holder = WriteAheadLog(wal, stream_name)  # a live neighbour holds usage.wal...
    holder.open()
    dead = f"rabbitmq-stream://guest:guest@127.0.0.1:{free_port()}/"
    await asyncio.to_thread(run_and_kill, dead, stream_name, wal, 30, "recorded")  # ...so this one used usage.wal.1
    orphan = tmp_path / "usage.wal.1"
    assert len(orphan.read_bytes().splitlines()) == 1 + 30
    holder.close(remove=True)
    ledger = Ledger(STREAM_URL, stream_name, wal=wal)
    await ledger.start()
    try:
        assert await ledger.commit(make_record("own"))
        assert await asyncio.to_thread(gone, orphan, 20)
    finally:
        await ledger.close()
    expected = Counter(["own", *(f"killed-{i}" for i in range(30))])
    assert id_counts(await read_usage(STREAM_URL, stream_name, since)) == expected


def test_the_log_keeps_ids_across_restarts_and_skips_torn_lines_and_other_streams(tmp_path: Path) -> None:
    path = tmp_path / "usage.wal"
    log = WriteAheadLog(path, "s1")
    assert log.open() == []
    assert [log.append(b'{"n":1}'), log.append(b'{"n":2}')] == [1, 2]
    with path.open("ab") as f:
        f.write(b'3 {"n":3')  # a write cut short by a crash: no newline
    log.close(remove=False)
    again = WriteAheadLog(path, "s1")
    assert again.open() == [(1, b'{"n":1}'), (2, b'{"n":2}')]
    assert again.publisher == log.publisher and again.append(b'{"n":4}') == 3  # same name, ids go on
    again.compact(())  # all confirmed: the header keeps the name and the next id
    again.close(remove=False)
    third = WriteAheadLog(path, "s1")
    assert third.open() == [] and third.next_id == 4 and third.publisher == log.publisher
    # Another stream's process never takes this file, even when it is free.
    other = WriteAheadLog(path, "s2")
    assert other.open() == [] and other.path == tmp_path / "usage.wal.1"
    third.close(remove=True)
    other.close(remove=True)
    assert not path.exists()


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_an_outage_longer_than_the_bound_keeps_every_record_and_reports_full(
    stream_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented behaviour: nothing is dropped; beyond DISPATCHER_USAGE_WAL_MAX_BYTES the ledger is
    ``full`` (metric, error log line; the worker stops taking requests); a commit never hangs."""
    caplog.set_level(logging.WARNING, "dispatcher.usage.ledger")
    wal = tmp_path / "usage.wal"
    dead = f"rabbitmq-stream://guest:guest@127.0.0.1:{free_port()}/"
    ledger = Ledger(dead, stream_name, wal=wal, max_pending_bytes=20_000, commit_timeout=0.3)
    since = time.time()
    await ledger.start()
    records = [make_record(f"outage-{i}", tokens=i) for i in range(100)]  # ~300 bytes each
    try:
        started = time.monotonic()
        assert not await ledger.commit(records[0])  # bounded: gives up after its timeout
        assert time.monotonic() - started < 5
        for record in records[1:]:
            ledger.record(record)
        assert ledger.full and metric("dispatcher_usage_ledger_full") == 1
        assert metric("dispatcher_usage_ledger_pending_records") == 100
        assert "exceed the bound" in caplog.text and "unreachable" in caplog.text
    finally:
        await ledger.close(timeout=0.5)
    assert len(wal.read_bytes().splitlines()) == 1 + 100  # all kept
    # The stream is back (here: a process with the same log and a reachable stream).
    ledger = Ledger(STREAM_URL, stream_name, wal=wal, max_pending_bytes=20_000)
    await ledger.start()
    assert ledger.full
    try:
        assert await ledger.flush(20)
        assert not ledger.full and metric("dispatcher_usage_ledger_full") == 0
    finally:
        await ledger.close()
    assert id_counts(await read_usage(STREAM_URL, stream_name, since)) == Counter(r.request_id for r in records)


# -- a broker restart in the middle of a burst -------------------------------------------------


@pytest.fixture(scope="module")
def stream_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    if not rabbit_node.available():
        pytest.skip("rabbitmq-server is not installed")
    node = RabbitNode(tmp_path_factory.mktemp("stream-node"))
    # This node's own stream listener (the machine's broker keeps 5552).
    node.stream_port = free_port()  # type: ignore[attr-defined]
    with (node.base / "rabbitmq.conf").open("a") as conf:
        conf.write(
            f"stream.listeners.tcp.1 = 127.0.0.1:{node.stream_port}\n"  # type: ignore[attr-defined]
            "stream.advertised_host = 127.0.0.1\n"
            f"stream.advertised_port = {node.stream_port}\n"  # type: ignore[attr-defined]
        )
    (node.base / "enabled_plugins").write_text("[rabbitmq_stream].\n")
    try:
        node.start(timeout=90)
        wait_port(node.stream_port)  # type: ignore[attr-defined]
        yield node
    finally:
        node.close()


def wait_port(port: int, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.mark.slow
async def test_broker_restart_mid_burst_loses_nothing_and_writes_nothing_twice(
    stream_node: RabbitNode, tmp_path: Path
) -> None:
    url = f"rabbitmq-stream://guest:guest@127.0.0.1:{stream_node.stream_port}/"  # type: ignore[attr-defined]
    stream = "restart-" + uuid.uuid4().hex[:8]
    ledger = Ledger(url, stream, wal=tmp_path / "usage.wal", commit_timeout=0.5)
    await ledger.start()
    since = time.time()
    ids = [f"restart-{i}" for i in range(400)]
    outcomes: list[bool] = []
    underway = asyncio.Event()

    async def burst() -> None:
        # 8 requests ending every 10 ms, like a busy worker.
        for start in range(0, len(ids), 8):
            outcomes.extend(await asyncio.gather(*(ledger.commit(make_record(i)) for i in ids[start : start + 8])))
            if len(outcomes) >= 80:
                underway.set()
            await asyncio.sleep(0.01)

    try:
        assert await ledger.commit(make_record("warm-up"))
        writer = asyncio.create_task(burst())
        await underway.wait()
        await asyncio.to_thread(stream_node.restart)
        await asyncio.to_thread(wait_port, stream_node.stream_port)  # type: ignore[attr-defined]
        await writer
        assert await ledger.flush(60), f"{ledger.pending} records still unconfirmed"
    finally:
        await ledger.close()
    assert not all(outcomes)  # some commits did time out during the restart (and were sent later)
    records = await read_usage(url, stream, since)
    counts = id_counts(records)
    assert set(counts) == {"warm-up", *ids}  # nothing lost
    assert max(counts.values()) == 1  # nothing written twice: the stream deduplicated the resends
    assert len(unique(records)) == len(ids) + 1


# -- end to end: the worker is killed right after a burst of answered requests ---------------------


def answered_burst(stack: Stack, secret: str, count: int) -> list[str]:
    """``count`` streamed requests at once, every one answered to the end; their request ids."""

    async def one(client: httpx.AsyncClient, n: int) -> str:
        body = {
            "model": stack.model, "messages": [{"role": "user", "content": f"burst {n}"}],
            "max_tokens": 4, "stream": True,
        }  # fmt: skip
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n"), r.content[-200:]
        return r.headers["x-request-id"]

    async def run() -> list[str]:
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=stack.gateway_url, headers=headers, timeout=30) as client:
            return list(await asyncio.gather(*(one(client, n) for n in range(count))))

    return run_sync(run)


def wait_replayed(metrics_url: str, count: int, timeout: float = 20.0) -> None:
    """Until the worker has replayed ``count`` records from its log and the stream confirmed them all."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(metrics_url, timeout=30).text
        except httpx.HTTPError:  # a busy test machine
            continue
        if (
            f'dispatcher_usage_ledger_records_total{{result="replayed"}} {float(count)}' in text
            and "dispatcher_usage_ledger_pending_records 0.0" in text
        ):
            return
        time.sleep(0.2)
    raise AssertionError("no replay: " + "\n".join(line for line in text.splitlines() if "ledger" in line))


@pytest.mark.slow
async def test_kill_9_right_after_answers_loses_no_record(stream_name: str, tmp_path: Path) -> None:
    wal = tmp_path / "worker-usage.wal"
    stack = Stack(
        tmp_path,
        env={
            "DISPATCHER_USAGE_STREAM_URL": STREAM_URL,
            "DISPATCHER_USAGE_STREAM_NAME": stream_name,
            "DISPATCHER_USAGE_WAL": str(wal),
        },
    )
    try:
        stack.start_simulator(max_num_seqs=32, decode_ms=5)
        worker = stack.start_worker(max_concurrency=20)
        stack.start_gateway()
        secret = stack.add_token("kill-nine", priority=3)
        since = time.time()
        answered = await asyncio.to_thread(answered_burst, stack, secret, 20)
        os.kill(worker.popen.pid, signal.SIGKILL)  # at once: no shutdown code runs
        worker.popen.wait()
        # Every answered request is on the stream already: its record was confirmed before [DONE].
        records = [r for r in await read_usage(STREAM_URL, stream_name, since) if r.token == "kill-nine"]
        assert id_counts(records) == Counter(answered)
        # A new worker on the same log replays what the killed one had not compacted: still once each.
        restarted = stack.start_worker(max_concurrency=4)
        await asyncio.to_thread(wait_replayed, restarted.url + "/metrics", len(answered))  # type: ignore[attr-defined]
        records = [r for r in await read_usage(STREAM_URL, stream_name, since) if r.token == "kill-nine"]
        assert id_counts(records) == Counter(answered)
    finally:
        stack.close()


@pytest.mark.slow
async def test_a_worker_whose_stream_is_gone_too_long_stops_taking_requests_and_loses_nothing(
    stream_name: str, tmp_path: Path
) -> None:
    """The documented outage behaviour, end to end: requests are still answered while the log fills
    (each end waits DISPATCHER_USAGE_COMMIT_TIMEOUT, no longer); beyond DISPATCHER_USAGE_WAL_MAX_BYTES the
    worker takes no new request (it waits in RabbitMQ); a worker with the stream back replays the log."""
    wal = tmp_path / "worker-usage.wal"
    common = {"DISPATCHER_USAGE_STREAM_NAME": stream_name, "DISPATCHER_USAGE_WAL": str(wal)}
    dead = f"rabbitmq-stream://guest:guest@127.0.0.1:{free_port()}/"
    stack = Stack(tmp_path, env=common)
    try:
        stack.start_simulator(max_num_seqs=8, decode_ms=5)
        worker = stack.start_worker(
            max_concurrency=2,
            env={
                "DISPATCHER_USAGE_STREAM_URL": dead,
                "DISPATCHER_USAGE_WAL_MAX_BYTES": "1500",  # about 4 records
                "DISPATCHER_USAGE_COMMIT_TIMEOUT": "0.3",
            },
        )
        stack.start_gateway()
        secret = stack.add_token("outage", priority=3)
        since = time.time()
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with httpx.AsyncClient(base_url=stack.gateway_url, headers=auth, timeout=60) as client:
            answered = []
            for _ in range(5):
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200
                answered.append(r.headers["x-request-id"])
            metrics = (await client.get(worker.url + "/metrics")).text  # type: ignore[attr-defined]
            assert "dispatcher_usage_ledger_full 1.0" in metrics
            assert "exceed the bound" in worker.log()
            # Full: the next request waits in the queue instead of being served.
            waiting = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            done, _ = await asyncio.wait((waiting,), timeout=3)
            assert not done
            # The stream is back (a worker that can reach it, on the same log): the backlog is sent,
            # and the waiting request is served.
            worker.stop()
            stack.start_worker(max_concurrency=2, env={"DISPATCHER_USAGE_STREAM_URL": STREAM_URL})
            r = await waiting
            assert r.status_code == 200
            answered.append(r.headers["x-request-id"])
        deadline = time.monotonic() + 20
        while True:
            records = [r for r in await read_usage(STREAM_URL, stream_name, since) if r.token == "outage"]
            if len(records) >= len(answered) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert id_counts(records) == Counter(answered)
    finally:
        stack.close()

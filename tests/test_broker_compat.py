"""Nothing RabbitMQ 4.3 denies by default: every AMQP method gateway and worker send, recorded and checked.

The machine's broker is 3.10, which still accepts the deprecated features; so the check is on the
wire: an AMQP proxy (tests/amqp_audit.py) records what the clients send during a realistic run,
and ``deprecated_uses`` fails on what 4.3 would refuse. A known-bad client proves the checker sees it.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import httpx
import pytest

from tests.amqp_audit import AuditProxy, Summary, broker_closes, deprecated_uses
from tests.faults import chat, post, read_stream, until_event
from tests.stack import AMQP_URL, Stack


def _broker_port() -> int:
    return urlsplit(AMQP_URL.split(",")[0]).port or 5672


@pytest.fixture
def audit() -> Iterator[AuditProxy]:
    proxy = AuditProxy(_broker_port()).open()
    try:
        yield proxy
    finally:
        proxy.close()


async def test_checker_sees_what_rabbitmq_4_3_denies(audit: AuditProxy) -> None:
    """A client using the denied features, one doing the same things the allowed way."""
    name = "audit-" + uuid.uuid4().hex[:8]
    legacy = {"x-queue-master-locator": "min-masters", "x-queue-mode": "lazy", "x-queue-version": 1}
    bad = await aio_pika.connect(audit.url(), client_properties={"connection_name": "known-bad"})
    good = await aio_pika.connect(audit.url(), client_properties={"connection_name": "known-good"})
    try:
        channel = await bad.channel()
        await channel.set_qos(prefetch_count=4, global_=True)
        await channel.declare_queue(name + "-transient", durable=False)
        await channel.declare_queue(name + "-legacy", durable=True, arguments=legacy)

        channel = await good.channel()
        await channel.set_qos(prefetch_count=4)  # per consumer
        await channel.declare_queue(exclusive=True)  # server-named, exclusive: allowed
        await channel.declare_queue(name + "-legacy", passive=True)  # a check, not a declaration
        await channel.declare_queue(name + "-durable", durable=True, arguments={"x-max-priority": 10})
    finally:
        channel = await good.channel()
        for suffix in ("-transient", "-legacy", "-durable"):
            await channel.queue_delete(name + suffix)
        await bad.close()
        await good.close()
    await asyncio.sleep(0.1)  # the proxy's thread records the last frames

    methods = audit.recorded()
    found = deprecated_uses(methods)
    assert not audit.errors
    assert {v.method.connection_name for v in found} == {"known-bad"}, "\n".join(map(str, found))
    assert sorted(v.feature for v in found) == [
        "classic_queue_v1",
        "global_qos",
        "queue_master_locator",
        "transient_nonexcl_queues",
    ]
    # The good client's methods were seen too (the checker judged them, it did not miss them).
    good_names = {m.name for m in methods if m.connection_name == "known-good"}
    assert {"Basic.Qos", "Queue.Declare", "Queue.Delete"} <= good_names


@pytest.fixture
def audited_stack(tmp_path: Path, audit: AuditProxy) -> Iterator[tuple[Stack, AuditProxy]]:
    stack = Stack(tmp_path, amqp_url=audit.url(), env={"DISPATCHER_HEARTBEAT_INTERVAL": "0.5"})
    try:
        stack.serve(max_num_seqs=4, max_concurrency=2, token="compat")
        yield stack, audit
    finally:
        stack.close()


async def test_gateway_and_worker_use_nothing_rabbitmq_4_3_denies(audited_stack: tuple[Stack, AuditProxy]) -> None:
    stack, audit = audited_stack
    token = stack.token
    async with httpx.AsyncClient(timeout=30) as http:
        streamed = await read_stream(http, stack, chat("compat-stream", 8, model=stack.model), token)
        whole = await post(http, stack, chat("compat-whole", 8, model=stack.model, stream=False), token)
        # A client that hangs up mid-stream: the cancel path (control messages) runs too.
        cancelled = await read_stream(http, stack, chat("compat-cancel", 2000, model=stack.model), token, stop_after=3)
        await until_event(http, stack, "compat-cancel", "aborted")
        # A worker restart: its queues, QoS and consumers are declared again by a new process.
        old = next(p for p in stack.processes if p.name == "worker")
        await asyncio.to_thread(old.stop, signal.SIGTERM)
        await asyncio.to_thread(stack.start_worker, 2)
        await asyncio.to_thread(stack.wait_model)
        after = await read_stream(http, stack, chat("compat-after", 8, model=stack.model), token)
    await asyncio.sleep(0.2)

    methods = audit.recorded()
    summary = Summary.of(methods)
    print("\nAMQP methods seen:\n" + str(summary))
    assert streamed.done and not streamed.errors and whole.status_code == 200, (streamed.events, whole.text)
    assert len(cancelled.events) >= 3 and after.done and not after.errors
    assert not audit.errors
    # The run really went through the proxy: both sides' connections and their traffic were recorded.
    names = set(summary.counts)
    assert any(n.startswith("dispatcher-gateway") for n in names), names
    assert sum(n.startswith("dispatcher-worker") for n in names) >= 2, names  # the old and the new worker
    sent = {m.name for m in methods if m.from_client}
    assert {"Basic.Consume", "Basic.Publish", "Queue.Declare", "Basic.Ack"} <= sent, sent
    found = deprecated_uses(methods)
    assert not found, "RabbitMQ 4.3 would refuse:\n" + "\n".join(sorted({str(v) for v in found}))
    assert not broker_closes(methods), broker_closes(methods)

"""Delivery through single faults (issue 10), against the machine's broker and real processes.

One simulator, one worker and one gateway (one process) for the module; worker and gateway reach
RabbitMQ through their own TCP proxies (tests/faults.py), which can reset or stall their links, and
``rabbitmqctl close_connection`` cuts them broker-side. Every fault is judged the same way:
- the client's stream is the direct run's stream (ids and timestamps aside) or its beginning followed
  by one OpenAI-style error event (``faults.judge``); the chunk id never changes; nothing hangs;
- the simulator's event log shows no generation going on more than ``NOBODY_LIMIT`` after its client
  vanished, and no request generated to the end twice (``work_for_nobody``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.faults import (
    StreamResult,
    TcpProxy,
    broker_connections,
    chat,
    close_broker_connections,
    direct_stream,
    judge,
    post,
    read_stream,
    sim_log,
    stream_with_reference,
    until,
    until_event,
)
from tests.stack import AMQP_URL, Process, Stack, wait_http

IDLE_TIMEOUT = 3.0
STALL_TIMEOUT = 1.5
# The bound on generation for nobody is 1 s; 0.5 s more is scheduling slack on a 2-core box
# that runs several test suites at once. Each test prints what it measured.
NOBODY_LIMIT = 1.5
PUBLISH_TIMEOUT = 2.0
TOKENS = 200  # 2 s of generation at 10 ms a token: long enough to cut it in the middle
SLOTS = 2  # per worker
HANG_AFTER = TOKENS * 0.011 + IDLE_TIMEOUT + 4.0


def seeded(user: str, max_tokens: int = TOKENS, *, model: str, stream: bool = True) -> dict[str, Any]:
    """A request whose answer is the same on every run (the simulator's text depends on the seed)."""
    return {**chat(user, max_tokens, model=model, stream=stream), "seed": 7}


@dataclass
class Rig:
    stack: Stack
    worker_proxy: TcpProxy
    gateway_proxy: TcpProxy
    workers: list[Process] = field(default_factory=list)
    gateways: list[Process] = field(default_factory=list)

    @property
    def token(self) -> str:
        return self.stack.token

    def start_worker(self) -> Process:
        worker = self.stack.start_worker(SLOTS, env={"DISPATCHER_AMQP_URL": self.worker_proxy.url})
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[Process]:
        return [w for w in self.workers if w.alive()]

    def holder(self) -> Process:
        """The one worker serving the single request in flight."""
        busy = [w for w in self.live_workers() if _free_slots(w) < SLOTS]
        assert len(busy) == 1, f"expected one worker to hold the request, found {len(busy)}"
        return busy[0]

    def start_gateway(self) -> Process:
        gateway = self.stack.start_gateway(env={"DISPATCHER_AMQP_URL": self.gateway_proxy.url})
        gateway.url = self.stack.gateway_url  # type: ignore[attr-defined]
        self.gateways.append(gateway)
        return gateway


def _proxy_url(proxy: TcpProxy) -> str:
    parts = urlsplit(AMQP_URL.split(",")[0])
    return f"{parts.scheme}://{parts.username}:{parts.password}@127.0.0.1:{proxy.port}{parts.path or '/'}"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    broker_port = urlsplit(AMQP_URL.split(",")[0]).port or 5672
    worker_proxy, gateway_proxy = TcpProxy(broker_port).open(), TcpProxy(broker_port).open()
    worker_proxy.url = _proxy_url(worker_proxy)  # type: ignore[attr-defined]
    gateway_proxy.url = _proxy_url(gateway_proxy)  # type: ignore[attr-defined]
    stack = Stack(
        tmp_path_factory.mktemp("delivery"),
        env={
            "DISPATCHER_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
            "DISPATCHER_GATEWAY_LIVENESS_TIMEOUT": "0.8",  # a crashed gateway's work stops within 1 s
            "DISPATCHER_HEARTBEAT_INTERVAL": "0.5",
            "DISPATCHER_VLLM_STALL_TIMEOUT": str(STALL_TIMEOUT),
            "DISPATCHER_GATEWAY_WORKERS": "1",  # one process: its broker connections are its own
            "DISPATCHER_PRIORITY_HEADROOM": "0",  # one lane: a worker runs SLOTS requests at once
            "DISPATCHER_QUEUE_TIMEOUT": "30",
            "DISPATCHER_PUBLISH_TIMEOUT": str(PUBLISH_TIMEOUT),
        },
    )
    rig = Rig(stack, worker_proxy, gateway_proxy)
    try:
        stack.start_simulator(max_num_seqs=8, decode_ms=10)
        # Two workers: one takes the redelivery when the other dies. Started one after the other: on
        # a loaded 2-core box, processes started together miss their 20 s start-up limit.
        rig.start_worker()
        rig.start_worker()
        rig.start_gateway()
        stack.token = stack.add_token("delivery", priority=5)
        yield rig
    finally:
        try:
            stack.close()
        finally:
            worker_proxy.close()
            gateway_proxy.close()


# -- judging the simulator's log ---------------------------------------------------------------------


async def work_for_nobody(
    http: httpx.AsyncClient, stack: Stack, user: str, *, verdict: str, vanished_at: float
) -> tuple[list[str], float]:
    """Problems in the simulator's log for ``user``'s requests, and the longest generation for nobody.

    A client whose stream completed was answered by the one request that finished; every other
    copy (a redelivery) must be aborted within ``NOBODY_LIMIT`` of its start. A client whose stream
    ended in an error vanished at ``vanished_at``: all its requests must end by then plus the limit.
    """
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def settled() -> bool:
        by_id.clear()
        for entry in await sim_log(http, stack):
            if entry["user"] == user:
                by_id[entry["request_id"]].append(entry)
        return all(e[-1]["event"] in ("finished", "aborted") for e in by_id.values())

    # Wait for every copy to end, but no longer than the limit allows (a late end is a finding).
    deadline = max(time.monotonic(), vanished_at) + NOBODY_LIMIT + 0.5
    while not await settled() and time.monotonic() < deadline:  # noqa: ASYNC110 - polling another process
        await asyncio.sleep(0.05)
    problems: list[str] = []
    finished = [rid for rid, events in by_id.items() if events[-1]["event"] == "finished"]
    if verdict == "complete":
        if len(finished) != 1:
            problems.append(f"{len(finished)} copies generated to the end (want 1)")
        answered = finished[0] if finished else None
    else:
        answered = None
    worst = 0.0
    for rid, events in by_id.items():
        if rid == answered:
            continue
        begin = max(events[0]["t"], vanished_at if verdict == "error" else 0.0)
        end = events[-1]
        if end["event"] not in ("finished", "aborted"):
            problems.append(f"{rid}: still generating {time.monotonic() - begin:.2f} s for nobody")
            continue
        worst = max(worst, end["t"] - begin)
        if end["t"] - begin > NOBODY_LIMIT:
            problems.append(f"{rid}: {end['event']} {end['t'] - begin:.2f} s after its client vanished")
    return problems, worst


async def judged(
    http: httpx.AsyncClient,
    rig: Rig,
    result: StreamResult,
    reference: StreamResult,
    user: str,
    vanished_at: float | None = None,
) -> str:
    """``judge`` the stream, then the simulator's log. The client vanished when it got its error,
    or earlier (``vanished_at``) when the fault itself took the listener away (a gateway cut off)."""
    verdict = judge(result, reference)
    vanished = result.ended_at if vanished_at is None else min(vanished_at, result.ended_at)
    problems, worst = await work_for_nobody(http, rig.stack, user, verdict=verdict, vanished_at=vanished)
    print(f"\n{user}: {verdict}, {len(result.data)} chunks, longest generation for nobody {worst:.2f} s")
    assert not problems, problems
    return verdict


def _free_slots(worker: Process) -> int:
    try:
        with urllib.request.urlopen(worker.url + "/ready", timeout=2) as response:  # type: ignore[attr-defined]
            return int(json.loads(response.read())["free_slots"])
    except urllib.error.HTTPError as exc:
        return int(json.loads(exc.read())["free_slots"])


async def mid_stream(http: httpx.AsyncClient, rig: Rig, user: str) -> asyncio.Task[tuple[StreamResult, StreamResult]]:
    """Start ``user``'s stream (and its direct reference) and return once it is generating: the
    moment to inject a fault."""
    stack = rig.stack
    streaming = asyncio.create_task(
        stream_with_reference(http, stack, seeded(user, model=stack.model), rig.token, HANG_AFTER)
    )
    await until_event(http, stack, user, "started")
    await asyncio.sleep(0.3)
    return streaming


async def answered_after(http: httpx.AsyncClient, stack: Stack, token: str, user: str, timeout: float = 20) -> None:
    """The system serves again after the fault (retrying while it reconnects)."""
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        response = await post(http, stack, seeded(user, 3, model=stack.model, stream=False), token)
        status = response.status_code
        if status == 200:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"not served {timeout} s after the fault (last status {status})")


# -- connections cut ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["broker-close", "proxy-reset"])
async def test_worker_connection_cut_mid_stream_never_repeats(rig: Rig, how: str) -> None:
    """The issue's duplicated answer: the worker reconnects, the broker redelivers, and the gateway
    must not splice the second attempt onto the first. Nor may the redelivery call the server at all:
    its gateway refuses it before it starts (no tokens for nobody, no second ledger record)."""
    stack = rig.stack
    user = f"cut-worker-{how}"
    known = await asyncio.to_thread(broker_connections) if how == "broker-close" else []
    async with httpx.AsyncClient(timeout=60) as http:
        streaming = await mid_stream(http, rig, user)
        links = rig.worker_proxy.links_of(rig.holder().popen.pid)
        cut_at = time.monotonic()
        if how == "broker-close":
            # The consuming connection (the one holding the unacked delivery); "-out" publishes replies.
            ports = {link.upstream_port for link in links}
            closed = await asyncio.to_thread(
                close_broker_connections, ports, "test: cut", only=lambda name: not name.endswith("-out"), known=known
            )
            assert closed, "no worker connection found on the broker"
        else:
            assert rig.worker_proxy.reset(links) >= 1
        result, reference = await streaming
        print(f"\nworker link cut ({how}): the stream ended {result.ended_at - cut_at:.2f} s after the cut")
        verdict = await judged(http, rig, result, reference, user)
        await answered_after(http, stack, rig.token, user + "-after")
        await redelivery_settled(rig)
        calls = [e for e in await sim_log(http, stack) if e["user"] == user and e["event"] == "queued"]
        print(f"{user}: the server got the request {len(calls)} time(s)")
        if verdict == "error":  # output reached the client: the redelivery is refused before it starts
            assert len(calls) == 1, calls


async def redelivery_settled(rig: Rig) -> None:
    """The broker's redelivery of a cut worker's message was dequeued and settled: nothing waits in
    the queue and every worker has all its slots free."""

    async def idle() -> bool:
        if await rig.stack.queued():
            return False
        slots = await asyncio.gather(*(asyncio.to_thread(_free_slots, w) for w in rig.live_workers()))
        return all(free == SLOTS for free in slots)

    await until(idle, timeout=10, what="the redelivery settled")


async def test_gateway_connection_cut_mid_stream_aborts_vllm(rig: Rig) -> None:
    """The gateway loses its broker connections: its client ends cleanly (or is served whole), and
    a worker that generates for the cut-off gateway stops within the limit."""
    stack, gateway = rig.stack, rig.gateways[0]
    user = "cut-gateway"
    known = await asyncio.to_thread(broker_connections)
    async with httpx.AsyncClient(timeout=60) as http:
        streaming = await mid_stream(http, rig, user)
        ports = {link.upstream_port for link in rig.gateway_proxy.links_of(gateway.popen.pid)}
        cut_asked = time.monotonic()
        closed = await asyncio.to_thread(close_broker_connections, ports, "test: cut", known=known)
        cut_done = time.monotonic()
        assert closed, "no gateway connection found on the broker"
        result, reference = await streaming
        # rabbitmqctl takes a second or more to start, so the cut falls somewhere in between; the
        # gateway ends its client's stream as soon as it sees its reply connection go.
        print(
            f"\ngateway link cut: rabbitmqctl ran {cut_done - cut_asked:.2f} s; "
            f"the stream ended {result.ended_at - cut_done:+.2f} s after it returned"
        )
        if judge(result, reference) == "error":
            assert result.ended_at - cut_done < NOBODY_LIMIT, "the gateway was slow to notice its cut link"
        # Cutting the gateway off is its client vanishing, as far as the worker can know: the
        # worker must stop within the limit of the stream's end (the latest the cut can have been).
        await judged(http, rig, result, reference, user, min(result.ended_at, cut_done))
        await answered_after(http, stack, rig.token, user + "-after")


async def test_publish_to_a_stalled_broker_gives_up_with_503(rig: Rig) -> None:
    """The gateway's broker link black-holes (a proxy stops forwarding, the socket stays open): a
    request's publish is never confirmed, and the client gets a 503 after the publish timeout rather
    than hanging; requests are served again once the link recovers."""
    stack, gateway = rig.stack, rig.gateways[0]
    links = rig.gateway_proxy.links_of(gateway.popen.pid)
    async with httpx.AsyncClient(timeout=60) as http:
        stalled_at = time.monotonic()
        assert rig.gateway_proxy.stall(links) >= 1
        try:
            response = await post(http, stack, seeded("stalled-publish", 3, model=stack.model), rig.token)
        finally:
            rig.gateway_proxy.resume(links)
        waited = time.monotonic() - stalled_at
        print(f"\nstalled broker link: {response.status_code} after {waited:.2f} s")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["message"] == (
            "The message broker is not accepting requests right now; retry later."
        )
        assert PUBLISH_TIMEOUT <= waited < PUBLISH_TIMEOUT + 3
        await answered_after(http, stack, rig.token, "stalled-publish-after")


async def test_requests_right_after_a_gateway_reconnect_are_served(rig: Rig) -> None:
    """The gateway's links reset: the requests it accepts as soon as it has reconnected are served
    (or refused at once), never left waiting for a worker that ignores the new gateway."""
    stack, gateway = rig.stack, rig.gateways[0]
    old = rig.gateway_proxy.links_of(gateway.popen.pid)
    assert rig.gateway_proxy.reset(old) >= 1

    def reconnected() -> bool:
        links = rig.gateway_proxy.links_of(gateway.popen.pid)
        return len(links) >= len(old) and not set(map(id, links)) & set(map(id, old))

    async with httpx.AsyncClient(timeout=60) as http:
        await until(reconnected, 20, "the gateway reconnected")
        # Its links are up again; it says it is ready once they are set up (as a load balancer sees it).
        await until(lambda: httpx.get(stack.gateway_url + "/ready", timeout=2).status_code == 200, 20, "ready")
        bodies = [seeded(f"reconnect-{i}", 5, model=stack.model, stream=False) for i in range(3)]
        started = time.monotonic()
        answers = await asyncio.wait_for(
            asyncio.gather(*(post(http, stack, body, rig.token) for body in bodies)), HANG_AFTER
        )
    print(f"\nright after the gateway reconnected: {[a.status_code for a in answers]} "
          f"in {time.monotonic() - started:.2f} s")  # fmt: skip
    for answer in answers:
        assert answer.status_code in (200, 503), answer.text  # 503: refused at once, with a clear error
        if answer.status_code == 503:
            assert answer.json()["error"]["message"]
    assert any(a.status_code == 200 for a in answers), [a.text for a in answers]


async def test_worker_link_stalled_mid_stream(rig: Rig) -> None:
    """A black-holed worker link (no RST, no FIN): the client gets an error within the idle timeout,
    and the worker, which no longer hears the gateway, stops generating."""
    stack = rig.stack
    user = "stall-worker-link"
    async with httpx.AsyncClient(timeout=60) as http:
        streaming = await mid_stream(http, rig, user)
        links = rig.worker_proxy.links_of(rig.holder().popen.pid)
        stalled_at = time.monotonic()
        assert rig.worker_proxy.stall(links) >= 1
        try:
            result, reference = await streaming
        finally:
            rig.worker_proxy.resume(links)
        print(f"\nstalled link: the stream ended {result.ended_at - stalled_at:.2f} s after the stall")
        assert result.ended_at - stalled_at < IDLE_TIMEOUT + 2.0
        await judged(http, rig, result, reference, user)
        await answered_after(http, stack, rig.token, user + "-after")


# -- vLLM stalled, killed, restarted ------------------------------------------------------------------


def _simulator(stack: Stack) -> Process:
    return next(p for p in reversed(stack.processes) if p.name == "simulator" and p.alive())


async def test_vllm_stalled_is_aborted_and_reported(rig: Rig) -> None:
    """SIGSTOP the simulator mid-stream: no bytes for the stall timeout, the worker gives up and says so."""
    stack = rig.stack
    user = "vllm-stalled"
    simulator = _simulator(stack)
    async with httpx.AsyncClient(timeout=60) as http:
        # The direct run first: the stop would freeze it too.
        reference = await direct_stream(http, stack, seeded(user, model=stack.model))
        reading = asyncio.create_task(read_stream(http, stack, seeded(user, model=stack.model), rig.token))
        await until_event(http, stack, user, "started")
        await asyncio.sleep(0.3)
        os.kill(simulator.popen.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            result = await asyncio.wait_for(reading, STALL_TIMEOUT + IDLE_TIMEOUT + 4)
        finally:
            os.kill(simulator.popen.pid, signal.SIGCONT)
        print(f"\nvLLM stalled: the client got its error {result.ended_at - stopped_at:.2f} s after the stop "
              f"(stall timeout {STALL_TIMEOUT} s)")  # fmt: skip
        assert judge(result, reference) == "error"
        # The worker closed its vLLM request: the simulator, running again, aborts it at once.
        await until_event(http, stack, user, "aborted", timeout=5)
        log = [e for e in await sim_log(http, stack) if e["user"] == user]
        assert "finished" not in [e["event"] for e in log], log
        await answered_after(http, stack, rig.token, user + "-after")


async def test_vllm_restart_serves_the_backlog(rig: Rig) -> None:
    """vLLM dies with requests running and a backlog queued, and comes back: the running ones end
    cleanly (or complete), the backlog is served once vLLM is back, with 0 failures."""
    stack = rig.stack
    simulator = _simulator(stack)
    port = stack.simulator_url.rsplit(":", 1)[1]
    slots = sum(_free_slots(w) for w in rig.live_workers())
    running_bodies = [seeded(f"restart-run-{i}", model=stack.model) for i in range(slots)]
    backlog_bodies = [seeded(f"restart-backlog-{i}", 20, model=stack.model, stream=i % 2 == 0) for i in range(6)]
    async with httpx.AsyncClient(timeout=60) as http:
        running = [asyncio.create_task(read_stream(http, stack, body, rig.token)) for body in running_bodies]
        for body in running_bodies:
            await until_event(http, stack, body["user"], "started")
        backlog = [
            asyncio.create_task(
                read_stream(http, stack, body, rig.token) if body["stream"] else post(http, stack, body, rig.token)
            )
            for body in backlog_bodies
        ]
        await asyncio.sleep(0.5)
        simulator.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(1.0)
        stack.spawn("simulator", "simulate", "--model", stack.model, "--port", port, "--max-num-seqs", "8",
                    "--decode-ms", "10")  # fmt: skip
        await asyncio.to_thread(wait_http, stack.simulator_url + "/health")
        served = await asyncio.wait_for(asyncio.gather(*backlog), HANG_AFTER + 20)
        served_after = time.monotonic() - killed_at
        ended = await asyncio.wait_for(asyncio.gather(*running), HANG_AFTER)
        # The direct runs, all at once, on the restarted simulator (the same seed gives the same text).
        references = await asyncio.gather(
            *(direct_stream(http, stack, {**b, "stream": True}) for b in running_bodies + backlog_bodies)
        )
        log = await sim_log(http, stack)
    failures = []
    for body, answer, reference in zip(backlog_bodies, served, references[slots:], strict=True):
        if isinstance(answer, StreamResult):
            if judge(answer, reference) != "complete":
                failures.append(f"{body['user']}: {answer.events[-2:]}")
        elif answer.status_code != 200:
            failures.append(f"{body['user']}: {answer.status_code} {answer.text}")
        else:
            text = "".join((c["choices"][0]["delta"].get("content") or "") for c in reference.data if c["choices"])
            assert answer.json()["choices"][0]["message"]["content"] == text
    verdicts = [judge(result, reference) for result, reference in zip(ended, references[:slots], strict=True)]
    starts = [e["user"] for e in log if e["event"] == "started" and e["user"].startswith("restart-backlog")]
    print(f"\nvLLM restart: running ones {verdicts}; backlog served {len(served) - len(failures)}/6, "
          f"all done {served_after:.1f} s after the kill")  # fmt: skip
    assert failures == []
    assert sorted(starts) == sorted(b["user"] for b in backlog_bodies)  # each exactly once


# -- processes killed ---------------------------------------------------------------------------------


async def test_worker_killed_mid_stream(rig: Rig) -> None:
    """kill -9 of the worker streaming: a clean error (or nothing lost), never a second answer from
    the worker that gets the redelivery."""
    stack = rig.stack
    user = "kill-worker"
    assert len(rig.live_workers()) == 2
    async with httpx.AsyncClient(timeout=60) as http:
        streaming = await mid_stream(http, rig, user)
        victim = rig.holder()
        killed_at = time.monotonic()
        victim.kill()
        result, reference = await streaming
        print(f"\nworker killed: the stream ended {result.ended_at - killed_at:.2f} s after the kill")
        await judged(http, rig, result, reference, user)
        await answered_after(http, stack, rig.token, user + "-after")


async def test_gateway_killed_its_work_stops_and_its_queue_is_dropped(rig: Rig) -> None:
    """kill -9 of the gateway (the module's last test: it is not restarted). What it was streaming
    stops within the limit; what it had queued never reaches vLLM when a worker dequeues it."""
    stack, gateway = rig.stack, rig.gateways[0]
    workers = rig.live_workers()
    slots = sum(_free_slots(w) for w in workers)
    running = [f"gw-running-{i}" for i in range(slots)]
    async with httpx.AsyncClient(timeout=60) as http:
        tasks = [
            asyncio.create_task(read_stream(http, stack, seeded(user, 2 * TOKENS, model=stack.model), rig.token))
            for user in running
        ]
        for user in running:
            await until_event(http, stack, user, "started")
        tasks += [
            asyncio.create_task(read_stream(http, stack, seeded(f"gw-queued-{i}", 20, model=stack.model), rig.token))
            for i in range(3)
        ]
        await asyncio.sleep(0.5)
        gateway.kill()
        killed_at = time.monotonic()
        await asyncio.gather(*tasks, return_exceptions=True)  # their HTTP connections broke
        # The running ones are aborted; the freed slots dequeue the queued ones, which must be dropped.
        await until(lambda: sum(_free_slots(w) for w in workers) == slots, 10, "the workers' slots free again")
        freed_after = time.monotonic() - killed_at
        await asyncio.sleep(0.5)
        problems, worst = [], 0.0
        for user in running:
            found, longest = await work_for_nobody(http, stack, user, verdict="error", vanished_at=killed_at)
            problems += found
            worst = max(worst, longest)
        log = await sim_log(http, stack)
    print(f"\ngateway killed: its streams' generation stopped after {worst:.2f} s at most; "
          f"the workers were free {freed_after:.2f} s after the kill")  # fmt: skip
    assert not problems, problems
    reached = [e for e in log if e["user"].startswith("gw-queued")]
    assert reached == [], f"requests of a dead gateway reached vLLM: {reached}"

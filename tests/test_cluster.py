"""A 3-node RabbitMQ cluster losing a node under load (issue 10, point 6): failover without repeats.

One private cluster (tests/rabbit_cluster.py) for the module, quorum queues
(``DISPATCHER_QUEUE_TYPE=quorum``), one simulator, two workers and two gateways. The URL lists are
chosen once the first connections are seen, so that each phase has streams off the stopped node:
- worker 1 gets all three nodes; its consuming connection's node is A;
- gateway 1 gets the nodes other than A; its reply connection's node is B; C is the third;
- worker 2 and gateway 2 get C only.
Phase 1 stops A (worker 1's node), phase 2 (after A is back: a quorum queue needs 2 of 3) stops B
(gateway 1's node). In each, under load with requests queued:
- streams whose gateway and worker had no connection to the stopped node complete, byte-identical
  to a direct run; the others complete the same way or end with one OpenAI-style error event;
- no request is generated to the end twice; the queued requests are all answered (200);
- nothing hangs.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests import rabbit_cluster
from tests.faults import (
    StreamResult,
    broker_connections,
    chat,
    direct_stream,
    judge,
    local_ports,
    post,
    read_stream,
    sim_log,
    until_event,
)
from tests.rabbit_cluster import RabbitCluster
from tests.stack import Process, Stack

pytestmark = pytest.mark.skipif(not rabbit_cluster.available(), reason="rabbitmq-server is not installed")

IDLE_TIMEOUT = 3.0
TOKENS = 200
SLOTS = 3  # per worker
HANG_AFTER = TOKENS * 0.011 + IDLE_TIMEOUT + 15.0  # failover included


def seeded(user: str, max_tokens: int = TOKENS, *, model: str, stream: bool = True) -> dict[str, object]:
    return {**chat(user, max_tokens, model=model, stream=stream), "seed": 11}


@dataclass
class ClusterRig:
    cluster: RabbitCluster
    stack: Stack
    workers: list[Process] = field(default_factory=list)
    gateways: list[Process] = field(default_factory=list)
    a: int = -1  # worker 1's node
    b: int = -1  # gateway 1's node
    c: int = -1

    def urls(self, *nodes: int) -> str:
        return ",".join(self.cluster.urls[i] for i in nodes)

    def start_worker(self, *nodes: int) -> Process:
        worker = self.stack.start_worker(SLOTS, env={"DISPATCHER_AMQP_URL": self.urls(*nodes)})
        self.workers.append(worker)
        return worker

    def start_gateway(self, *nodes: int) -> Process:
        gateway = self.stack.start_gateway(env={"DISPATCHER_AMQP_URL": self.urls(*nodes)})
        gateway.url = self.stack.gateway_url  # type: ignore[attr-defined]
        self.gateways.append(gateway)
        return gateway

    def nodes_of(self, process: Process) -> dict[str, int]:
        """The node of each of the process's broker connections, by connection name."""
        node_names = [node.name for node in self.cluster.nodes]
        ports = set()
        for node in self.cluster.nodes:
            ports |= local_ports(process.popen.pid, node.port)
        found = {}
        for connection in broker_connections(self.cluster.nodes[self._up()].ctl):
            if connection.peer_port in ports:
                owner = re.match(r"<([^.]+@[^.]+)\.", connection.pid)
                if owner and owner.group(1) in node_names:
                    found[connection.name] = node_names.index(owner.group(1))
        return found

    def _up(self) -> int:
        return next(i for i, node in enumerate(self.cluster.nodes) if node.running)

    def touches(self, process: Process, node: int) -> bool:
        """Whether the process has any TCP connection to ``node`` (measured from its sockets)."""
        return bool(local_ports(process.popen.pid, self.cluster.nodes[node].port))


def _main(names: dict[str, int]) -> int:
    """The node of the consuming (worker) or reply (gateway) connection: the one named without a suffix."""
    main = [node for name, node in names.items() if not name.endswith(("-out", "-control"))]
    assert len(main) == 1, names
    return main[0]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterRig]:
    tmp: Path = tmp_path_factory.mktemp("cluster")
    cluster = RabbitCluster(tmp)
    stack = Stack(
        tmp,
        amqp_url=cluster.url,
        env={
            "DISPATCHER_QUEUE_TYPE": "quorum",
            "DISPATCHER_PRIORITY_HEADROOM": "0",  # one lane: a worker runs SLOTS normal requests at once
            "DISPATCHER_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
            "DISPATCHER_HEARTBEAT_INTERVAL": "0.5",
            "DISPATCHER_GATEWAY_WORKERS": "1",
            "DISPATCHER_QUEUE_TIMEOUT": "60",
        },
    )
    rig = ClusterRig(cluster, stack)
    try:
        started = time.monotonic()
        stack.start_simulator(max_num_seqs=32, decode_ms=10)
        boot = cluster.start()
        rig.a = _main(rig.nodes_of(rig.start_worker(0, 1, 2)))
        others = [i for i in range(3) if i != rig.a]
        rig.b = _main(rig.nodes_of(rig.start_gateway(*others)))
        rig.c = next(i for i in others if i != rig.b)
        rig.start_worker(rig.c)
        rig.start_gateway(rig.c)
        stack.token = stack.add_token("cluster", priority=5)
        print(f"\ncluster booted in {boot:.1f} s; stack ready {time.monotonic() - started:.1f} s after the start")
        yield rig
    finally:
        # The cluster is thrown away with its queues: no clean shutdown or queue deletion to wait for.
        for process in stack.processes:
            process.kill()
        cluster.close(discard=True)


@dataclass
class Sent:
    user: str
    body: dict[str, object]
    gateway: Process
    task: asyncio.Task[StreamResult | httpx.Response]


def _served_by(rig: ClusterRig, request_id: str) -> Process | None:
    """The worker that generated the request's answer: its "request done" line counts output tokens
    (a worker that only dropped a redelivered copy logs none); None if no worker logged it."""
    pattern = re.compile(rf"request done request_id={re.escape(request_id)} .*completion_tokens=([1-9]\d*)")
    for worker in rig.workers:
        if pattern.search(worker.log()):
            return worker
    return None


def _free_slots(worker: Process) -> int:
    try:
        response = httpx.get(worker.url + "/ready", timeout=2)  # type: ignore[attr-defined]
        return int(response.json()["free_slots"])
    except (httpx.HTTPError, ValueError, KeyError):
        return -1


async def _phase(
    rig: ClusterRig, stop: int, tag: str, *, streams_via: list[int], queued_via: list[int]
) -> dict[str, int]:
    """Streams through the gateways ``streams_via`` (indexes), requests queued behind them through
    ``queued_via``, node ``stop`` stopped; every request judged. Returns counts per outcome.

    As many streams as worker slots: each worker serves exactly ``SLOTS`` of them, so a gateway
    given more than ``SLOTS`` streams has some served by each worker."""
    stack = rig.stack
    assert len(streams_via) == SLOTS * len(rig.workers)

    def send(i: int, gateway: Process, body: dict[str, object]) -> Sent:
        view = _via(stack, gateway)
        call = read_stream(http, view, body, stack.token) if body["stream"] else post(http, view, body, stack.token)
        return Sent(str(body["user"]), body, gateway, asyncio.create_task(call))  # type: ignore[arg-type]

    async with httpx.AsyncClient(timeout=60) as http:
        sent = [
            send(i, rig.gateways[g], seeded(f"{tag}-stream-{i}", model=stack.model)) for i, g in enumerate(streams_via)
        ]
        for s in sent:
            await until_event(http, stack, s.user, "started", timeout=20)
        queued = [
            send(i, rig.gateways[g], seeded(f"{tag}-queued-{i}", 5, model=stack.model, stream=False))
            for i, g in enumerate(queued_via)
        ]
        await asyncio.sleep(0.3)
        touched = {id(p) for p in rig.workers + rig.gateways if rig.touches(p, stop)}
        stopped_at = time.monotonic()
        await asyncio.to_thread(rig.cluster.stop, stop)
        results = await asyncio.wait_for(asyncio.gather(*(s.task for s in sent)), HANG_AFTER)
        answers = await asyncio.wait_for(asyncio.gather(*(q.task for q in queued)), HANG_AFTER)
        references = await asyncio.gather(*(direct_stream(http, stack, s.body) for s in sent))
        await asyncio.sleep(0.5)
        log = await sim_log(http, stack)

    # Every finding of the phase at once: they tell more together than the first one alone.
    problems: list[str] = []
    counts = {"complete": 0, "error": 0, "unaffected": 0, "unattributed": 0}
    for s, result, reference in zip(sent, results, references, strict=True):
        assert isinstance(result, StreamResult)
        verdict = judge(result, reference)  # raises on a repeat, a splice, a reorder or no clear end
        counts[verdict] += 1
        worker = _served_by(rig, result.headers.get("x-request-id", "?"))
        if worker is None:
            counts["unattributed"] += 1
        elif id(worker) not in touched and id(s.gateway) not in touched:
            counts["unaffected"] += 1
            if verdict != "complete":
                error = result.errors[0]["message"] if result.errors else "?"
                problems.append(f"{s.user} had nothing on the stopped node but ended with an error: {error}")
    finished = [e["user"] for e in log if e["event"] == "finished"]
    repeated = sorted({u for u in finished if finished.count(u) > 1})
    if repeated:
        problems.append(f"generated to the end more than once: {repeated}")
    bad = [
        f"{q.user}: {a.status_code} {a.text[:80]}" for q, a in zip(queued, answers, strict=True) if a.status_code != 200
    ]  # type: ignore[union-attr]
    if bad:
        problems.append(f"queued requests not answered: {bad}")
    # Nothing hangs inside the workers either: every slot comes back.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_free_slots(w) != SLOTS for w in rig.workers):  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    held = {w.name + str(i): _free_slots(w) for i, w in enumerate(rig.workers) if _free_slots(w) != SLOTS}
    if held:
        problems.append(f"worker slots still taken 5 s after the last stream ended (free slots: {held})")
    ended = max(r.ended_at for r in results) - stopped_at  # type: ignore[union-attr]
    print(f"\n{tag}: node {stop} stopped; streams {counts}; queued {len(answers) - len(bad)}/{len(answers)} "
          f"answered; last stream ended {ended:.1f} s after the stop")  # fmt: skip
    assert not problems, problems
    return counts


def _via(stack: Stack, gateway: Process) -> Stack:
    """The stack as seen through one gateway (read_stream and post use ``stack.gateway_url``)."""
    view = copy.copy(stack)
    view.gateway_url = gateway.url  # type: ignore[attr-defined]
    return view


async def test_losing_a_workers_node_then_a_gateways_node(rig: ClusterRig) -> None:
    # Phase 1: worker 1's node. Worker 2 and both gateways are elsewhere: worker 2's streams go on.
    counts = await _phase(rig, rig.a, "worker-node", streams_via=[0, 1] * SLOTS, queued_via=[0, 1, 0, 1])
    assert counts["unaffected"] >= SLOTS
    back = await asyncio.to_thread(rig.cluster.start, rig.a)  # a quorum queue needs 2 of 3 nodes for phase 2
    print(f"node {rig.a} back in {back:.1f} s")
    # Phase 2: gateway 1's node. Gateway 2 and worker 2 are on node C: what they carry goes on, and
    # what waits in the queue is answered through gateway 2.
    streams_via = [0] * (SLOTS - 1) + [1] * (SLOTS + 1)
    counts = await _phase(rig, rig.b, "gateway-node", streams_via=streams_via, queued_via=[1, 1, 1, 1])
    assert counts["unaffected"] >= 1
    # Everyone is still there and serving, on the nodes left.
    async with httpx.AsyncClient(timeout=30) as http:
        for gateway in rig.gateways:
            answer = await post(http, _via(rig.stack, gateway), seeded("after", 3, model=rig.stack.model, stream=False),
                                rig.stack.token)  # fmt: skip
            assert answer.status_code == 200, answer.text

"""Chaos run: streaming load through every fault of issue 10; nothing may hang, repeat or reorder.

    python -m llmdispatch.loadtest.chaos [--seconds 40] [--clients 12]

Starts a private 3-node RabbitMQ cluster (tests/rabbit_cluster.py; quorum queues) behind one TCP
proxy per node (tests/faults.py), a simulator, two workers and two gateways (tests/stack.py; run it
from the repository root), sends streamed requests from ``--clients`` loops spread over the live
gateways, and on a timeline spread over ``--seconds`` (the load goes on until the last fault is over):

1. cuts a worker's broker connections (TCP reset at the proxy: ``rabbitmqctl`` takes seconds to start),
2. cuts a gateway's broker connections,
3. stops the RabbitMQ node a worker consumes from (started again in the background),
4. kills vLLM (the simulator) and starts it again on the same port,
5. kill -9's a gateway and starts a replacement.

Every request asks for the same seeded answer, so each stream is judged against one direct run
(tests/faults.py ``judge``). It prints:

- sent; completed (the direct run's stream); failed cleanly (an HTTP error, or the direct run's
  beginning then one OpenAI-style error event); cut by the gateway kill (the HTTP connection broke);
- duplicated (a repeated role chunk or more text than asked for), reordered (any other departure
  from the direct run: a gap, a reorder, a changed chunk id), hung (no end within ``--hang-after``);
- generated-for-nobody seconds (simulator time spent on copies nobody received, counted from the
  moment their client had its answer, its error or its broken connection);
- queued-and-lost: a stream that was accepted (200) and ended in an error or hung without vLLM
  ever starting it, while its gateway lived: the queue lost it.

Exits 1 when anything hung, was duplicated, reordered or queued-and-lost. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.faults import Link, StreamResult, TcpProxy, direct_stream, judge
from tests.rabbit_cluster import RabbitCluster
from tests.stack import Process, Stack, free_port, wait_http

MAX_TOKENS = 40
SEED = 5


@dataclass
class Outcome:
    user: str
    gateway: Process
    kind: str  # completed | failed_cleanly | gateway_killed | duplicated | reordered | hung
    sent_at: float
    ended_at: float
    accepted: bool  # the gateway answered 200 (the stream was committed)
    detail: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)


@dataclass
class Rig:
    cluster: RabbitCluster
    stack: Stack
    proxies: list[TcpProxy]
    port: str = ""  # the simulator's
    workers: list[Process] = field(default_factory=list)
    gateways: list[Process] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)  # ids of gateways killed on purpose
    faults: list[tuple[float, int]] = field(default_factory=list)  # (when, id of the process) cut or killed
    sim_log: list[dict[str, object]] = field(default_factory=list)  # events of simulators killed on purpose
    t0: float = 0.0  # the start of the timeline

    def faulted(self, process: Process, since: float, until: float) -> bool:
        return any(pid == id(process) and since <= t <= until for t, pid in self.faults)

    def live_gateways(self) -> list[Process]:
        return [g for g in self.gateways if g.alive()]

    def start_gateway(self) -> Process:
        """Like Stack.start_gateway, with more time to start: a loaded box under chaos is slow."""
        port = free_port()
        gateway = self.stack.spawn("gateway", "gateway", "--port", str(port))
        gateway.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        wait_http(gateway.url + "/ready", timeout=90)  # type: ignore[attr-defined]
        self.gateways.append(gateway)
        return gateway

    def links(self, process: Process) -> list[tuple[int, list[Link]]]:
        """The process's proxied broker connections, per node."""
        return [(i, proxy.links_of(process.popen.pid)) for i, proxy in enumerate(self.proxies)]


def body_for(stack: Stack, user: str) -> dict[str, object]:
    return {"model": stack.model, "user": user, "stream": True, "max_tokens": MAX_TOKENS, "seed": SEED,
            "messages": [{"role": "user", "content": "chaos"}]}  # fmt: skip


def classify(result: StreamResult, reference: StreamResult) -> tuple[str, str]:
    try:
        verdict = judge(result, reference)
    except AssertionError as exc:
        roles = sum(1 for c in result.data if c.get("choices") and c["choices"][0]["delta"].get("role"))
        words = len(result.text().split())
        kind = "duplicated" if roles > 1 or words > MAX_TOKENS else "reordered"
        return kind, str(exc)[:80]
    return ("completed", "") if verdict == "complete" else ("failed_cleanly", result.errors[0]["message"][:60])


async def one_request(
    http: httpx.AsyncClient, rig: Rig, reference: StreamResult, tally: Tally, hang_after: float
) -> None:
    gateways = rig.live_gateways()
    if not gateways:
        await asyncio.sleep(0.2)
        return
    gateway = random.choice(gateways)
    user = "chaos-" + uuid.uuid4().hex[:12]
    headers = {"Authorization": f"Bearer {rig.stack.token}"}
    url = gateway.url + "/v1/chat/completions"  # type: ignore[attr-defined]
    result = StreamResult(0)
    sent_at = time.monotonic()
    raw = b""
    kind, detail = "", ""
    try:
        async with asyncio.timeout(hang_after):
            async with http.stream("POST", url, json=body_for(rig.stack, user), headers=headers) as r:
                result.status = r.status_code
                async for chunk in r.aiter_bytes():
                    raw += chunk
    except TimeoutError:
        kind = "hung"
    except httpx.HTTPError as exc:
        # The gateway went away under the request (killed on purpose) or refused it (being replaced).
        kind = "gateway_killed" if id(gateway) in rig.killed else "reordered"
        detail = type(exc).__name__
    ended_at = time.monotonic()
    if not kind:
        events = [e for e in raw.split(b"\n\n") if e.strip() and not e.startswith(b":")]
        result.events = events
        if result.status != 200:
            try:
                detail = f"{result.status} {json.loads(raw)['error']['message'][:60]}"
                kind = "failed_cleanly"
            except (ValueError, KeyError):
                kind, detail = "reordered", f"{result.status} without an OpenAI error body"
        else:
            kind, detail = classify(result, reference)
    tally.outcomes.append(Outcome(user, gateway, kind, sent_at, ended_at, result.status == 200, detail))
    if detail:
        tally.errors[f"{kind}: {detail}"] += 1


async def client_loop(
    http: httpx.AsyncClient, rig: Rig, reference: StreamResult, tally: Tally, over: asyncio.Event, hang_after: float
) -> None:
    while not over.is_set():
        done = len(tally.outcomes)
        await one_request(http, rig, reference, tally, hang_after)
        if tally.outcomes[done:] and tally.outcomes[-1].kind != "completed":
            await asyncio.sleep(0.2)  # a client backs off after an error, as a real one would


def cut(rig: Rig, process: Process, what: str) -> str:
    rig.faults.append((time.monotonic(), id(process)))
    closed = sum(proxy.reset(links) for proxy, (_, links) in zip(rig.proxies, rig.links(process), strict=True))
    return f"cut {what}'s {closed} broker connections"


async def chaos(rig: Rig, seconds: float, log: list[str], over: asyncio.Event) -> None:
    try:
        await _timeline(rig, seconds, log)
        await asyncio.sleep(3.0)  # a little load on the healed system
    finally:
        over.set()


async def _timeline(rig: Rig, seconds: float, log: list[str]) -> None:
    started = rig.t0 = time.monotonic()

    async def at(share: float) -> None:
        await asyncio.sleep(max(0.0, started + share * seconds - time.monotonic()))

    def note(text: str) -> None:
        log.append(f"{time.monotonic() - started:5.1f}s  {text}")

    await at(0.12)
    note(cut(rig, rig.workers[0], "worker 1"))
    await at(0.25)
    note(cut(rig, rig.gateways[0], "gateway 1"))
    await at(0.38)
    # A node worker 2 is connected to.
    victim = next((i for i, links in rig.links(rig.workers[1]) if links), 1)
    await asyncio.to_thread(rig.cluster.stop, victim)
    note(f"stopped RabbitMQ node {victim}")
    restarting = asyncio.create_task(asyncio.to_thread(rig.cluster.start, victim))
    await at(0.55)
    simulator = next(p for p in reversed(rig.stack.processes) if p.name == "simulator" and p.alive())
    async with httpx.AsyncClient(timeout=10) as http:
        stats = (await http.get(rig.stack.simulator_url + "/sim/stats")).json()
    simulator.kill()
    killed_at = time.monotonic()
    # Generation in flight there stopped with the process (its log has no end for it).
    rig.sim_log += [
        {**entry, "killed_at": killed_at} for entry in stats["log"]
    ]  # the last events before the kill may be missing: the counts err on "lost"
    note("killed vLLM")
    await asyncio.sleep(1.0)
    rig.stack.spawn("simulator", "simulate", "--model", rig.stack.model, "--port", rig.port,
                    "--max-num-seqs", "32", "--decode-ms", "5")  # fmt: skip
    await asyncio.to_thread(wait_http, rig.stack.simulator_url + "/health")
    note("vLLM back")
    await at(0.72)
    doomed = rig.gateways[-1]
    rig.killed.add(id(doomed))
    rig.faults.append((time.monotonic(), id(doomed)))
    doomed.kill()
    note("killed gateway 2 (kill -9)")
    await asyncio.to_thread(rig.start_gateway)
    note("replacement gateway ready")
    await restarting
    note(f"RabbitMQ node {victim} back")


def generated_for_nobody(
    sim_log: list[dict[str, object]], tally: Tally, now: float
) -> tuple[float, list[tuple[float, str, str]]]:
    """Seconds of generation nobody received: copies other than the delivered one, from the moment
    their client had its answer (or error, or broken connection); still running ones up to ``now``
    (or up to the kill of their simulator). Also the largest contributions (seconds, user, outcome)."""
    by_user: dict[str, dict[str, list[dict[str, object]]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for entry in sim_log:
        if entry["event"] in ("started", "finished", "aborted"):
            by_user[str(entry["user"])][str(entry["request_id"])].append(entry)
    total = 0.0
    parts: list[tuple[float, str, str]] = []
    for outcome in tally.outcomes:
        copies = by_user.get(outcome.user, {})
        delivered = None
        if outcome.kind == "completed":
            finished = [rid for rid, events in copies.items() if events[-1]["event"] == "finished"]
            delivered = finished[0] if finished else None
        for rid, events in copies.items():
            if rid == delivered or events[0]["event"] != "started":
                continue
            start = max(float(events[0]["t"]), outcome.ended_at)  # type: ignore[arg-type]
            last = events[-1]
            end = float(last["t"] if last["event"] != "started" else last.get("killed_at", now))  # type: ignore[arg-type]
            if end - start >= 0.05:
                total += end - start
                parts.append((end - start, outcome.user, outcome.kind))
    return total, sorted(parts, reverse=True)[:5]


def queued_unserved(sim_log: list[dict[str, object]], tally: Tally, rig: Rig) -> tuple[list[Outcome], int]:
    """Streams accepted (200) that vLLM never started and that ended in an error or hung: those whose
    gateway had no fault of its own while they waited were lost by the queue; the others were
    failed by their gateway when it lost its broker connection or died (counted apart)."""
    started = {e["user"] for e in sim_log if e["event"] == "started"}
    # "... mid-answer/mid-stream" errors say output had begun: vLLM started those, even when its log was
    # read a moment before it was killed and misses them.
    unserved = [
        o
        for o in tally.outcomes
        if o.kind in ("failed_cleanly", "hung") and o.accepted and o.user not in started and "mid-" not in o.detail
    ]
    lost = [o for o in unserved if not rig.faulted(o.gateway, o.sent_at, o.ended_at)]
    return lost, len(unserved) - len(lost)


async def run(args: argparse.Namespace, tmp: Path) -> int:
    cluster = RabbitCluster(tmp)
    proxies = [TcpProxy(node.port).open() for node in cluster.nodes]
    stack = Stack(
        tmp,
        amqp_url=",".join(f"amqp://guest:guest@127.0.0.1:{proxy.port}/" for proxy in proxies),
        env={
            "DISPATCHER_QUEUE_TYPE": "quorum",
            "DISPATCHER_PRIORITY_HEADROOM": "0",
            # Below --hang-after's default: a request the queue lost ends with queue_timeout, not a hang.
            "DISPATCHER_QUEUE_TIMEOUT": "20",
            "DISPATCHER_IDLE_TIMEOUT": "5",
            "DISPATCHER_HEARTBEAT_INTERVAL": "1",
            "DISPATCHER_GATEWAY_WORKERS": "1",
        },
    )
    rig = Rig(cluster, stack, proxies)
    try:
        stack.start_simulator(max_num_seqs=32, decode_ms=5)
        rig.port = stack.simulator_url.rsplit(":", 1)[1]
        boot = cluster.start()
        print(f"cluster booted in {boot:.1f} s")
        rig.workers = [stack.start_worker(8), stack.start_worker(8)]
        for _ in range(2):
            stack.gateway_url = rig.start_gateway().url  # type: ignore[attr-defined]
            stack.wait_model()
        stack.token = stack.add_token("chaos", priority=5)
        tally, log = Tally(), []
        limits = httpx.Limits(max_connections=args.clients + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.hang_after * 2), limits=limits) as http:
            reference = await direct_stream(http, stack, body_for(stack, "reference"))
            await http.post(stack.simulator_url + "/sim/reset")
            over = asyncio.Event()
            loops = [client_loop(http, rig, reference, tally, over, args.hang_after) for _ in range(args.clients)]
            await asyncio.gather(chaos(rig, args.seconds, log, over), *loops)
            await asyncio.sleep(2.0)  # let aborted copies show up in the simulator's log
            sim_log = rig.sim_log + (await http.get(stack.simulator_url + "/sim/stats")).json()["log"]
        nobody, nobody_parts = generated_for_nobody(sim_log, tally, time.monotonic())
        lost, failed_with_gateway = queued_unserved(sim_log, tally, rig)
        hung = [o for o in tally.outcomes if o.kind == "hung"]
        hung_events = {o.user: [e["event"] for e in sim_log if e["user"] == o.user] for o in hung}
        finished = collections.Counter(e["user"] for e in sim_log if e["event"] == "finished")
        twice = sum(1 for o in tally.outcomes if finished[o.user] > 1)
    finally:
        for process in stack.processes:
            process.kill()
        cluster.close(discard=True)
        for proxy in proxies:
            proxy.close()
    print("\n".join(log))
    for reason, count in tally.errors.most_common(10):
        print(f"        {count:5d} x {reason}")
    print(f"requests sent:            {len(tally.outcomes)}")
    print(f"completed:                {tally.count('completed')}")
    print(f"failed cleanly:           {tally.count('failed_cleanly')}")
    print(f"cut by the gateway kill:  {tally.count('gateway_killed')}")
    print(f"duplicated:               {tally.count('duplicated')} (generated to the end twice: {twice})")
    print(f"reordered:                {tally.count('reordered')}")
    print(f"hung:                     {tally.count('hung')}")
    print(f"generated for nobody:     {nobody:.1f} s")
    for seconds, user, kind in nobody_parts:
        print(f"        {seconds:5.1f} s for {user} ({kind})")
    print(f"queued and lost:          {len(lost)} (and {failed_with_gateway} queued ones failed with their gateway)")
    for o in lost:
        which = rig.gateways.index(o.gateway) + 1
        print(f"        lost: {o.user} sent at {o.sent_at - rig.t0:.1f}s to gateway {which}, "
              f"ended {o.ended_at - o.sent_at:.1f} s later: {o.kind} {o.detail}")  # fmt: skip
    for user, events in hung_events.items():
        print(f"        hung: {user}, simulator events {events}")
    bad = tally.count("duplicated") + tally.count("reordered") + tally.count("hung") + len(lost) + twice
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="the faults' timeline (the load lasts longer)")
    parser.add_argument("--clients", type=int, default=12, help="concurrent request loops")
    parser.add_argument("--hang-after", type=float, default=30.0, help="a request open this long has hung")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep the processes' logs there")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        sys.exit(asyncio.run(run(args, args.keep)))
    with tempfile.TemporaryDirectory(prefix="dispatcher-chaos-") as tmp:
        sys.exit(asyncio.run(run(args, Path(tmp))))


if __name__ == "__main__":
    main()

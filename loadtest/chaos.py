"""Chaos run: streaming load while a worker is killed and the broker restarts; nothing may hang or repeat.

    python -m loadtest.chaos [--seconds 30] [--clients 12]

Starts its own private RabbitMQ node, simulator, two workers and a gateway (tests/stack.py,
tests/rabbit_node.py; run it from the repository root), sends streamed requests from
``--clients`` loops, SIGKILLs a worker (and starts a replacement) a third of the way in and
restarts the broker at two thirds, then prints:

- sent, completed (the whole answer), failed cleanly (an HTTP error or an SSE error event, then
  the end of the response), hung (no end within ``--hang-after`` seconds: must be 0),
- duplicated (an answer with repeated content, or a request that vLLM completed twice: must be 0).

Exits 1 when anything hung or was duplicated. Traffic goes to 127.0.0.1 only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.rabbit_node import RabbitNode
from tests.stack import Stack

MAX_TOKENS = 40


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed_cleanly: int = 0
    hung: int = 0
    duplicated: int = 0
    broken: int = 0  # ended without [DONE] or a clear error: neither clean nor hung
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    users: list[str] = field(default_factory=list)


async def one_request(http: httpx.AsyncClient, stack: Stack, token: str, tally: Tally, hang_after: float) -> None:
    user = "chaos-" + uuid.uuid4().hex[:12]
    tally.sent += 1
    tally.users.append(user)
    body = {"model": stack.model, "user": user, "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "chaos"}]}  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    raw = b""
    try:
        async with asyncio.timeout(hang_after):
            async with http.stream("POST", stack.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
                status = r.status_code
                async for chunk in r.aiter_bytes():
                    raw += chunk
    except TimeoutError:
        tally.hung += 1
        return
    except httpx.HTTPError as exc:  # refused while the gateway is... never expected, counted apart
        tally.broken += 1
        tally.errors[type(exc).__name__] += 1
        return
    if status != 200:
        try:
            tally.errors[f"{status} {json.loads(raw)['error']['message'][:60]}"] += 1
            tally.failed_cleanly += 1
        except (ValueError, KeyError):
            tally.broken += 1
        return
    events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    if not events or events[-1] != b"data: [DONE]":
        tally.broken += 1
        return
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    if any("error" in c for c in chunks):
        tally.errors["stream: " + next(c["error"]["message"][:60] for c in chunks if "error" in c)] += 1
        tally.failed_cleanly += 1
        return
    roles = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role"))
    words = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]).split()
    if roles != 1 or len(words) != MAX_TOKENS or events.count(b"data: [DONE]") != 1:
        tally.duplicated += 1
        return
    tally.completed += 1


async def client_loop(http: httpx.AsyncClient, stack: Stack, token: str, tally: Tally, until: float,
                      hang_after: float) -> None:  # fmt: skip
    while time.monotonic() < until:
        completed = tally.completed
        await one_request(http, stack, token, tally, hang_after)
        if tally.completed == completed:
            await asyncio.sleep(0.2)  # a client backs off after an error, as a real one would


async def chaos(stack: Stack, node: RabbitNode, seconds: float, log: list[str]) -> None:
    started = time.monotonic()
    await asyncio.sleep(seconds / 3)
    victim = next(p for p in stack.processes if p.name == "worker" and p.alive())
    victim.kill()
    log.append(f"{time.monotonic() - started:5.1f}s  killed worker pid {victim.popen.pid}")
    await asyncio.to_thread(stack.start_worker, 8)
    log.append(f"{time.monotonic() - started:5.1f}s  replacement worker ready")
    await asyncio.sleep(max(0.0, started + 2 * seconds / 3 - time.monotonic()))
    log.append(f"{time.monotonic() - started:5.1f}s  stopping the broker")
    await asyncio.to_thread(node.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(node.start)
    log.append(f"{time.monotonic() - started:5.1f}s  broker back")


async def run(args: argparse.Namespace, tmp: Path) -> int:
    node = RabbitNode(tmp)
    node.start()
    stack = Stack(tmp, amqp_url=node.url, env={"DISPATCHER_IDLE_TIMEOUT": "5", "DISPATCHER_HEARTBEAT_INTERVAL": "1"})
    try:
        stack.start_simulator(max_num_seqs=16, decode_ms=5)
        stack.start_worker(8)
        stack.start_worker(8)
        stack.start_gateway()
        token = stack.add_token("chaos", priority=5)
        tally, log = Tally(), []
        until = time.monotonic() + args.seconds
        limits = httpx.Limits(max_connections=args.clients + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.hang_after * 2), limits=limits) as http:
            await http.post(stack.simulator_url + "/sim/reset")
            loops = [client_loop(http, stack, token, tally, until, args.hang_after) for _ in range(args.clients)]
            await asyncio.gather(chaos(stack, node, args.seconds, log), *loops)
            sim_log = (await http.get(stack.simulator_url + "/sim/stats")).json()["log"]
        finished = collections.Counter(e["user"] for e in sim_log if e["event"] == "finished")
        tally.duplicated += sum(1 for user in tally.users if finished[user] > 1)
    finally:
        try:
            stack.close()
        finally:
            node.close()
    print("\n".join(log))
    for reason, count in tally.errors.most_common(8):
        print(f"        {count:5d} x {reason}")
    print(f"requests sent:      {tally.sent}")
    print(f"completed:          {tally.completed}")
    print(f"failed cleanly:     {tally.failed_cleanly}")
    print(f"broken (no clear end): {tally.broken}")
    print(f"hung:               {tally.hung}")
    print(f"duplicated:         {tally.duplicated}")
    return 1 if tally.hung or tally.duplicated or tally.broken else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the load")
    parser.add_argument("--clients", type=int, default=12, help="concurrent request loops")
    parser.add_argument("--hang-after", type=float, default=30.0, help="a request open this long has hung")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dispatcher-chaos-") as tmp:
        sys.exit(asyncio.run(run(args, Path(tmp))))


if __name__ == "__main__":
    main()

"""Real processes for tests: the simulator, workers and gateways, each on its own free port.

Every stack serves its own model name, so its RabbitMQ queue is its own; the queue is deleted when
the stack closes, leaving the machine's broker as it was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rstream import Producer

from llmdispatch.amqp import delete_model_queue
from llmdispatch.tokens import TokenStore
from llmdispatch.usage import StreamAddress

T = TypeVar("T")

AMQP_URL = os.environ.get("DISPATCHER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
STREAM_URL = os.environ.get("DISPATCHER_TEST_STREAM_URL", "rabbitmq-stream://guest:guest@127.0.0.1:5552/")
REDIS_URL = os.environ.get("DISPATCHER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASES = {
    "sqlite": None,  # a temp file, per stack
    "postgresql": os.environ.get("DISPATCHER_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("DISPATCHER_TEST_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306/test"),
}


# Seconds a started process may take to answer: a 2-core box shared by several suites (and builds)
# has taken more than 20 s to import and connect a worker.
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == status:
                    return
                last = response.status
        except urllib.error.HTTPError as exc:
            last = exc.code
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_slots(worker: Process) -> int:
    """The worker's free slots, from its ``/ready`` (which answers 503 with them while not ready)."""
    try:
        with urllib.request.urlopen(worker.url + "/ready", timeout=2) as response:  # type: ignore[attr-defined]
            return int(json.loads(response.read())["free_slots"])
    except urllib.error.HTTPError as exc:
        return int(json.loads(exc.read())["free_slots"])


@dataclass
class Stack:
    tmp: Path
    database_url: str | None = None
    redis_url: str = REDIS_URL
    amqp_url: str = AMQP_URL
    model: str = field(default_factory=lambda: "test-" + uuid.uuid4().hex[:10])
    env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    simulator_url: str = ""
    gateway_url: str = ""
    token: str = ""  # the secret of the token made by serve()

    def __post_init__(self) -> None:
        if self.database_url is None:
            self.database_url = f"sqlite+aiosqlite:///{self.tmp / 'tokens.db'}"

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
        env.update(
            DISPATCHER_AMQP_URL=self.amqp_url,
            DISPATCHER_REDIS_URL=self.redis_url,
            DISPATCHER_DATABASE_URL=self.database_url or "",
            DISPATCHER_LOG_LEVEL="info",
            DISPATCHER_DRAIN_DELAY="0",  # a SIGTERM'd test gateway stops at once (tests that drain set it)
            DISPATCHER_GATEWAY_WORKERS="1",  # one gateway process unless a test asks for more
            DISPATCHER_METRICS_PORT="0",  # /metrics on the API port, so test gateways never clash on 9091
        )
        env.update(self.env)
        env.update(extra or {})
        return env

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Process:
        log_path = self.tmp / f"{name}-{len(self.processes)}.log"
        popen = subprocess.Popen(
            [sys.executable, "-m", "llmdispatch.cli", *args],
            env=self._env(env),
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def start_simulator(self, max_num_seqs: int = 16, decode_ms: float = 10.0, *extra: str) -> Process:
        port = free_port()
        process = self.spawn(
            "simulator",
            "simulate", "--model", self.model, "--port", str(port),
            "--max-num-seqs", str(max_num_seqs), "--decode-ms", str(decode_ms), *extra,
        )  # fmt: skip
        self.simulator_url = f"http://127.0.0.1:{port}"
        wait_http(self.simulator_url + "/health", START_TIMEOUT)
        return process

    def start_worker(self, max_concurrency: int = 16, *extra: str, env: dict[str, str] | None = None) -> Process:
        port = free_port()
        process = self.spawn(
            "worker",
            "worker", "--model", self.model, "--vllm-url", self.simulator_url + "/v1",
            "--max-concurrency", str(max_concurrency), "--http-port", str(port), *extra,
            env=env,
        )  # fmt: skip
        process.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        wait_http(process.url + "/ready", START_TIMEOUT)  # type: ignore[attr-defined]
        return process

    def start_gateway(self, env: dict[str, str] | None = None, *, wait_model: bool = True) -> Process:
        port = free_port()
        process = self.spawn("gateway", "gateway", "--port", str(port), env=env)
        self.gateway_url = f"http://127.0.0.1:{port}"
        wait_http(self.gateway_url + "/ready", START_TIMEOUT)
        if wait_model:
            self.wait_model()
        return process

    def restart_simulator(self) -> Process:
        """Kill the simulator (SIGKILL, as an inference server crashes; stopped or not) and start it
        again with the same arguments, on the same port, as a restarted server comes back."""
        old = next(p for p in reversed(self.processes) if p.name == "simulator")
        old.kill()
        process = self.spawn("simulator", *old.popen.args[3:])  # type: ignore[index,misc]
        wait_http(self.simulator_url + "/health")
        return process

    def serve(self, *, max_num_seqs: int, max_concurrency: int, token: str, decode_ms: float = 10.0) -> Stack:
        """The usual test stack: a simulator, one worker, one gateway and a priority-5 token."""
        self.start_simulator(max_num_seqs=max_num_seqs, decode_ms=decode_ms)
        self.start_worker(max_concurrency=max_concurrency)
        self.start_gateway()
        self.token = self.add_token(token, priority=5)
        return self

    def wait_model(self, timeout: float = 15.0) -> None:
        """Until the gateway has heard a worker announce our model."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(self.gateway_url + "/ready", timeout=1) as response:
                if self.model.encode() in response.read():
                    return
            time.sleep(0.1)
        raise TimeoutError("the gateway never saw a worker for " + self.model)

    def add_token(self, name: str, priority: int = 1, **limits: int) -> str:
        async def add() -> str:
            store = TokenStore(self.database_url or "")
            try:
                await store.delete(name)
                return await store.add(name, priority, **limits)  # type: ignore[arg-type]
            finally:
                await store.close()

        return run_sync(add)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def queued(self, *, express: bool = False) -> int:
        """Requests waiting in this stack's model queue (a passive declare: it asks, it creates nothing).
        Tests wait for this rather than sleep: a request sent is not yet a request queued."""
        import aio_pika

        from llmdispatch.wire import queue_name

        connection = await aio_pika.connect(self.amqp_url.split(",")[0])
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name(self.model, express=express), passive=True)
            return queue.declaration_result.message_count or 0

    def delete_queues(self, model: str) -> None:
        run_sync(lambda: delete_model_queue(self.amqp_url, model))

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop(signal.SIGTERM, timeout=5)
        if any(process.name == "worker" for process in self.processes):
            self.delete_queues(self.model)


async def delete_stream(name: str) -> None:
    """Remove a usage stream a test made (tests leave the broker as they found it)."""
    address = StreamAddress.parse(STREAM_URL)
    producer = Producer(address.host, **address.connect_kwargs())  # type: ignore[arg-type]
    try:
        await producer.start()
        await producer.delete_stream(name, missing_ok=True)
    finally:
        await producer.close()


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop (tests)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()

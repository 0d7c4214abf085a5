"""The processes a benchmark measures: simulator, gateway and worker, plus their CPU and memory.

Each runs as ``python -m dispatcher.cli ...`` on a free port with a model name of its own (so its
RabbitMQ queue is its own and is deleted at the end), its log in a temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from dispatcher.amqp import delete_model_queue


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, contains: bytes = b"") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200 and contains in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not ready within {timeout:.0f}s")


@dataclass
class Usage:
    """CPU seconds and peak resident memory of one process over one measurement."""

    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0


class Sampler:
    """Peak RSS of some processes, sampled in a thread; CPU time from the start/stop difference."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.peaks = dict.fromkeys(pids, 0.0)
        self._cpu_start: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def _sample(self) -> None:
        for name, process in self.processes.items():
            try:
                self.peaks[name] = max(self.peaks[name], process.memory_info().rss / 2**20)
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Sampler:
        self._cpu_start = {name: self._cpu(p) for name, p in self.processes.items()}
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def usage(self) -> dict[str, Usage]:
        result = {}
        for name, process in self.processes.items():
            try:
                cpu = self._cpu(process) - self._cpu_start[name]
            except psutil.Error:
                cpu = float("nan")
            result[name] = Usage(cpu, self.peaks[name])
        return result


def rabbitmq_pid() -> int | None:
    """The local RabbitMQ node (Erlang VM), if it runs on this machine: its CPU is part of the cost."""
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if process.info["name"] == "beam.smp" and "rabbit" in " ".join(process.info["cmdline"] or []):
                return process.pid
        except psutil.Error:
            continue
    return None


@dataclass
class Services:
    tmp: Path
    amqp_url: str
    redis_url: str = ""
    model: str = field(default_factory=lambda: "bench-" + uuid.uuid4().hex[:8])
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    simulator_url: str = ""
    gateway_url: str = ""
    token: str = ""

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.tmp / 'tokens.db'}"

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
        base.update(
            DISPATCHER_AMQP_URL=self.amqp_url,
            DISPATCHER_REDIS_URL=self.redis_url,
            DISPATCHER_DATABASE_URL=self.database_url,
        )
        base.update(env or {})
        log = (self.tmp / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", *args], env=base, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes[name] = process
        return process

    def start(self, *, max_num_seqs: int, decode_ms: float, worker_concurrency: int) -> None:
        port = free_port()
        self._spawn(
            "simulator", "simulate", "--model", self.model, "--port", str(port),
            "--max-num-seqs", str(max_num_seqs), "--decode-ms", str(decode_ms),
        )  # fmt: skip
        self.simulator_url = f"http://127.0.0.1:{port}"
        wait_http(self.simulator_url + "/health")
        self.token = asyncio.run(self._add_token())
        port = free_port()
        # One token plays every user here: its per-token queue cap (a fairness limit between tenants)
        # is set out of reach, but stays active, so the limiter's cost per request is measured.
        self._spawn("gateway", "gateway", "--port", str(port), env={"DISPATCHER_MAX_QUEUED_PER_TOKEN": "1000000"})
        self.gateway_url = f"http://127.0.0.1:{port}"
        wait_http(self.gateway_url + "/ready")
        self._spawn(
            "worker", "worker", "--model", self.model, "--vllm-url", self.simulator_url + "/v1",
            "--max-concurrency", str(worker_concurrency), "--http-port", str(free_port()),
        )  # fmt: skip
        wait_http(self.gateway_url + "/ready", contains=self.model.encode())

    async def _add_token(self) -> str:
        from dispatcher.tokens import TokenStore

        store = TokenStore(self.database_url)
        try:
            return await store.add("bench", 5)
        finally:
            await store.close()

    def pids(self) -> dict[str, int]:
        pids = {name: process.pid for name, process in self.processes.items()}
        if (rabbit := rabbitmq_pid()) is not None:
            pids["rabbitmq"] = rabbit
        return pids

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} exited (code {process.returncode}); see {self.tmp / name}.log")

    def close(self) -> None:
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        if "worker" in self.processes:
            asyncio.run(delete_model_queue(self.amqp_url, self.model))

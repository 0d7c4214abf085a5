"""The processes a benchmark measures: simulator, gateway and worker, plus their CPU and memory.

Each runs as ``python -m llmdispatch.cli ...`` on a free port with a model name of its own (so its
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

from llmdispatch.amqp import delete_model_queue


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
    """CPU seconds and peak resident memory of one process tree over one measurement.

    ``cpu_s`` covers the whole run (warm-up included); ``window_cpu_s`` only the measurement window,
    the one to divide by the requests and tokens counted in that window.
    """

    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    window_cpu_s: float = float("nan")


def tree_cpu(process: psutil.Process) -> float:
    """User + system CPU seconds of a process and its children (a gateway with several processes)."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def tree_rss_mb(process: psutil.Process) -> float:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


class Sampler:
    """Peak RSS of some process trees, sampled in a thread; CPU time from start/stop (and window) differences."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.peaks = dict.fromkeys(pids, 0.0)
        self._cpu_start: dict[str, float] = {}
        self._window: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> dict[str, float]:
        result = {}
        for name, process in self.processes.items():
            try:
                result[name] = tree_cpu(process)
            except psutil.Error:
                result[name] = float("nan")
        return result

    def _sample(self) -> None:
        for name, process in self.processes.items():
            try:
                self.peaks[name] = max(self.peaks[name], tree_rss_mb(process))
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def mark(self) -> None:
        """A window edge (start, then end): CPU times now."""
        for name, cpu in self._cpu().items():
            self._window.setdefault(name, []).append(cpu)

    def __enter__(self) -> Sampler:
        self._cpu_start = self._cpu()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def usage(self) -> dict[str, Usage]:
        result = {}
        end = self._cpu()
        for name in self.processes:
            edges = self._window.get(name, [])
            window = edges[1] - edges[0] if len(edges) >= 2 else float("nan")
            result[name] = Usage(end[name] - self._cpu_start[name], self.peaks[name], window)
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
            [sys.executable, "-m", "llmdispatch.cli", *args], env=base, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes[name] = process
        return process

    def start(
        self,
        *,
        max_num_seqs: int,
        decode_ms: float,
        worker_concurrency: int,
        decode_ms_per_seq: float = 0.25,
        gateway_workers: int = 1,
        gateway_env: dict[str, str] | None = None,
        simulator_args: tuple[str, ...] = (),
    ) -> None:
        port = free_port()
        self._spawn(
            "simulator", "simulate", "--model", self.model, "--port", str(port),
            "--max-num-seqs", str(max_num_seqs), "--decode-ms", str(decode_ms),
            "--decode-ms-per-seq", str(decode_ms_per_seq), *simulator_args,
        )  # fmt: skip
        self.simulator_url = f"http://127.0.0.1:{port}"
        wait_http(self.simulator_url + "/health")
        self.token = asyncio.run(self._add_token())
        port = free_port()
        # One token plays every user here: its per-token queue cap (a fairness limit between tenants)
        # is set out of reach, but stays active, so the limiter's cost per request is measured.
        self._spawn(
            "gateway", "gateway", "--port", str(port), "--workers", str(gateway_workers),
            env={
                "DISPATCHER_MAX_QUEUED_PER_TOKEN": "1000000",
                "DISPATCHER_MAX_STREAMS_PER_TOKEN": "0",  # one token opens every stream of the run
                "DISPATCHER_METRICS_PORT": str(free_port()),
                **(gateway_env or {}),
            },
        )  # fmt: skip
        self.gateway_url = f"http://127.0.0.1:{port}"
        wait_http(self.gateway_url + "/ready")
        self._spawn(
            "worker", "worker", "--model", self.model, "--vllm-url", self.simulator_url + "/v1",
            "--max-concurrency", str(worker_concurrency), "--http-port", str(free_port()),
        )  # fmt: skip
        wait_http(self.gateway_url + "/ready", contains=self.model.encode())

    async def _add_token(self) -> str:
        from llmdispatch.tokens import TokenStore

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

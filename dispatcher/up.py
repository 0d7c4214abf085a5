"""``dispatcher up``: the whole stack on one machine, supervised.

It starts the simulator (unless ``--vllm-url``), the gateway and one worker as child processes, waits
for each one's own readiness endpoint, and stays in the foreground. When a child stops, ``up`` says
which one, with its last log lines, stops the others and exits non-zero. On Ctrl-C (SIGINT) or
SIGTERM it stops every child and waits for them.

Children run in their own session, so a Ctrl-C in the terminal reaches ``up`` only (each child then
gets exactly one signal from us, and prints no traceback); on Linux they also get SIGTERM should
``up`` itself die without a chance to clean up (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from dispatcher.processes import die_with_parent
from dispatcher.settings import CommonSettings

TAIL_LINES = 40
STOP_TIMEOUT = 15.0


class Stopped(Exception):
    """SIGINT or SIGTERM reached ``up``."""


class ComponentFailed(Exception):
    """A child stopped, or did not become ready in time (the message names it, with its last lines)."""


@dataclass
class Child:
    name: str
    argv: list[str]
    ready_url: str
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    reader: threading.Thread | None = None
    echo: bool = True  # off while stopping: the failure, not the shutdown chatter, is the last word

    def start(self) -> None:
        self.popen = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.reader = threading.Thread(target=self._relay_output, name=f"{self.name}-output", daemon=True)
        self.reader.start()

    def _relay_output(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self.echo:
                print(f"[{self.name}] {line}", flush=True)

    @property
    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.ready_url, timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def stop(self) -> None:
        self.echo = False
        if self.popen is not None and self.popen.poll() is None:
            # SIGTERM, not SIGINT: uvicorn re-raises a SIGINT it handled as KeyboardInterrupt (a
            # traceback), and a child still importing would print one too. The gateway's drain delay
            # is 0 under `up`, so SIGTERM is as quick.
            self.popen.send_signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        if self.popen is None:
            return
        try:
            self.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def failure(self, what: str) -> str:
        if self.reader is not None and self.exit_code is not None:
            self.reader.join(1.0)  # its output up to the end
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        return f"error: the {self.name} {what}. Its last lines:\n{lines}"


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def wait_ready(children: list[Child], timeout: float) -> None:
    """Until every child answers 200 on its readiness URL; fails fast when one exits."""
    deadline = time.monotonic() + timeout
    pending = list(children)
    while pending:
        for child in list(pending):
            if child.exit_code is not None:
                raise ComponentFailed(child.failure(f"stopped (exit code {child.exit_code}) before it was ready"))
            if child.ready():
                pending.remove(child)
        if pending and time.monotonic() > deadline:
            child = pending[0]
            raise ComponentFailed(child.failure(f"did not become ready at {child.ready_url} within {timeout:.0f}s"))
        if pending:
            time.sleep(0.2)


def supervise(children: list[Child]) -> None:
    """Until a child stops (then: ComponentFailed naming it)."""
    while True:
        for child in children:
            if child.exit_code is not None:
                raise ComponentFailed(child.failure(f"stopped unexpectedly (exit code {child.exit_code})"))
        time.sleep(0.5)


def run(args: argparse.Namespace, make_demo_token: Callable[[], str]) -> None:
    me = [sys.executable, "-m", "dispatcher.cli"]
    host = "127.0.0.1"
    simulator: Child | None = None
    vllm_url = args.vllm_url
    if not vllm_url:
        simulator = Child(
            "simulator",
            [*me, "simulate", "--model", args.model, "--port", str(args.simulator_port),
             "--max-num-seqs", str(args.max_concurrency)],
            f"http://{host}:{args.simulator_port}/health",
        )  # fmt: skip
        vllm_url = f"http://{host}:{args.simulator_port}/v1"
    gateway = Child(
        "gateway",
        [*me, "gateway", "--host", args.host, "--port", str(args.port)],
        f"http://{_local(args.host)}:{args.port}/ready",
        env={"DISPATCHER_METRICS_PORT": str(args.metrics_port), "DISPATCHER_DRAIN_DELAY": "0"},
    )
    worker = Child(
        "worker",
        [*me, "worker", "--model", args.model, "--vllm-url", vllm_url,
         "--max-concurrency", str(args.max_concurrency), "--http-port", str(args.worker_port)],
        f"http://{host}:{args.worker_port}/ready",
    )  # fmt: skip
    children = [c for c in (simulator, gateway, worker) if c is not None]
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    started: list[Child] = []
    try:
        if simulator is not None:
            started.append(simulator)
            simulator.start()
            wait_ready([simulator], args.ready_timeout)
        secret = make_demo_token()
        for child in (gateway, worker):
            started.append(child)
            child.start()
        wait_ready([gateway, worker], args.ready_timeout)
        _banner(args, secret)
        supervise(children)
    except ComponentFailed as exc:
        _stop(started)
        print(f"\n{exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Stopped as exc:
        print(f"\n{exc}: stopping {', '.join(c.name for c in started)}...", flush=True)
        _stop(started)
    finally:
        _stop(started)  # also on any other error: never leave children behind
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: list[Child]) -> None:
    # Further signals while stopping must not interrupt the wait (a second Ctrl-C, a repeated TERM).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    for child in children:
        child.stop()
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        child.wait_or_kill(deadline)


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _banner(args: argparse.Namespace, secret: str) -> None:
    base = f"http://{_local(args.host)}:{args.port}"
    sim = "" if args.vllm_url else f", simulator {args.simulator_port}"
    print(f"\ndispatcher is up: {base}/v1  (model {args.model!r}, token 'demo')", flush=True)
    print(
        f"ports: gateway {args.port}, gateway metrics {args.metrics_port}, worker {args.worker_port}{sim}\n",
        flush=True,
    )
    print(
        f"curl -N {base}/v1/chat/completions -H 'Authorization: Bearer {secret}' "
        f'-H \'Content-Type: application/json\' -d \'{{"model": "{args.model}", "stream": true, '
        f'"messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n',
        flush=True,
    )
    print("Press Ctrl-C to stop.", flush=True)


async def demo_token() -> str:
    """A fresh 'demo' token for this run (secrets are shown once, so the old one is replaced)."""
    from dispatcher.tokens import TokenStore, publish_invalidation

    settings = CommonSettings()
    store = TokenStore(settings.database_url)
    try:
        old = await store.delete("demo")
        secret = await store.add("demo", 5)
    finally:
        await store.close()
    await publish_invalidation(settings.redis_url, [old] if old else [])
    return secret


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "up",
        help="run the whole stack locally: simulator, gateway and a worker",
        description="Simulator (unless --vllm-url), gateway and one worker as supervised child processes.",
    )
    p.add_argument("--model", default="demo-model")
    p.add_argument("--host", default="127.0.0.1", help="the gateway's address")
    p.add_argument("--port", type=int, default=8080, help="the gateway's API port")
    p.add_argument("--metrics-port", type=int, default=9091, help="the gateway's /metrics port (0: on --port)")
    p.add_argument("--vllm-url", help="use this vLLM instead of starting the simulator")
    p.add_argument("--simulator-port", type=int, default=8000)
    p.add_argument("--worker-port", type=int, default=9090, help="the worker's /health, /ready, /metrics")
    p.add_argument("--max-concurrency", type=int, default=24, help="worker slots = simulator seqs (16+8)")
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds each component has to become ready")
    return p


def main(args: argparse.Namespace) -> None:
    from dispatcher.cli import _run

    run(args, lambda: _run(demo_token()))

"""``dispatcher up``: the whole stack on one machine, supervised.

It starts the simulator (unless ``--vllm-url``), the gateway and one worker as child processes, waits
for each one's own readiness endpoint, and stays in the foreground. When a child stops, ``up`` says
which one, with its last log lines, stops the others and exits non-zero. On Ctrl-C (SIGINT) or
SIGTERM it drains like a deployment: the gateway stops first and lets its open streams finish (or
ends them with an error event when ``--grace`` runs out), then the worker and the simulator stop. A
second Ctrl-C stops everything at once.

Children run in their own session, so a Ctrl-C in the terminal reaches ``up`` only (each child then
gets exactly one signal from us, and prints no traceback); on Linux they also get SIGTERM should
``up`` itself die without a chance to clean up (``PR_SET_PDEATHSIG``).

Local state (``dispatcher.local``): tokens in the default database (not in the current directory);
the demo token's secret and the usage stream in ``up.json``, so that a restart shows the same demo
token and ``dispatcher usage`` finds the stream without exports.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from llmdispatch.local import UpState, describe_database, stream_url_from_amqp, up_stream_name
from llmdispatch.processes import die_with_parent
from llmdispatch.settings import CommonSettings

TAIL_LINES = 40
STOP_TIMEOUT = 15.0  # for the worker and the simulator, once the gateway is gone
DEMO_TOKEN, DEMO_PRIORITY = "demo", 5


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
    ports: list[tuple[int, str]] = field(default_factory=list)  # (port, the flag of `up` that changes it)
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
        if self.popen is not None and self.popen.poll() is None:
            # SIGTERM, not SIGINT: uvicorn re-raises a SIGINT it handled as KeyboardInterrupt (a
            # traceback), and a child still importing would print one too. The gateway's drain delay
            # is 0 under `up`, so SIGTERM is as quick.
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()

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
        return f"error: the {self.name} {what}. Its last lines:\n{lines}{self.port_hint()}"

    def port_hint(self) -> str:
        """Which flag of `up` moves the port a child could not listen on."""
        text = "\n".join(self.tail).lower()
        if "address already in use" not in text:
            return ""
        for port, flag in self.ports:
            if re.search(rf"\b{port}\b", text):
                return (
                    f"\nPort {port} is taken: choose another one with {flag}, e.g. `dispatcher up {flag} {port + 1}`."
                )
        return f"\nA port of the {self.name} is taken: choose another one with {' or '.join(f for _, f in self.ports)}."


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


@dataclass
class Demo:
    """The token the banner shows: its name and priority; the secret when `up` made it."""

    name: str
    priority: int
    secret: str = ""
    note: str = ""


def usage_stream(settings: CommonSettings) -> tuple[str, str, str]:
    """(stream URL, stream name, why) for the ledger of this run; URL "" when there is no stream."""
    if os.environ.get("DISPATCHER_USAGE_STREAM_URL"):
        return settings.usage_stream_url, settings.usage_stream_name, "DISPATCHER_USAGE_STREAM_URL"
    url = stream_url_from_amqp(settings.amqp_url)
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5552), timeout=1).close()
    except OSError:
        return "", "", f"off: no RabbitMQ stream port at {parts.hostname}:{parts.port} (rabbitmq_stream plugin)"
    name = os.environ.get("DISPATCHER_USAGE_STREAM_NAME") or up_stream_name()
    return url, name, "this run's own stream"


def run(args: argparse.Namespace, make_demo_token: Callable[[], Demo]) -> None:
    me = [sys.executable, "-m", "llmdispatch.cli"]
    host = "127.0.0.1"
    settings = CommonSettings()
    stream_url, stream_name, stream_why = usage_stream(settings)
    ledger = {"DISPATCHER_USAGE_STREAM_URL": stream_url, "DISPATCHER_USAGE_STREAM_NAME": stream_name}
    if stream_url:
        state = UpState.load()
        state.usage_stream_url, state.usage_stream_name = stream_url, stream_name
        state.save()  # `dispatcher usage` reads the same stream without exports
    simulator: Child | None = None
    vllm_url = args.vllm_url
    if not vllm_url:
        simulator = Child(
            "simulator",
            [*me, "simulate", "--model", args.model, "--port", str(args.simulator_port),
             "--max-num-seqs", str(args.max_concurrency)],
            f"http://{host}:{args.simulator_port}/health",
            ports=[(args.simulator_port, "--simulator-port")],
        )  # fmt: skip
        vllm_url = f"http://{host}:{args.simulator_port}/v1"
    gateway = Child(
        "gateway",
        [*me, "gateway", "--host", args.host, "--port", str(args.port)],
        f"http://{_local(args.host)}:{args.port}/ready",
        env={
            **ledger,
            "DISPATCHER_METRICS_PORT": str(args.metrics_port),
            "DISPATCHER_DRAIN_DELAY": "0",  # no load balancer to wait for: close the listener at once
            "DISPATCHER_SHUTDOWN_GRACE": str(args.grace),
        },
        ports=[(args.port, "--port"), (args.metrics_port, "--metrics-port")],
    )
    worker = Child(
        "worker",
        [*me, "worker", "--model", args.model, "--vllm-url", vllm_url, "--backend", args.backend,
         "--max-concurrency", str(args.max_concurrency), "--http-port", str(args.worker_port)],
        f"http://{host}:{args.worker_port}/ready",
        env={**ledger, "DISPATCHER_SHUTDOWN_GRACE": str(args.grace)},
        ports=[(args.worker_port, "--worker-port")],
    )  # fmt: skip
    children = [c for c in (simulator, gateway, worker) if c is not None]
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    started: list[Child] = []
    try:
        if simulator is not None:
            started.append(simulator)
            simulator.start()
            wait_ready([simulator], args.ready_timeout)
        demo = make_demo_token()
        for child in (gateway, worker):
            started.append(child)
            child.start()
        wait_ready([gateway, worker], args.ready_timeout)
        _banner(args, demo, settings.database_url, stream_name if stream_url else "", stream_why)
        supervise(children)
    except ComponentFailed as exc:
        _stop(started, args.grace)
        print(f"\n{exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Stopped as exc:
        order = sorted(started, key=lambda c: c.name != "gateway")  # the order _stop goes in
        print(f"\n{exc}: stopping {', '.join(c.name for c in order)}...", flush=True)
        _stop(started, args.grace, drain=True)
    finally:
        _stop(started, args.grace)  # also on any other error: never leave children behind
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: list[Child], grace: float, *, drain: bool = False) -> None:
    """The gateway first: it stops taking requests and lets its streams finish (or ends them with an
    error event) within ``grace``, while the worker and the server still serve them; then the rest."""
    children = [c for c in children if c.exit_code is None]
    if not children:
        return
    for child in children:
        child.echo = False
    hurry = threading.Event()
    if drain:
        print(f"Letting open streams finish (up to {grace:.0f}s); Ctrl-C again stops at once.", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: hurry.set())
    else:  # further signals must not interrupt the wait (a second Ctrl-C, a repeated TERM)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    gateways = [c for c in children if c.name == "gateway"]
    for child in gateways:
        child.stop()
    deadline = time.monotonic() + grace + STOP_TIMEOUT
    for child in gateways:
        while child.exit_code is None and time.monotonic() < deadline and not hurry.is_set():
            time.sleep(0.1)
    rest = [c for c in children if c not in gateways]
    for child in rest:
        child.stop()
    if hurry.is_set():
        for child in children:
            child.kill()
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        child.wait_or_kill(deadline)


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _banner(args: argparse.Namespace, demo: Demo, database_url: str, stream: str, stream_why: str) -> None:
    base = f"http://{_local(args.host)}:{args.port}"
    sim = "" if args.vllm_url else f", simulator {args.simulator_port}"
    print(
        f"\ndispatcher is up: {base}/v1  (model {args.model!r}, token {demo.name!r} with priority {demo.priority})",
        flush=True,
    )
    print(
        f"ports: gateway {args.port}, gateway metrics {args.metrics_port}, worker {args.worker_port}{sim}", flush=True
    )
    print(f"tokens: {describe_database(database_url)} (dispatcher tokens ...)", flush=True)
    print(f"usage ledger: {f'stream {stream!r} (dispatcher usage)' if stream else stream_why}\n", flush=True)
    if demo.note:
        print(demo.note, flush=True)
    secret = demo.secret or "$TOKEN"
    print(
        f"curl -N {base}/v1/chat/completions -H 'Authorization: Bearer {secret}' "
        f'-H \'Content-Type: application/json\' -d \'{{"model": "{args.model}", "stream": true, '
        f'"messages": [{{"role": "user", "content": "Hello!"}}]}}\'\n',
        flush=True,
    )
    print("Press Ctrl-C to stop.", flush=True)


async def demo_token() -> Demo:
    """The 'demo' token: made once, its secret kept in up.json and shown again on every start.

    A 'demo' token `up` did not make (or one that was revoked since) is left as it is: never deleted.
    """
    from llmdispatch.tokens import TokenStore, hash_token

    settings = CommonSettings()
    state = UpState.load()
    store = TokenStore(settings.database_url)
    try:
        known = await store.lookup(hash_token(state.demo_secret)) if state.demo_secret else None
        if known is not None and known.name == DEMO_TOKEN:
            return Demo(DEMO_TOKEN, known.priority, state.demo_secret)
        rows = {row.name: row for row in await store.list()}
        if DEMO_TOKEN not in rows:
            state.demo_secret = await store.add(DEMO_TOKEN, DEMO_PRIORITY)
            state.save()
            return Demo(DEMO_TOKEN, DEMO_PRIORITY, state.demo_secret)
    finally:
        await store.close()
    row = rows[DEMO_TOKEN]
    revoked = " (revoked)" if row.revoked else ""
    note = (
        f"A token named {DEMO_TOKEN!r}{revoked} exists that this `up` did not make: it is left as it is, and its "
        f"secret is not known here. Use it as $TOKEN, or make one: dispatcher tokens add NAME --priority 5"
    )
    return Demo(DEMO_TOKEN, row.priority, note=note)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one (not "default: None")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "up",
        help="run the whole stack locally: simulator, gateway and a worker",
        description=(
            "Runs the vLLM simulator (or uses --vllm-url), the gateway and one worker as supervised child "
            f"processes, with a {DEMO_TOKEN!r} token (priority {DEMO_PRIORITY}, made once and shown on every "
            "start). Ctrl-C or SIGTERM drains: open streams get --grace seconds to finish."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model", default="demo-model", metavar="NAME", help="model name clients ask for (and the simulator serves)"
    )
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS", help="the gateway's address")
    p.add_argument("--port", type=int, default=8080, metavar="PORT", help="the gateway's API port")
    p.add_argument(
        "--metrics-port", type=int, default=9091, metavar="PORT", help="the gateway's /metrics port (0: on --port)"
    )
    p.add_argument(
        "--vllm-url", help="use this inference server (e.g. http://gpu-box:8000/v1) instead of the simulator"
    )
    p.add_argument(
        "--backend",
        choices=("vllm", "sglang", "llamacpp", "generic", "auto"),
        default="vllm",
        help="kind of server at --vllm-url: its load metrics, health and priority (the simulator is vllm)",
    )
    p.add_argument("--simulator-port", type=int, default=8000, metavar="PORT", help="the simulator's port")
    p.add_argument(
        "--worker-port", type=int, default=9090, metavar="PORT", help="the worker's /health, /ready, /metrics"
    )
    p.add_argument("--max-concurrency", type=int, default=24, metavar="N", help="worker slots = simulator seqs (16+8)")
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds open streams get to finish on Ctrl-C/SIGTERM",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds each component has to become ready",
    )
    return p


def main(args: argparse.Namespace) -> None:
    from llmdispatch.cli import _run

    run(args, lambda: _run(demo_token()))

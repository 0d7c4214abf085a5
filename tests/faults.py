"""Helpers for the reliability tests: raw SSE clients, the simulator's event log, a cuttable TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from tests.stack import Stack, free_port

T = TypeVar("T")


def chat(user: str, max_tokens: int, *, model: str, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "user": user,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Keep talking"}],
    }


@dataclass
class StreamResult:
    status: int
    events: list[bytes] = field(default_factory=list)
    comments: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    ended_at: float = 0.0

    @property
    def data(self) -> list[dict[str, Any]]:
        return [json.loads(e[6:]) for e in self.events if e.startswith(b"data: {")]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [d["error"] for d in self.data if "error" in d]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == b"data: [DONE]"

    def text(self) -> str:
        return "".join((c["choices"][0]["delta"].get("content") or "") for c in self.data if c.get("choices"))


async def read_stream(
    http: httpx.AsyncClient, stack: Stack, body: dict[str, Any], token: str, *, stop_after: int | None = None
) -> StreamResult:
    """POST a streamed request and collect its SSE events (closing early after ``stop_after`` data events)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with http.stream("POST", stack.gateway_url + "/v1/chat/completions", json=body, headers=headers) as r:
        result = StreamResult(r.status_code, headers=dict(r.headers))
        buffer = b""
        async for chunk in r.aiter_bytes():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b":"):
                    result.comments += 1
                else:
                    result.events.append(event)
            if stop_after is not None and len(result.events) >= stop_after:
                break
        if buffer.strip():
            result.events.append(buffer)
    result.ended_at = time.monotonic()
    return result


async def post(http: httpx.AsyncClient, stack: Stack, body: dict[str, Any], token: str) -> httpx.Response:
    return await http.post(
        stack.gateway_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    )


async def sim_log(http: httpx.AsyncClient, stack: Stack) -> list[dict[str, Any]]:
    return (await http.get(stack.simulator_url + "/sim/stats")).json()["log"]


def events_of(log: list[dict[str, Any]], user: str) -> list[str]:
    return [e["event"] for e in log if e["user"] == user]


async def queued_is(stack: Stack, count: int) -> bool:
    """Whether ``count`` requests wait in the stack's model queue (for ``until``)."""
    return await stack.queued() == count


async def until_event(
    http: httpx.AsyncClient, stack: Stack, user: str, event: str, timeout: float = 15.0
) -> dict[str, Any]:
    """The first simulator event ``event`` of ``user``, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in await sim_log(http, stack):
            if entry["user"] == user and entry["event"] == event:
                return entry
        await asyncio.sleep(0.02)
    seen = events_of(await sim_log(http, stack), user)
    raise TimeoutError(f"no {event!r} event for {user!r} in the simulator (saw {seen})")


async def until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


class Link:
    """One proxied connection: a client socket and its upstream socket."""

    def __init__(self, number: int, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.number = number
        self.client = client
        self.upstream = upstream
        # The client's own port (what the client process holds) and the proxy's port towards the
        # service (what the service, e.g. RabbitMQ's ``peer_port``, sees).
        self.client_port: int = client.get_extra_info("peername")[1]
        self.upstream_port: int = upstream.get_extra_info("sockname")[1]
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.closed = False
        self.opened_at = time.monotonic()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("flowing" if self.flowing.is_set() else "stalled")
        return f"<Link {self.number} client:{self.client_port} upstream:{self.upstream_port} {state}>"


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a real service, with faults on demand.

    It runs its own event loop in a thread, so it keeps forwarding while the test's loop is blocked
    (``Stack.start_worker`` waits synchronously) and can be driven from sync code (the chaos run).
    Faults, on every connection or on chosen ones (``links_of(pid)``):
    - ``reset(links)``: close with a TCP RST (``rst=False``: a clean FIN), as a dying load balancer does;
    - ``stall(links)``/``resume(links)``: stop forwarding both ways without closing, as a black hole does;
    - ``cut()``/``restore()`` (async, for the existing tests): refuse new connections and reset all.
    Subclasses may look at the bytes in ``on_data`` (tests/amqp_audit.py records AMQP methods there).
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.links: list[Link] = []
        self.blackholed = False  # new links start stalled too (see ``blackhole``)
        self._numbers = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle (sync) ---------------------------------------------------------------------------

    def open(self) -> TcpProxy:
        """Start the proxy's thread and listen (on the same port again after ``refuse``/``close``)."""
        if self._loop is None:
            ready = threading.Event()
            loop = asyncio.new_event_loop()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name=f"tcp-proxy-{self.target_port}", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        self._call(self._listen())
        return self

    def close(self) -> None:
        """Refuse new connections, reset every open one and stop the thread."""
        if self._loop is None:
            return
        self._call(self._refuse())
        self.reset()
        self._call(self._cancel_tasks())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop.close()
        self._loop = None

    def refuse(self) -> None:
        """Stop accepting connections (open ones go on)."""
        self._call(self._refuse())

    # -- faults (sync) -------------------------------------------------------------------------------

    def live(self) -> list[Link]:
        return [link for link in self.links if not link.closed]

    def links_of(self, pid: int) -> list[Link]:
        """The open links whose client is the process ``pid`` (matched by its sockets' local ports)."""
        ports = {
            c.laddr.port
            for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == self.port
        }
        return [link for link in self.live() if link.client_port in ports]

    def reset(self, links: list[Link] | None = None, *, rst: bool = True) -> int:
        """Close ``links`` (default: all open ones) on both sides; returns how many were open."""
        chosen = self.live() if links is None else [link for link in links if not link.closed]
        self._call(self._reset(chosen, rst))
        return len(chosen)

    def stall(self, links: list[Link] | None = None) -> int:
        """Stop forwarding on ``links`` (default: all open ones) both ways; sockets stay open."""
        chosen = self.live() if links is None else links
        self._call(self._set_flow(chosen, False))
        return len(chosen)

    def resume(self, links: list[Link] | None = None) -> None:
        self._call(self._set_flow(self.live() if links is None else links, True))

    def blackhole(self, on: bool = True) -> None:
        """Stall every open link and every new one (``on=False``: resume all), as a dead route does."""
        self.blackholed = on
        (self.stall if on else self.resume)()

    # -- the API of the first version, for tests running on the loop ---------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.open)

    async def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        await asyncio.to_thread(self._cut_all)

    async def restore(self) -> None:
        await asyncio.to_thread(self.open)

    def _cut_all(self) -> None:
        self.refuse()
        self.reset()

    # -- hooks ---------------------------------------------------------------------------------------

    def on_data(self, link: Link, from_client: bool, data: bytes) -> None:
        """Called on the proxy's loop with every chunk before it is forwarded."""

    def on_open(self, link: Link) -> None:
        """Called on the proxy's loop when a connection is established both ways."""

    # -- the proxy's loop ----------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "the proxy is not open"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _reset(self, links: list[Link], rst: bool) -> None:
        for link in links:
            link.closed = True
            link.flowing.set()  # a stalled pipe wakes up, sees the link closed and ends
            for writer in (link.client, link.upstream):
                _close(writer, rst)

    async def _cancel_tasks(self) -> None:
        """Let the reset links' pipes end, then cancel what is left (nothing pending when the loop stops)."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _set_flow(self, links: list[Link], flowing: bool) -> None:
        for link in links:
            (link.flowing.set if flowing else link.flowing.clear)()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            _close(writer, rst=True)
            return
        self._numbers += 1
        link = Link(self._numbers, writer, up_writer)
        if self.blackholed:
            link.flowing.clear()
        self.links.append(link)
        self.on_open(link)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    # Checked after the read too: nothing read before a stall passes during it.
                    await link.flowing.wait()
                    if link.closed:
                        break
                    self.on_data(link, from_client, data)
                    dst.write(data)
                    await dst.drain()
            if not link.closed:  # one side ended: end the other the same way (a clean close stays clean)
                link.closed = True
                _close(writer, rst=False)
                _close(up_writer, rst=False)

        with contextlib.suppress(asyncio.CancelledError):  # closing the proxy: not an error of the handler
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


def _close(writer: asyncio.StreamWriter, rst: bool) -> None:
    with contextlib.suppress(Exception):
        if rst:
            # Linger 0: the kernel answers with an RST instead of a FIN, as a dropped connection does.
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()


# -- judging a stream against a direct run ----------------------------------------------------------


def normalized(events: list[bytes]) -> list[Any]:
    """SSE data events without what differs between two runs of the same request (ids, timestamps)."""
    found: list[Any] = []
    for event in events:
        if not event.startswith(b"data: {"):
            found.append(event.decode())
            continue
        chunk = json.loads(event[6:])
        chunk.pop("id", None)
        chunk.pop("created", None)
        found.append(chunk)
    return found


async def direct_stream(http: httpx.AsyncClient, stack: Stack, body: dict[str, Any]) -> StreamResult:
    """The same request straight to the simulator: what the gateway must reproduce byte for byte."""
    body = {**body, "user": "direct-" + str(body.get("user"))}
    async with http.stream("POST", stack.simulator_url + "/v1/chat/completions", json=body) as r:
        result = StreamResult(r.status_code)
        raw = await r.aread()
    result.events = [e for e in raw.split(b"\n\n") if e.strip()]
    result.ended_at = time.monotonic()
    return result


def judge(result: StreamResult, reference: StreamResult) -> str:
    """The acceptance of issue 10 for one client stream: ``"complete"`` when it is the direct run's
    stream (ids and timestamps aside), ``"error"`` when it is a prefix of it followed by one
    OpenAI-style error event and ``[DONE]``; anything else (a repeat, a splice, a gap, a reorder, a
    changed chunk id, no clear end) fails."""
    assert result.status == 200, (result.status, result.events[:2])
    ids = {chunk.get("id") for chunk in result.data if "error" not in chunk}
    assert len(ids) <= 1, f"the chunk id changed within the stream: {ids}"
    got, want = normalized(result.events), normalized(reference.events)
    if got == want:
        return "complete"
    errors = [i for i, e in enumerate(got) if isinstance(e, dict) and "error" in e]
    assert errors, f"neither the direct run's stream nor an error: {len(got)} events vs {len(want)}"
    first = errors[0]
    error = got[first]["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["message"], error
    assert got[:first] == want[:first], "the part before the error is not the direct run's beginning"
    assert got[first + 1 :] == ["data: [DONE]"], f"events after the error: {got[first + 1 :]}"
    return "error"


async def stream_with_reference(
    http: httpx.AsyncClient, stack: Stack, body: dict[str, Any], token: str, hang_after: float
) -> tuple[StreamResult, StreamResult]:
    """A stream through the gateway and its direct run, side by side; a stream open after
    ``hang_after`` seconds counts as hung (TimeoutError)."""
    reference = asyncio.create_task(direct_stream(http, stack, body))
    try:
        result = await asyncio.wait_for(read_stream(http, stack, body, token), hang_after)
    finally:
        ref = await reference
    return result, ref


# -- broker-side connection cuts ---------------------------------------------------------------------


@dataclass
class BrokerConnection:
    pid: str  # the broker's Erlang pid of the connection process, as rabbitmqctl prints it
    peer_port: int
    name: str  # the client's connection_name


def machine_ctl(*args: str, table: bool = True) -> list[list[str]]:
    """``rabbitmqctl`` against the machine's broker (the one tests/stack.py uses by default)."""
    headers = ["--no-table-headers"] if table else []
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args, *headers], capture_output=True, text=True, timeout=60, check=True
    )
    return [line.split("\t") for line in result.stdout.splitlines() if line.strip()]


Ctl = Callable[..., list[list[str]]]


def broker_connections(ctl: Ctl = machine_ctl) -> list[BrokerConnection]:
    rows = ctl("list_connections", "pid", "peer_port", "client_properties")
    found = []
    for pid, port, properties in rows:
        match = re.search(r'\{"connection_name",(?:longstr,)?"([^"]*)"\}', properties)
        found.append(BrokerConnection(pid, int(port), match.group(1) if match else ""))
    return found


def local_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of the TCP connections that process ``pid`` (and its children) hold to ``remote_port``."""
    process = psutil.Process(pid)
    ports: set[int] = set()
    for proc in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            ports.update(
                c.laddr.port for c in proc.net_connections(kind="tcp") if c.raddr and c.raddr.port == remote_port
            )
    return ports


def close_broker_connections(
    peer_ports: set[int],
    reason: str,
    *,
    ctl: Ctl = machine_ctl,
    only: Callable[[str], bool] = lambda name: True,
    known: list[BrokerConnection] | None = None,
) -> list[str]:
    """``rabbitmqctl close_connection`` every connection whose client port is in ``peer_ports`` (and
    whose name passes ``only``); returns the names of those it closed. ``known``: a listing made
    beforehand (``rabbitmqctl`` takes a second or more to start: list before the moment to cut)."""
    chosen = [
        connection
        for connection in (broker_connections(ctl) if known is None else known)
        if connection.peer_port in peer_ports and only(connection.name)
    ]
    # Side by side: one cut, as a node or a load balancer makes it, not one per rabbitmqctl start-up.
    with ThreadPoolExecutor(max_workers=max(1, len(chosen))) as pool:
        list(pool.map(lambda connection: ctl("close_connection", connection.pid, reason, table=False), chosen))
    return [connection.name for connection in chosen]


# -- a Redis of the test's own ----------------------------------------------------------------------


class RedisServer:
    """A redis-server of the test's own on a free port, to stop (SIGSTOP: a hung node), kill and restart.

    Never the machine's Redis: other tests and engineers use that one.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=(self.workdir / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process dies only once it runs
            self.process.kill()
            self.process.wait(10)

    close = kill

"""How fast this machine runs the kind of work a hop does, so that CPU figures from different machines
can be compared: the same code took 4.4 ms of gateway CPU per request on one 2-core machine of this
kind and 2.4 ms on another.

- ``python_loop_ms``: a fixed pure-Python loop (dict stores and string formatting), best of five;
- ``loopback_round_trip_us``: one small message there and back over a loopback TCP connection between
  two asyncio protocols (uvloop when installed, as the services run): an event-loop wake-up and a
  socket write each way, which is what relaying a token costs the gateway and the worker.
"""

from __future__ import annotations

import asyncio
import time

ROUND_TRIPS = 5000


def python_loop_ms() -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        table: dict[int, str] = {}
        for i in range(200_000):
            table[i & 1023] = str(i)
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class _Pinger(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[float]) -> None:
        self.done = done
        self.left = ROUND_TRIPS
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.started = time.perf_counter()
        transport.write(b"x")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.left -= 1
        if self.left:
            self.transport.write(b"x")  # type: ignore[attr-defined]
        elif not self.done.done():
            self.done.set_result(time.perf_counter() - self.started)


async def _round_trips() -> float:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    done: asyncio.Future[float] = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _Pinger(done), "127.0.0.1", port)
    try:
        elapsed = await asyncio.wait_for(done, 30)
    finally:
        transport.close()
        server.close()
        await server.wait_closed()
    return elapsed / ROUND_TRIPS


def loopback_round_trip_us() -> float:
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    return round(min(run(_round_trips()) for _ in range(3)) * 1e6, 1)


def machine_speed() -> dict[str, float]:
    return {"python_loop_ms": python_loop_ms(), "loopback_round_trip_us": loopback_round_trip_us()}


if __name__ == "__main__":
    print(machine_speed())

"""A recording AMQP 0-9-1 proxy and a checker for what RabbitMQ 4.3 denies by default.

``AuditProxy`` sits between clients and a broker (tests/faults.py's TCP proxy) and decodes the
client-to-broker method frames with pamqp: every ``queue.declare``, ``basic.qos``, ``basic.publish``...
is recorded with its connection's ``connection_name``, channel and arguments. From the broker it
records only ``connection.close`` and ``channel.close`` (how 4.3 refuses a deprecated feature).
Content header and body frames are skipped unparsed.

``deprecated_uses`` lists the uses of features RabbitMQ 4.3 denies by default
(``deprecated_features.permit.* = false``) or no longer has:
- ``global_qos``: ``basic.qos`` with ``global=true``;
- ``transient_nonexcl_queues``: ``queue.declare`` (not passive) with durable=false and exclusive=false;
- ``queue_master_locator``: the ``x-queue-master-locator`` argument;
- ``classic_queue_v1``: ``x-queue-mode`` (lazy queues are CQv1) or ``x-queue-version`` = 1;
- ``classic_queue_mirroring``: ``x-ha-*`` arguments (mirroring is a policy, but a client setting them
  expects it).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from pamqp import commands, frame
from pamqp.exceptions import UnmarshalingException

from tests.faults import Link, TcpProxy

PROTOCOL_HEADER = b"AMQP"
FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_END = 0xCE
# (class id, method id) of the broker's closes: the only broker-to-client methods worth decoding here.
_BROKER_CLOSES = {(10, 50), (20, 40)}


@dataclass(frozen=True)
class Method:
    """One AMQP method as it crossed the proxy."""

    link: int  # the proxied TCP connection (Link.number)
    connection_name: str  # the client's ``connection_name`` property ("" when it sets none)
    channel: int
    name: str  # pamqp's name: "Basic.Qos", "Queue.Declare", ...
    fields: dict[str, Any]
    from_client: bool = True

    def __str__(self) -> str:
        who = self.connection_name or f"link {self.link}"
        return f"{who} ch{self.channel} {self.name} {self.fields}"


@dataclass(frozen=True)
class Violation:
    feature: str  # RabbitMQ's deprecated-feature name
    method: Method

    def __str__(self) -> str:
        return f"{self.feature}: {self.method}"


class FrameParser:
    """Cuts a byte stream into AMQP frames; decodes method frames, skips the others."""

    def __init__(self, from_client: bool) -> None:
        self.from_client = from_client
        self._buffer = bytearray()
        self._header_seen = not from_client  # only clients send the protocol header
        self.errors: list[str] = []
        self.body_sizes: list[int] = []  # of every message the client published (content header frames)

    def feed(self, data: bytes) -> list[tuple[int, Any]]:
        """Returns (channel, pamqp frame) for every complete method frame worth decoding."""
        self._buffer += data
        found: list[tuple[int, Any]] = []
        if not self._header_seen:
            if len(self._buffer) < 8:
                return found
            if not self._buffer.startswith(PROTOCOL_HEADER):
                self.errors.append(f"not AMQP: {bytes(self._buffer[:8])!r}")
            del self._buffer[:8]
            self._header_seen = True
        while len(self._buffer) >= 7:
            kind, channel, size = struct.unpack_from(">BHI", self._buffer)
            end = 7 + size + 1
            if len(self._buffer) < end:
                break
            raw = bytes(self._buffer[:end])
            del self._buffer[:end]
            if raw[-1] != FRAME_END:
                self.errors.append(f"bad frame end on channel {channel}")
                continue
            if kind == FRAME_HEADER and self.from_client:
                self.body_sizes.append(struct.unpack_from(">Q", raw, 11)[0])  # after class id and weight
            if kind != FRAME_METHOD:
                continue
            if not self.from_client and struct.unpack_from(">HH", raw, 7) not in _BROKER_CLOSES:
                continue
            try:
                _, _, value = frame.unmarshal(raw)
            except UnmarshalingException as exc:
                self.errors.append(f"cannot decode a method frame on channel {channel}: {exc}")
                continue
            found.append((channel, value))
        return found


def _fields(value: Any) -> dict[str, Any]:
    """A method's arguments as a plain dict (pamqp keeps them in slots)."""
    return {name: getattr(value, name) for name in getattr(type(value), "__slots__", ()) if hasattr(value, name)}


class AuditProxy(TcpProxy):
    """A TCP proxy to a broker that records every AMQP method its clients send."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        super().__init__(target_port, target_host)
        self.methods: list[Method] = []
        self.errors: list[str] = []
        self._parsers: dict[tuple[int, bool], FrameParser] = {}
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()  # the proxy's thread appends, the test's thread reads

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{vhost}"

    def on_open(self, link: Link) -> None:
        self._parsers[link.number, True] = FrameParser(from_client=True)
        self._parsers[link.number, False] = FrameParser(from_client=False)

    def on_data(self, link: Link, from_client: bool, data: bytes) -> None:
        parser = self._parsers[link.number, from_client]
        for channel, value in parser.feed(data):
            if isinstance(value, commands.Connection.StartOk):
                self._names[link.number] = str((value.client_properties or {}).get("connection_name", ""))
            method = Method(link.number, self._names.get(link.number, ""), channel, value.name, _fields(value),
                            from_client)  # fmt: skip
            with self._lock:
                self.methods.append(method)
        if parser.errors:
            with self._lock:
                self.errors.extend(parser.errors)
            parser.errors.clear()

    def body_sizes(self) -> list[int]:
        """Body sizes of the messages clients published, in order per connection."""
        return [size for (_, from_client), parser in list(self._parsers.items()) if from_client
                for size in parser.body_sizes]  # fmt: skip

    def recorded(self) -> list[Method]:
        with self._lock:
            return list(self.methods)

    def clear(self) -> None:
        with self._lock:
            self.methods.clear()
            self.errors.clear()


def deprecated_uses(methods: list[Method]) -> list[Violation]:
    """Every use of a feature RabbitMQ 4.3 denies by default (or no longer has)."""
    found: list[Violation] = []
    for method in methods:
        if not method.from_client:
            continue
        if method.name == "Basic.Qos" and method.fields.get("global_"):
            found.append(Violation("global_qos", method))
        if method.name != "Queue.Declare" or method.fields.get("passive"):
            continue  # a passive declare only checks: the broker ignores its flags and arguments
        if not method.fields.get("durable") and not method.fields.get("exclusive"):
            found.append(Violation("transient_nonexcl_queues", method))
        arguments = method.fields.get("arguments") or {}
        if "x-queue-master-locator" in arguments:
            found.append(Violation("queue_master_locator", method))
        if "x-queue-mode" in arguments or str(arguments.get("x-queue-version", "")) == "1":
            found.append(Violation("classic_queue_v1", method))
        if any(key.startswith(("x-ha-", "ha-")) for key in arguments):
            found.append(Violation("classic_queue_mirroring", method))
    return found


def broker_closes(methods: list[Method]) -> list[Method]:
    """Connection or channel closes the broker sent with an error code (200 is a normal close)."""
    return [m for m in methods if not m.from_client and m.fields.get("reply_code", 200) != 200]


@dataclass
class Summary:
    """Who sent what: method counts per connection name, for a report or an assertion message."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, methods: list[Method]) -> Summary:
        summary = cls()
        for method in methods:
            if method.from_client:
                per = summary.counts.setdefault(method.connection_name or f"link {method.link}", {})
                per[method.name] = per.get(method.name, 0) + 1
        return summary

    def __str__(self) -> str:
        return "\n".join(
            f"{name}: " + ", ".join(f"{m} x{n}" for m, n in sorted(per.items()))
            for name, per in sorted(self.counts.items())
        )

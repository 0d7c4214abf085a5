"""The usage ledger followed as it is written, for tests that look requests up one by one."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from rstream import Consumer, ConsumerOffsetSpecification, MessageContext, OffsetType

from llmdispatch.usage import StreamAddress, UsageRecord, decode_record


class LedgerFollower:
    """Every record of a usage stream from its first, collected as it is written by one consumer in a
    thread of its own (so that a test can look a request up at once, with no reader start-up per look)."""

    def __init__(self, url: str, stream: str) -> None:
        self.url = url
        self.stream = stream
        self.records: list[UsageRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None

    def start(self) -> LedgerFollower:
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="ledger-follower", daemon=True)
        self._thread.start()
        self._loop = loop
        asyncio.run_coroutine_threadsafe(self._subscribe(), loop).result(20)
        return self

    async def _subscribe(self) -> None:
        address = StreamAddress.parse(self.url)
        self._consumer = Consumer(address.host, connection_name="test-ledger-follower", **address.connect_kwargs())  # type: ignore[arg-type]

        def on_message(data: bytes, _: MessageContext) -> None:
            record = decode_record(data)
            if record is not None:
                self.records.append(record)  # list.append: safe to read from the test's thread

        await self._consumer.subscribe(
            self.stream, on_message, offset_specification=ConsumerOffsetSpecification(OffsetType.FIRST, None)
        )

    def of(self, request_id: str) -> list[UsageRecord]:
        return [record for record in self.records if record.request_id == request_id]

    async def wait(self, request_id: str, timeout: float = 10.0) -> list[UsageRecord]:
        """``request_id``'s records once there is one (or none after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while not (found := self.of(request_id)) and time.monotonic() < deadline:  # noqa: ASYNC110 - another thread fills it
            await asyncio.sleep(0.05)
        return found

    def close(self) -> None:
        if self._loop is None:
            return
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._consumer.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop.close()
        self._loop = None

"""The worker's side of the usage ledger: append records to the RabbitMQ stream, off the request path.

``record()`` only appends to a bounded buffer; a background task sends the buffer as one batch
every ``flush_interval``. When the stream is unreachable the task reconnects with a back-off and
keeps up to ``max_buffer`` records meanwhile (the oldest are dropped and counted beyond that):
a ledger outage never slows or fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from rstream import Producer

from dispatcher.metrics import worker_metrics
from dispatcher.usage import StreamAddress, UsageRecord, encode_record

log = logging.getLogger("dispatcher.worker.usage")

# Records per publish frame: ~500 bytes each keeps a frame well under the 1 MB frame_max.
BATCH = 500


class UsageLedger:
    def __init__(
        self,
        url: str,
        stream: str,
        *,
        max_age: str,
        max_bytes: int,
        flush_interval: float = 0.2,
        max_buffer: int = 100_000,
        send_timeout: float = 10.0,
    ) -> None:
        self.address = StreamAddress.parse(url)
        self.stream = stream
        self.arguments: dict[str, object] = {"max-length-bytes": max_bytes, "max-age": max_age}
        self.flush_interval = flush_interval
        self.send_timeout = send_timeout
        self._buffer: deque[bytes] = deque(maxlen=max_buffer)
        self._producer: Producer | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wakeup = asyncio.Event()
        self._counts = worker_metrics().usage_records

    def record(self, record: UsageRecord) -> None:
        """Queue one record; never blocks, never raises."""
        if len(self._buffer) == self._buffer.maxlen:
            self._counts.labels("dropped").inc()  # the deque drops the oldest
        self._buffer.append(encode_record(record))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (for up to ``timeout`` seconds), then disconnect."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                pass  # wait_for cancelled it
        if self._buffer:
            log.warning("usage ledger: %d records not sent at shutdown", len(self._buffer))
            self._counts.labels("dropped").inc(len(self._buffer))
            self._buffer.clear()
        await self._disconnect()

    async def _run(self) -> None:
        backoff = 0.5
        while not (self._closing and not self._buffer):
            try:
                if self._producer is None:
                    await self._connect()
                    backoff = 0.5
                await self._send_buffered()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "usage ledger: stream %s unreachable (%s); retrying", self.stream, exc or type(exc).__name__
                )
                await self._disconnect()
                if self._closing:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if self._closing:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.flush_interval)
            self._wakeup.clear()

    async def _connect(self) -> None:
        producer = Producer(
            self.address.host,
            connection_name="dispatcher-worker-usage",
            **self.address.connect_kwargs(),  # type: ignore[arg-type]
        )
        try:
            await asyncio.wait_for(producer.start(), self.send_timeout)
            await asyncio.wait_for(
                producer.create_stream(self.stream, arguments=self.arguments, exists_ok=True), self.send_timeout
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.close()
            raise
        self._producer = producer

    async def _send_buffered(self) -> None:
        while self._buffer and self._producer is not None:
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), BATCH))]
            try:
                # send_batch writes the frame and returns (no wait for the confirm).
                await asyncio.wait_for(self._producer.send_batch(self.stream, batch), self.send_timeout)
            except BaseException:
                self._buffer.extendleft(reversed(batch))  # for the next connection
                raise
            self._counts.labels("sent").inc(len(batch))

    async def _disconnect(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.close(), 5.0)

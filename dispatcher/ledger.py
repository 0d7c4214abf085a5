"""The usage ledger's producer: every record reaches the RabbitMQ stream, confirmed, exactly once.

``commit(record)`` returns once the stream has confirmed that record (publisher confirms), or after
``commit_timeout``; ``record(record)`` is the same without waiting. Either way the record is first
appended to a local write-ahead log (``dispatcher/wal.py``) and stays there until confirmed, so a
crash, a broker restart or a long outage never loses it: the next process replays the file.

One sender task writes whatever was committed since its last write as one publish frame, and
confirms come back asynchronously, so concurrent requests share a round trip instead of queueing
one behind another.

Exactly once: each record has a publishing id from the log and every process a publisher name kept
in its log file; the stream drops a (name, id) it already stored, so resending after a lost
confirm or a crash never writes a record twice. Readers also count each request id once.

Outage: records pile up in the log (and in memory). Beyond ``max_pending_bytes`` the ledger is
``full``: it keeps every record (nothing is ever dropped), logs it, sets
``dispatcher_usage_ledger_full`` and the worker stops taking new requests until the stream is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from rstream import Producer
from rstream.producer import ConfirmationStatus
from rstream.recovery import BackOffRecoveryStrategy
from rstream.utils import RawMessage

from llmdispatch.usage import StreamAddress, UsageRecord, decode_record, encode_record
from llmdispatch.wal import WalBusy, WriteAheadLog, default_path

log = logging.getLogger("dispatcher.usage.ledger")

FRAME_BYTES = 900_000  # per publish frame: under the stream protocol's 1 MB frame_max
COMMIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class LedgerMetrics:
    def __init__(self) -> None:
        self.records = Counter(
            "dispatcher_usage_ledger_records",
            "Usage records: appended (to the write-ahead log), confirmed (stored by the stream), "
            "replayed (found in the log at start), late (a commit timed out; sent later), "
            "unlogged (the log could not be written: kept in memory only).",
            ["result"],
        )
        self.pending = Gauge(
            "dispatcher_usage_ledger_pending_records",
            "Records not confirmed by the stream yet.",
            multiprocess_mode="livesum",
        )
        self.pending_bytes = Gauge(
            "dispatcher_usage_ledger_pending_bytes", "Bytes of records not confirmed yet.", multiprocess_mode="livesum"
        )
        self.full = Gauge(
            "dispatcher_usage_ledger_full",
            "1 while unconfirmed records exceed DISPATCHER_USAGE_WAL_MAX_BYTES (the worker takes no new requests).",
            multiprocess_mode="livemax",
        )
        self.connected = Gauge(
            "dispatcher_usage_ledger_connected", "1 while the usage stream is reachable.", multiprocess_mode="livemin"
        )
        self.oldest_pending = Gauge(
            "dispatcher_usage_ledger_oldest_pending_seconds",
            "Age of the oldest record the stream has not confirmed (0: none), counted from when this process "
            "appended or replayed it; updated at least every few seconds while the sender retries.",
            multiprocess_mode="livemax",
        )
        self.commit_seconds = Histogram(
            "dispatcher_usage_commit_seconds",
            "From a request's end to the stream's confirm of its usage record.",
            buckets=COMMIT_BUCKETS,
        )


def wal_setting(value: str) -> str | None:
    """``DISPATCHER_USAGE_WAL``: a path, ``""`` for the default path, ``off`` for no log."""
    return None if value.strip().lower() in ("off", "none", "false") else value


@functools.cache
def ledger_metrics() -> LedgerMetrics:
    return LedgerMetrics()


class _Entry:
    __slots__ = ("added", "data", "done", "sent")

    def __init__(self, data: bytes, done: asyncio.Future[None]) -> None:
        self.data = data
        self.done = done
        self.added = time.monotonic()
        self.sent = 0.0  # monotonic time of the last write to the stream (0: not written)


class Ledger:
    def __init__(
        self,
        url: str,
        stream: str,
        *,
        max_age: str = "30D",
        max_bytes: int = 5_000_000_000,
        wal: str | Path | None = "",
        max_pending_bytes: int = 64 * 1024 * 1024,
        commit_timeout: float = 2.0,
        send_timeout: float = 5.0,
        compact_bytes: int = 1024 * 1024,
        connection_name: str = "dispatcher-usage",
    ) -> None:
        """``wal``: the log's path; ``""`` the default path; ``None`` no log (memory only: a crash loses
        unconfirmed records)."""
        self.address = StreamAddress.parse(url)
        self.stream = stream
        self.arguments: dict[str, object] = {"max-length-bytes": max_bytes, "max-age": max_age}
        self.wal = None if wal is None else WriteAheadLog(wal or default_path(stream), stream)
        # Without a log, a name of this process's own: ids restart at 1 with the next process.
        self.publisher = f"dispatcher-usage-{uuid.uuid4().hex[:16]}"
        self.max_pending_bytes = max_pending_bytes
        self.commit_timeout = commit_timeout
        self.send_timeout = send_timeout
        self.compact_bytes = compact_bytes
        self.connection_name = connection_name
        self._pending: dict[int, _Entry] = {}  # publishing id -> entry, oldest first
        self._pending_bytes = 0
        self._unsent: deque[int] = deque()
        self._next_id = 1  # without a log
        self._producer: Producer | None = None
        self._on_confirm_current: functools.partial[None] | None = None  # the current producer's callback
        self._broken = False
        self._generation: object = None
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._wake: asyncio.Future[None] | None = None  # the sender waits on it (a bare future: one loop hop)
        self._full = False
        self.frames = 0  # publish frames written (records per frame = how well commits are batched)
        self._down_since: float | None = None
        self._adopter: asyncio.Task[None] | None = None
        self._syncer: asyncio.Task[None] | None = None
        self.metrics = ledger_metrics()

    # -- the request path --------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """Unconfirmed records above the bound: the stream has been unreachable for long."""
        return self._full

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, record: UsageRecord) -> asyncio.Future[None]:
        """Log one record and queue it for the stream; the future resolves on the stream's confirm."""
        if not self._started:
            self.start_soon()
        data = encode_record(record)
        publishing_id = 0
        if self.wal is not None:
            try:
                publishing_id = self.wal.append(data)
            except OSError as exc:  # disk full, I/O error: still sent, only not crash-proof
                self.metrics.records.labels("unlogged").inc()
                log.error("usage ledger: cannot write the log %s (%s); record kept in memory", self.wal.path, exc)
                publishing_id = self.wal.next_id
                self.wal.next_id += 1
        else:
            publishing_id, self._next_id = self._next_id, self._next_id + 1
        done = asyncio.get_running_loop().create_future()
        self._add(publishing_id, data, done)
        self.metrics.records.labels("appended").inc()
        return done

    async def commit(self, record: UsageRecord, timeout: float | None = None) -> bool:
        """Log the record and wait for the stream's confirm: True once confirmed; False after the
        timeout (the record stays in the log and is sent when the stream is back)."""
        started = time.monotonic()
        done = self.record(record)
        try:
            # Awaited directly (no wrapper task): the end of every request pays this, in loop hops too.
            async with asyncio.timeout(self.commit_timeout if timeout is None else timeout):
                await done
        except TimeoutError:  # `done` is cancelled with it; the record stays pending and is sent later
            self.metrics.records.labels("late").inc()
            return False
        self.metrics.commit_seconds.observe(time.monotonic() - started)
        return True

    def _add(self, publishing_id: int, data: bytes, done: asyncio.Future[None]) -> None:
        self._pending[publishing_id] = _Entry(data, done)
        self._pending_bytes += len(data)
        self._unsent.append(publishing_id)
        self._update_gauges()
        self._wake_sender()

    def _wake_sender(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the log (replaying what a predecessor left) and start sending in the background."""
        self.start_soon()

    def start_soon(self) -> None:
        """``start`` from synchronous code running in the event loop."""
        if self._started:
            return
        self._started = True
        if self.wal is not None:
            try:
                entries = self.wal.open()
            except (OSError, WalBusy) as exc:  # e.g. a read-only filesystem: serve, and say so loudly
                log.error(
                    "usage ledger: cannot open the write-ahead log %s (%s): running without one, so a crash "
                    "loses unconfirmed records; set DISPATCHER_USAGE_WAL to a writable path",
                    self.wal.base, exc,
                )  # fmt: skip
                self.wal, entries = None, []
        if self.wal is not None:
            self.publisher = self.wal.publisher  # kept across restarts, for deduplication
            loop = asyncio.get_running_loop()
            entries = [(pid, data) for pid, data in entries if decode_record(data) is not None]  # torn: skip
            for publishing_id, data in entries:
                self._add(publishing_id, data, loop.create_future())
            if entries:
                self.metrics.records.labels("replayed").inc(len(entries))
                log.warning(
                    "usage ledger: replaying %d records from %s (the stream drops those it already has)",
                    len(entries), self.wal.path,
                )  # fmt: skip
        self._task = asyncio.create_task(self._run())
        if self.wal is not None:
            self._syncer = asyncio.create_task(self._sync_periodically())

    async def flush(self, timeout: float) -> bool:
        """Wait until every record so far is confirmed (True) or ``timeout`` passes (False)."""
        waiting = list(self._pending)
        deadline = time.monotonic() + timeout
        while any(pid in self._pending for pid in waiting):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is pending for up to ``timeout`` seconds, then disconnect. Anything still
        unconfirmed stays in the log for the next start."""
        if not self._started or self._closing:
            return
        await self.flush(timeout)
        self._closing = True
        self._wake_sender()
        if self._task is not None:
            _, running = await asyncio.wait((self._task,), timeout=1.0)
            if running:  # e.g. sleeping before a reconnect
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
        if self._adopter is not None and not self._adopter.done():
            self._adopter.cancel()  # an orphan file not sent yet stays for the next start
            with contextlib.suppress(asyncio.CancelledError):
                await self._adopter
        await self._disconnect()
        if self._pending:
            where = self.wal.path if self.wal is not None else "nowhere (no write-ahead log: lost)"
            log.warning("usage ledger: %d records not confirmed at shutdown, kept in %s", len(self._pending), where)
        if self.wal is not None:
            self.wal.compact(((pid, entry.data) for pid, entry in self._pending.items()), durable=True)
            self.wal.close(remove=not self._pending)

    # -- the sender --------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.5
        while not self._closing:
            self._update_age()
            try:
                if self._producer is None or self._broken:
                    await self._disconnect()
                    await self._connect()
                    backoff = 0.5
                    if self._adopter is None and self.wal is not None:
                        self._adopter = asyncio.create_task(self._adopt_orphans())
                await self._send_unsent()
                self._check_stalled()
                self._maybe_compact()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._went_down(exc)
                await self._disconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not self._unsent and not self._broken:
                self._wake = asyncio.get_running_loop().create_future()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):  # also checks for stalled confirms twice a second
                        await self._wake
                if self._closing:
                    return
            self._wake = None

    async def _sync_periodically(self) -> None:
        """Machine crashes: unconfirmed records reach the disk within a second. Its own task, off the
        sender's path: an fsync can take long on a busy disk, and sending must not wait for it."""
        while self.wal is not None:
            await asyncio.sleep(1.0)
            if self._pending and self.wal is not None:
                try:
                    await asyncio.to_thread(self.wal.sync)
                except OSError as exc:  # e.g. the file was just compacted (replaced): the next round syncs it
                    log.debug("usage ledger: fsync: %s", exc)

    async def _adopt_orphans(self) -> None:
        """Send the files of processes that are gone and were not restarted on this path (another
        process of several on one host), each under its own publisher name, so the stream deduplicates."""
        assert self.wal is not None
        for orphan, entries in self.wal.orphans():
            sent = False
            try:
                entries = [(pid, data) for pid, data in entries if decode_record(data) is not None]
                if entries:
                    await self._send_once(orphan.publisher, entries)
                sent = True
                log.warning(
                    "usage ledger: sent %d records left in %s by a process that is gone", len(entries), orphan.path
                )
            except Exception as exc:
                log.warning("usage ledger: could not send %s yet (%s); next start", orphan.path, exc)
            finally:
                orphan.close(remove=sent)

    async def _send_once(self, publisher: str, entries: list[tuple[int, bytes]], timeout: float = 30.0) -> None:
        """Send ``entries`` as ``publisher`` on a connection of their own; return once all are confirmed."""
        waiting = {pid for pid, _ in entries}
        all_confirmed = asyncio.Event()

        def on_confirm(status: ConfirmationStatus) -> None:
            if status.is_confirmed:
                waiting.discard(status.message_id)
                if not waiting:
                    all_confirmed.set()

        producer = Producer(
            self.address.host,
            connection_name=self.connection_name + "-replay",
            recovery_strategy=BackOffRecoveryStrategy(enable=False),
            **self.address.connect_kwargs(),  # type: ignore[arg-type]
        )
        try:
            await asyncio.wait_for(producer.start(), self.send_timeout)
            batch: list[RawMessage] = []
            size = 0
            for pid, data in [*entries, (0, b"")]:  # (0, b""): the end, flush the last frame
                if batch and (not data or size + len(data) > FRAME_BYTES):
                    await asyncio.wait_for(
                        producer.send_batch(
                            self.stream, batch, publisher_name=publisher, on_publish_confirm=on_confirm
                        ),
                        self.send_timeout,
                    )
                    batch, size = [], 0
                if data:
                    batch.append(RawMessage(data, publishing_id=pid))
                    size += len(data) + 12
            await asyncio.wait_for(all_confirmed.wait(), timeout)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.close(), 2.0)

    async def _connect(self) -> None:
        generation = object()  # callbacks from an older, closed producer are ignored
        producer = Producer(
            self.address.host,
            connection_name=self.connection_name,
            on_close_handler=functools.partial(self._on_closed, generation),
            # We reconnect ourselves and resend everything unconfirmed, in publishing-id order.
            recovery_strategy=BackOffRecoveryStrategy(enable=False),
            **self.address.connect_kwargs(),  # type: ignore[arg-type]
        )
        try:
            await asyncio.wait_for(producer.start(), self.send_timeout)
            await asyncio.wait_for(
                producer.create_stream(self.stream, arguments=self.arguments, exists_ok=True), self.send_timeout
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.close(), 2.0)
            raise
        self._producer, self._broken, self._generation = producer, False, generation
        # One callback object per producer: rstream keys its confirm waiters by the callback.
        self._on_confirm_current = functools.partial(self._on_confirm, generation)
        # Resend everything unconfirmed, oldest first: the stream drops what it already has.
        self._unsent = deque(self._pending)
        for entry in self._pending.values():
            entry.sent = 0.0
        if self._down_since is not None:
            log.warning(
                "usage ledger: stream %s reachable again after %.1f s; sending %d records",
                self.stream, time.monotonic() - self._down_since, len(self._pending),
            )  # fmt: skip
            self._down_since = None
        self.metrics.connected.set(1)

    async def _send_unsent(self) -> None:
        producer, callback = self._producer, self._on_confirm_current
        while self._unsent and producer is not None and callback is not None and not self._broken:
            batch: list[RawMessage] = []
            size = 0
            while self._unsent and size < FRAME_BYTES:
                publishing_id = self._unsent.popleft()
                entry = self._pending.get(publishing_id)
                if entry is None:
                    continue  # confirmed meanwhile (resent after a reconnect)
                batch.append(RawMessage(entry.data, publishing_id=publishing_id))
                size += len(entry.data) + 12
            if not batch:
                return
            try:
                async with asyncio.timeout(self.send_timeout):  # no wrapper task: one loop hop less per frame
                    await producer.send_batch(
                        self.stream, batch, publisher_name=self.publisher, on_publish_confirm=callback
                    )
            except BaseException:
                self._unsent.extendleft(reversed([m.publishing_id for m in batch]))  # type: ignore[misc]
                raise
            self.frames += 1
            now = time.monotonic()
            for message in batch:
                if (entry := self._pending.get(message.publishing_id)) is not None:  # type: ignore[arg-type]
                    entry.sent = now

    def _on_confirm(self, generation: object, status: ConfirmationStatus) -> None:
        entry = self._pending.get(status.message_id)
        if entry is None:
            return
        if not status.is_confirmed:
            if generation is not self._generation:
                return  # an old connection's failures: its records were resent already
            # Connection lost (-1) or refused by the broker: resent after reconnecting.
            if not self._broken:
                log.warning("usage ledger: record not confirmed (code %d); reconnecting", status.response_code)
            self._broken = True
            self._wake_sender()
            return
        del self._pending[status.message_id]
        self._pending_bytes -= len(entry.data)
        if not entry.done.done():
            entry.done.set_result(None)
        self.metrics.records.labels("confirmed").inc()
        self._update_gauges()

    def _on_closed(self, generation: object, info: object) -> None:
        if generation is self._generation:
            self._broken = True
            self._wake_sender()

    def _check_stalled(self) -> None:
        """A connection that silently stopped confirming (a partition) is replaced."""
        if not self._pending:
            return
        oldest = next(iter(self._pending.values()))
        if oldest.sent and time.monotonic() - oldest.sent > self.send_timeout:
            raise TimeoutError(f"no confirm for {self.send_timeout:.0f} s")

    def _maybe_compact(self) -> None:
        wal = self.wal
        if wal is not None and wal.size > self.compact_bytes and self._pending_bytes < wal.size // 2:
            wal.compact((pid, entry.data) for pid, entry in self._pending.items())

    def _went_down(self, exc: BaseException) -> None:
        self.metrics.connected.set(0)
        if self._down_since is None:
            self._down_since = time.monotonic()
        log.warning(
            "usage ledger: stream %s unreachable (%s); %d records pending, kept in %s; retrying",
            self.stream, str(exc) or type(exc).__name__, len(self._pending),
            self.wal.path if self.wal is not None else "memory",
        )  # fmt: skip

    def _update_age(self) -> None:
        oldest = next(iter(self._pending.values()), None)
        self.metrics.oldest_pending.set(0.0 if oldest is None else time.monotonic() - oldest.added)

    def _update_gauges(self) -> None:
        metrics = self.metrics
        self._update_age()
        metrics.pending.set(len(self._pending))
        metrics.pending_bytes.set(self._pending_bytes)
        full = self._pending_bytes > self.max_pending_bytes
        if full != self._full:
            self._full = full
            metrics.full.set(1 if full else 0)
            if full:
                log.error(
                    "usage ledger: %d unconfirmed records (%d bytes) exceed the bound of %d bytes "
                    "(DISPATCHER_USAGE_WAL_MAX_BYTES): no new requests are taken until the stream %s confirms "
                    "them; every record is kept in %s",
                    len(self._pending), self._pending_bytes, self.max_pending_bytes, self.stream,
                    self.wal.path if self.wal is not None else "memory",
                )  # fmt: skip
            else:
                log.warning("usage ledger: unconfirmed records back under the bound; taking requests again")

    async def _disconnect(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.close(), 2.0)

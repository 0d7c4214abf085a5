"""The reply protocol's state machine (dispatcher/delivery.py) and the gateway's reader of it, without a broker."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from llmdispatch.delivery import Attempt, Inbox, State
from llmdispatch.wire import Frame, Kind

RID = "req-1"


def frames_of(attempt: Attempt, *kinds: Kind) -> list[Frame]:
    return [attempt.frame(RID, kind, b"x" if kind is Kind.DATA else b"") for kind in kinds]


def feed(inbox: Inbox, frames: list[Frame]) -> list[str]:
    cancelled: list[str] = []
    for frame in frames:
        cancelled += inbox.feed(frame)
    return cancelled


async def drain(inbox: Inbox) -> list[Frame]:
    return await inbox.next_frames(0)


def error_message(frame: Frame) -> str:
    return json.loads(frame.data)["error"]["message"]


async def test_one_attempt_in_order_is_relayed_whole() -> None:
    inbox, a = Inbox(RID, "m"), Attempt("w.1")
    assert feed(inbox, frames_of(a, Kind.ACCEPTED, Kind.HEAD, Kind.DATA, Kind.DATA, Kind.END)) == []
    got = await drain(inbox)
    assert [f.kind for f in got] == [Kind.ACCEPTED, Kind.HEAD, Kind.DATA, Kind.DATA, Kind.END]
    assert all(inbox.commit(f) for f in got) and inbox.ended


async def test_redelivery_before_output_replaces_the_attempt_and_stops_the_old_one() -> None:
    inbox, a, b = Inbox(RID, "m"), Attempt("w.1"), Attempt("w.2")  # same worker, new delivery
    feed(inbox, frames_of(a, Kind.ACCEPTED, Kind.HEAD))
    handed_out = await drain(inbox)
    assert feed(inbox, frames_of(b, Kind.ACCEPTED)) == ["w.1"]
    assert not any(inbox.current(f) for f in handed_out)  # the relay drops what it still holds of A
    feed(inbox, frames_of(b, Kind.HEAD, Kind.DATA, Kind.END))
    assert feed(inbox, frames_of(a, Kind.DATA)) == ["w.1"]  # A still talking: ignored, told to stop
    got = await drain(inbox)
    assert {f.attempt for f in got} == {"w.2"} and [f.kind for f in got][-1] is Kind.END


async def test_redelivery_after_output_ends_the_stream_with_an_error_never_a_splice() -> None:
    inbox, a, b = Inbox(RID, "m"), Attempt("w.1"), Attempt("w.1b")
    feed(inbox, frames_of(a, Kind.ACCEPTED, Kind.HEAD, Kind.DATA))
    for frame in await drain(inbox):
        inbox.commit(frame)  # the first body byte went out
    assert inbox.state is State.COMMITTED
    assert feed(inbox, frames_of(b, Kind.ACCEPTED, Kind.HEAD, Kind.DATA)) == ["w.1b", "w.1b", "w.1b"]
    got = await drain(inbox)
    assert [f.kind for f in got] == [Kind.ERROR] and "mid-stream" in error_message(got[0])
    assert inbox.ended and inbox.end_reason == "attempt_lost"  # dispatcher_streams_ended_total's reason


async def test_a_redelivered_attempt_gets_the_go_ahead_only_before_output() -> None:
    """``wants``: the gateway's Proceed to an attempt that asked for it (else feed cancels it)."""
    inbox, a, b, c = Inbox(RID, "m"), Attempt("w.1"), Attempt("w.2"), Attempt("w.3")
    feed(inbox, frames_of(a, Kind.ACCEPTED, Kind.HEAD))
    assert inbox.wants("w.1")
    assert feed(inbox, frames_of(b, Kind.ACCEPTED)) == ["w.1"]  # redelivered before output: B serves it
    assert inbox.wants("w.2") and not inbox.wants("w.1")
    feed(inbox, frames_of(b, Kind.HEAD, Kind.DATA))
    for frame in await drain(inbox):
        inbox.commit(frame)
    assert not inbox.wants("w.2")  # committed: no attempt may start over
    assert feed(inbox, frames_of(c, Kind.ACCEPTED)) == ["w.3"] and not inbox.wants("w.3")
    assert not Inbox(RID, "m").wants("")  # still queued: nobody to go ahead


@pytest.mark.parametrize("order", [[0, 1, 3], [0, 2, 1]], ids=["gap", "reordered"])
async def test_a_gap_or_reordering_is_never_passed_on(order: list[int]) -> None:
    inbox, a = Inbox(RID, "m"), Attempt("w.1")
    frames = frames_of(a, Kind.ACCEPTED, Kind.HEAD, Kind.DATA, Kind.DATA)
    feed(inbox, [frames[i] for i in order])
    got = await drain(inbox)
    assert got[-1].kind is Kind.ERROR and inbox.ended and inbox.end_reason == "gap"
    assert [f.seq for f in got[:-1]] == list(range(len(got) - 1))  # only the in-order prefix


async def test_requeued_goes_back_to_waiting_and_a_later_attempt_is_served() -> None:
    inbox, a, b = Inbox(RID, "m"), Attempt("w.1"), Attempt("w.2")
    feed(inbox, frames_of(a, Kind.ACCEPTED, Kind.HEAD, Kind.REQUEUED))
    assert inbox.state is State.WAITING and inbox.accepted_at is None
    feed(inbox, frames_of(b, Kind.ACCEPTED, Kind.HEAD, Kind.DATA, Kind.END))
    got = [f for f in await drain(inbox) if inbox.current(f)]
    assert {f.attempt for f in got} == {"w.2"}


async def test_end_means_everything_before_it_arrived() -> None:
    inbox, a = Inbox(RID, "m"), Attempt("w.1")
    accepted, head, _data, end = frames_of(a, Kind.ACCEPTED, Kind.HEAD, Kind.DATA, Kind.END)
    feed(inbox, [accepted, head, end])  # END overtook DATA
    got = await drain(inbox)
    assert got[-1].kind is Kind.ERROR and Kind.END not in [f.kind for f in got]


async def test_a_slow_reader_is_bounded() -> None:
    inbox, a = Inbox(RID, "m", max_buffered_bytes=10), Attempt("w.1")
    feed(inbox, frames_of(a, Kind.ACCEPTED, *[Kind.DATA] * 20))
    got = await drain(inbox)
    assert [f.kind for f in got] == [Kind.ERROR] and "too slowly" in error_message(got[0])
    assert inbox.end_reason == "overflow"


async def test_fail_names_the_attempt_to_stop_once() -> None:
    inbox, a = Inbox(RID, "m"), Attempt("w.1")
    feed(inbox, frames_of(a, Kind.ACCEPTED))
    assert inbox.fail(503, "broker lost") == "w.1"
    assert inbox.fail(503, "again") == ""
    assert inbox.end_reason == "broker_lost"


# -- the gateway's reader of an inbox (gateway/relay.py) ---------------------------------------------


class _Broker:
    """What a Relay needs of the gateway's broker: forgetting a request (and whether to cancel it)."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, bool]] = []

    def finish(self, request_id: str, *, cancel: bool) -> None:
        self.finished.append((request_id, cancel))


async def test_a_client_leaving_during_a_blocked_write_ends_the_stream_at_once() -> None:
    """The client stops reading (its socket fills, the write waits), then hangs up: the stream ends as
    soon as the write returns, the work is cancelled, and nothing waits for the idle timeout."""
    from llmdispatch.gateway.relay import ClientWatch, Relay

    inbox, a, broker = Inbox(RID, "m"), Attempt("w.1"), _Broker()
    relay = Relay(broker, inbox, queue_deadline=time.monotonic() + 60, idle_timeout=60, keepalive_interval=60)  # type: ignore[arg-type]
    feed(inbox, frames_of(a, Kind.ACCEPTED, Kind.HEAD, Kind.DATA))
    socket_full, hung_up = asyncio.Event(), asyncio.Event()
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)
        await socket_full.wait()  # uvicorn's send waits for the socket to drain, or for the connection to end

    async def receive() -> Any:
        await hung_up.wait()
        return {"type": "http.disconnect"}

    stream = asyncio.create_task(relay.stream(send, ClientWatch(receive), await drain(inbox)))
    await asyncio.sleep(0.01)
    assert len(sent) == 1  # blocked in the first write
    hung_up.set()
    await asyncio.sleep(0.01)
    socket_full.set()  # the connection is gone: the write returns
    await asyncio.wait_for(stream, 2.0)
    assert broker.finished == [(RID, True)]

"""The reply protocol's state machine (dispatcher/delivery.py), frame by frame, without a broker."""

from __future__ import annotations

import json

import pytest

from dispatcher.delivery import Attempt, Inbox, State
from dispatcher.wire import Frame, Kind

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
    assert inbox.ended


@pytest.mark.parametrize("order", [[0, 1, 3], [0, 2, 1]], ids=["gap", "reordered"])
async def test_a_gap_or_reordering_is_never_passed_on(order: list[int]) -> None:
    inbox, a = Inbox(RID, "m"), Attempt("w.1")
    frames = frames_of(a, Kind.ACCEPTED, Kind.HEAD, Kind.DATA, Kind.DATA)
    feed(inbox, [frames[i] for i in order])
    got = await drain(inbox)
    assert got[-1].kind is Kind.ERROR and inbox.ended
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


async def test_fail_names_the_attempt_to_stop_once() -> None:
    inbox, a = Inbox(RID, "m"), Attempt("w.1")
    feed(inbox, frames_of(a, Kind.ACCEPTED))
    assert inbox.fail(503, "broker lost") == "w.1"
    assert inbox.fail(503, "again") == ""

"""The broker's fair read-ahead queue (zchat.broker.fair), with plain values."""

from __future__ import annotations

import random

import pytest

from zchat.broker.fair import FairQueue


def _drain(q: FairQueue) -> list:
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out


def test_a_small_request_overtakes_big_lines_queued_ahead_of_it() -> None:
    q: FairQueue[str] = FairQueue(quantum=8192, max_bytes=1 << 30, max_items=10_000)
    for i in range(3):
        for peer in range(8):
            q.put(f"flood{peer}", 32_000, f"flood{peer}-{i}")
    q.put("normal", 100, "request")
    assert q.pop() == "request"  # read after 24 big lines, served first
    q.put("normal", 100, "again")
    assert q.pop() == "again"  # and again, mid-flood
    rest = _drain(q)
    assert len(rest) == 24 and rest[:8] == [f"flood{peer}-0" for peer in range(8)]


def test_each_senders_items_keep_their_order_and_nothing_is_lost() -> None:
    rng = random.Random(7)
    q: FairQueue[tuple[str, int]] = FairQueue(quantum=4096, max_bytes=1 << 30, max_items=100_000)
    sent: dict[str, list[int]] = {s: [] for s in "abcdef"}
    got: list[tuple[str, int]] = []
    for n in range(5000):
        sender = rng.choice("abcdef")
        sent[sender].append(n)
        q.put(sender, rng.choice((10, 500, 9000, 40_000)), (sender, n))
        if rng.random() < 0.4:
            item = q.pop()
            if item is not None:
                got.append(item)
    got += _drain(q)
    assert len(got) == 5000 and q.bytes == 0 and len(q) == 0 and q.senders() == 0
    for sender, ns in sent.items():
        assert [n for s, n in got if s == sender] == ns


def test_senders_that_keep_a_queue_share_by_bytes() -> None:
    q: FairQueue[str] = FairQueue(quantum=8192, max_bytes=1 << 30, max_items=100_000)
    for _ in range(400):
        q.put("big", 32_000, "big")
    for _ in range(12_800):
        q.put("small", 1000, "small")
    served = {"big": 0, "small": 0}
    for _ in range(2000):
        item = q.pop()
        served[item] += 32_000 if item == "big" else 1000
    ratio = served["big"] / served["small"]
    assert 0.8 < ratio < 1.25, served  # without the deficit: 32 to 1


def test_room_stops_the_reader_at_either_bound() -> None:
    q: FairQueue[int] = FairQueue(quantum=100, max_bytes=1000, max_items=3)
    q.put("a", 400, 1)
    q.put("b", 400, 2)
    assert q.room()
    q.put("a", 400, 3)
    assert not q.room()  # 1,200 bytes, 3 items
    q.pop()
    assert not q.room() or q.bytes < 1000
    _drain(q)
    assert q.room() and q.bytes == 0
    small: FairQueue[int] = FairQueue(quantum=100, max_bytes=10**6, max_items=2)
    small.put("a", 1, 1)
    small.put("a", 1, 2)
    assert not small.room()


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        FairQueue(quantum=0, max_bytes=1, max_items=1)


def test_past_the_bound_a_sender_alone_is_held_back_not_refused() -> None:
    q: FairQueue[int] = FairQueue(quantum=1000, max_bytes=100_000, max_items=10_000)
    n = 0
    while not q.full():
        assert q.admit("bulk", 30_000)  # nobody waits behind it: never refused
        q.put("bulk", 30_000, n)
        n += 1
    assert n == 7 and q.bytes == 210_000  # the reader stops at twice the bound


def test_past_the_bound_with_others_waiting_a_sender_over_its_share_is_refused() -> None:
    q: FairQueue[int] = FairQueue(quantum=1000, max_bytes=100_000, max_items=10_000)
    for n in range(5):
        q.put("flood", 30_000, n)
    assert q.admit("normal", 200)  # within its share of the full queue
    q.put("normal", 200, -1)
    assert not q.admit("flood", 100)  # over its share, someone else waiting
    assert q.pop() == -1  # the normal user's item is taken first
    assert not q.admit("flood", 100)  # refused until its queue empties: nothing overtakes the refused item
    while q.held("flood"):
        assert q.pop() is not None
        if q.held("flood"):
            assert not q.admit("flood", 100)
    assert q.admit("flood", 30_000) and q.senders() == 0


def test_the_queue_holds_twice_its_bound_at_most() -> None:
    q: FairQueue[int] = FairQueue(quantum=1000, max_bytes=100_000, max_items=10_000)
    for i in range(1000):
        sender = f"s{i % 7}"
        if not q.full() and q.admit(sender, 5_000):
            q.put(sender, 5_000, i)
    assert 100_000 <= q.bytes <= 205_000, q.bytes
    tiny: FairQueue[int] = FairQueue(quantum=1000, max_bytes=10**9, max_items=100)
    for i in range(1000):
        if not tiny.full() and tiny.admit(f"s{i % 3}", 1):
            tiny.put(f"s{i % 3}", 1, i)
    assert 100 <= len(tiny) <= 200

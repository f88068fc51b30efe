"""guard.Refusals: counting what a party was refused, and its cool-off (plain values)."""

from __future__ import annotations

from zchat import guard
from zchat.guard import Refusals


def test_a_party_past_the_limit_cools_off_once_per_window() -> None:
    r = Refusals(limit=5, window=10.0, cooloff=30.0)
    assert [r.refused("mallory", 100.0) for _ in range(4)] == [False] * 4
    assert r.left("mallory", 100.0) == 0.0
    assert r.refused("mallory", 100.5) is True  # the fifth: cut now
    assert [r.refused("mallory", 101.0) for _ in range(100)] == [False] * 100  # said once
    assert r.left("mallory", 101.0) == 29.5
    assert r.left("alice", 101.0) == 0.0
    assert r.left("mallory", 131.0) == 0.0  # over
    assert [r.refused("mallory", 131.0) for _ in range(5)][-1] is True  # a new window, past the limit again
    assert r.cuts == 2


def test_only_refusals_that_ignore_retry_after_count() -> None:
    r = Refusals(limit=3, window=10.0, cooloff=60.0)
    now = 0.0
    for _ in range(1000):  # refused every time, and every time it waits as told
        assert not r.refused("bot", now, retry_after=0.05)
        now += 0.05
    assert r.cuts == 0
    # A flooder: refused, told to wait 0.05 s, and back at once, again and again.
    verdicts = [r.refused("flood", 1.0 + i * 0.001, retry_after=0.05) for i in range(10)]
    assert verdicts == [False, False, False, True] + [False] * 6  # the first is no offence; then 3 ignored
    assert r.left("flood", 1.1) > 0 and r.left("bot", 1.1) == 0.0


def test_zero_limit_turns_it_off_and_the_tables_stay_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    off = Refusals(limit=0, window=10.0, cooloff=60.0)
    assert not any(off.refused("x", 0.0) for _ in range(1000))
    monkeypatch.setattr(guard, "MAX_REFUSAL_PARTIES", 50)
    r = Refusals(limit=1, window=10.0, cooloff=1000.0)
    for i in range(500):
        assert r.refused(f"p{i}", float(i))
        r.refused(f"p{i}", float(i), retry_after=1000.0)
    assert len(r.counts) <= 50 and len(r.cooling) <= 50 and len(r.told) <= 50
    assert r.left("p499", 499.0) > 0  # the newest kept


def test_a_refusal_weighs_what_its_line_would_have_cost() -> None:
    """A flood of 32 KB lines (8 tokens each) is cut after an eighth as many refusals as
    one of short lines: what counts is what the broker read for the party, not frames."""
    r = Refusals(limit=100, window=10.0, cooloff=60.0)
    small = [r.refused("small", 1.0 + i * 0.001, retry_after=0.05) for i in range(101)]
    big = [r.refused("big", 1.0 + i * 0.001, retry_after=0.05, weight=8.0) for i in range(101)]
    assert small.index(True) == 100  # the first is no offence, then 100 ignored
    assert big.index(True) == 13  # the first is no offence, then 13 x 8 >= 100
    assert big.count(True) == small.count(True) == 1  # crossing once, however far past
    assert r.refused("odd", 0.0, weight=150.0) is True  # one refusal past the limit at once
    assert r.cuts == 3

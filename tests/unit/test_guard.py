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
    assert r.refused("mallory", 131.0, count=5) is True  # a new window, past the limit again
    assert r.cuts == 2


def test_a_heavy_user_that_backs_off_is_never_cut() -> None:
    r = Refusals(limit=1000, window=10.0, cooloff=60.0)
    now = 0.0
    for _ in range(600):  # a burst past its budget every second for ten minutes: 50 refused, then it waits
        assert not r.refused("bot", now, count=50)
        now += 1.0
    assert r.cuts == 0 and r.left("bot", now) == 0.0


def test_zero_limit_turns_it_off_and_the_tables_stay_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    off = Refusals(limit=0, window=10.0, cooloff=60.0)
    assert not off.refused("x", 0.0, count=10**9)
    monkeypatch.setattr(guard, "MAX_REFUSAL_PARTIES", 50)
    r = Refusals(limit=1, window=10.0, cooloff=1000.0)
    for i in range(500):
        assert r.refused(f"p{i}", float(i))
    assert len(r.counts) <= 50 and len(r.cooling) <= 50
    assert r.left("p499", 499.0) > 0  # the newest kept

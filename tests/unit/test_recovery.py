"""Client-side per-room ordering: exactly once, in order, gaps fetched or reported."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zchat import recovery
from zchat.protocol import Msg
from zchat.recovery import Gap, Tracker


def m(seq: int, text: str = "") -> Msg:
    return Msg(room="dev", seq=seq, id=f"id{seq}", ts=float(seq), sender="alice", text=text or f"m{seq}", epoch="E1")


def seqs(msgs: list[Msg]) -> list[int]:
    return [msg.seq for msg in msgs]


def test_in_order_delivery_exactly_once() -> None:
    t = Tracker("dev", "E1", 0)
    assert seqs(t.offer(m(1))) == [1]
    assert seqs(t.offer(m(2))) == [2]
    assert seqs(t.offer(m(3))) == [3]
    assert (t.last, t.known_head, t.early) == (3, 3, {})
    assert t.missing() is None


def test_starts_after_a_cursor() -> None:
    t = Tracker("dev", "E1", 10)
    assert t.offer(m(10)) == []
    assert t.offer(m(3)) == []
    assert seqs(t.offer(m(11))) == [11]


def test_duplicates_are_dropped() -> None:
    t = Tracker("dev", "E1", 0)
    t.offer(m(1))
    t.offer(m(2))
    assert t.offer(m(2)) == []
    assert t.offer(m(1)) == []
    assert t.offer(m(5)) == []
    assert t.offer(m(5, "again")) == []  # a duplicate of a buffered one is not buffered twice
    assert t.early[5].text == "m5"
    assert seqs(t.offer(m(3))) == [3]
    assert seqs(t.offer(m(4))) == [4, 5]
    assert t.last == 5


def test_out_of_order_is_buffered_then_released() -> None:
    t = Tracker("dev", "E1", 0)
    assert seqs(t.offer(m(1))) == [1]
    assert t.offer(m(4)) == []
    assert t.offer(m(3)) == []
    assert sorted(t.early) == [3, 4]
    delivered = t.offer(m(2))
    assert seqs(delivered) == [2, 3, 4]
    assert [msg.text for msg in delivered] == ["m2", "m3", "m4"]
    assert t.early == {}


def test_missing_between_last_and_earliest_buffered() -> None:
    t = Tracker("dev", "E1", 0)
    t.offer(m(1))
    t.offer(m(6))
    t.offer(m(4))
    assert t.missing() == (1, 4)  # fetch 2..3 first
    t.offer(m(2))
    t.offer(m(3))
    assert t.last == 4
    assert t.missing() == (4, 6)


def test_missing_lost_tail_via_saw_head() -> None:
    t = Tracker("dev", "E1", 0)
    t.offer(m(1))
    assert t.missing() is None
    t.saw_head(4)
    assert t.missing() == (1, 0)  # 0: no upper bound, up to the head
    t.saw_head(2)  # an older head never lowers what is known
    assert t.known_head == 4
    assert seqs(t.fill([m(2), m(3), m(4)], 4)) == [2, 3, 4]
    assert t.missing() is None


def test_fill_with_history_overlapping_live() -> None:
    t = Tracker("dev", "E1", 0)
    assert t.offer(m(4, "live4")) == []
    assert t.offer(m(5, "live5")) == []
    assert t.missing() == (0, 4)
    history = [m(1), m(2), m(3), m(4, "hist4"), m(5, "hist5"), m(6)]
    delivered = t.fill(history, 6)
    assert seqs(delivered) == [1, 2, 3, 4, 5, 6]
    assert [msg.text for msg in delivered][3:5] == ["live4", "live5"]  # each seq once, the first copy
    assert t.missing() is None
    assert t.offer(m(6)) == [] and t.offer(m(3)) == []
    assert seqs(t.offer(m(7))) == [7]


def test_fill_ignores_what_was_delivered_and_keeps_waiting_for_holes() -> None:
    t = Tracker("dev", "E1", 3)
    assert seqs(t.fill([m(1), m(2), m(3), m(5)], 7)) == []
    assert t.known_head == 7
    assert t.missing() == (3, 5)
    assert seqs(t.fill([m(4)], 7)) == [4, 5]
    assert t.missing() == (5, 0)


def test_skip_reports_a_gap_and_moves_on() -> None:
    t = Tracker("dev", "E1", 2)
    t.offer(m(5))
    t.offer(m(7))
    gap = t.skip(4, "no longer in history")
    assert gap == Gap("dev", 3, 4, "no longer in history")
    assert t.last == 4
    assert seqs(t.release()) == [5]
    assert t.missing() == (5, 7)
    assert t.skip(5, "again") is None  # nothing left to skip up to 5
    assert t.skip(6, "trimmed") == Gap("dev", 6, 6, "trimmed")
    assert seqs(t.release()) == [7]
    assert t.release() == []


def test_skip_past_buffered_messages_drops_them() -> None:
    t = Tracker("dev", "E1", 0)
    t.offer(m(3))
    t.offer(m(4))
    t.offer(m(9))
    assert t.skip(4, "reset") == Gap("dev", 1, 4, "reset")
    assert sorted(t.early) == [9]
    assert t.release() == []
    assert t.missing() == (4, 9)


def test_full_buffer_still_takes_the_next_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "MAX_BUFFER", 3)
    t = Tracker("dev", "E1", 0)
    for seq in (3, 4, 5):
        assert t.offer(m(seq)) == []
    assert t.offer(m(6)) == []  # over the bound: not buffered, history has it
    assert sorted(t.early) == [3, 4, 5]
    assert t.known_head == 6
    assert seqs(t.offer(m(1))) == [1]
    assert seqs(t.offer(m(2))) == [2, 3, 4, 5]
    assert t.missing() == (5, 0)
    assert seqs(t.fill([m(6)], 6)) == [6]


@st.composite
def lossy_streams(draw: st.DrawFn) -> tuple[int, list[int], list[bool]]:
    """N, the live seqs as received (a permutation with drops and duplicates), and when to fill."""
    n = draw(st.integers(min_value=1, max_value=60))
    kept = [s for s in range(1, n + 1) if not draw(st.booleans()) or draw(st.booleans())]  # ~25% dropped
    dups = draw(st.lists(st.sampled_from(kept), max_size=n)) if kept else []
    live = draw(st.permutations(kept + dups))
    fill_after = draw(st.lists(st.booleans(), min_size=len(live), max_size=len(live)))
    return n, live, fill_after


@settings(max_examples=300, deadline=None)
@given(lossy_streams(), st.integers(min_value=0, max_value=3))
def test_any_lossy_stream_plus_history_yields_each_seq_once_in_order(
    stream: tuple[int, list[int], list[bool]], overlap: int
) -> None:
    n, live, fill_after = stream
    history = [m(s) for s in range(1, n + 1)]
    t = Tracker("dev", "E1", 0)
    delivered: list[Msg] = []

    def fill_round() -> None:
        gap = t.missing()
        if gap is None:
            return
        after, before = gap
        upper = before - 1 if before else t.known_head
        # history answers with the asked range plus some overlap on both sides
        page = [msg for msg in history if after - overlap < msg.seq <= upper + overlap]
        delivered.extend(t.fill(page, n))

    for seq, fill_now in zip(live, fill_after):
        delivered.extend(t.offer(m(seq)))
        if fill_now:
            fill_round()
    t.saw_head(n)  # a Pong tells the head: a lost tail shows up as missing
    for _ in range(n + 1):
        if t.missing() is None:
            break
        fill_round()
    assert seqs(delivered) == list(range(1, n + 1))
    assert t.missing() is None
    assert t.early == {}
    assert t.last == n


def test_a_run_that_follows_on_is_taken_whole() -> None:
    t = Tracker("dev", "E1", 4)
    run = [m(s) for s in range(5, 105)]
    assert t.offer_run(run)
    assert (t.last, t.known_head, t.early) == (104, 104, {})
    assert t.offer(m(104)) == []  # and is not delivered twice


@pytest.mark.parametrize(
    ("last", "run", "early"),
    [
        (4, [6, 7, 8], ()),  # starts after a hole
        (4, [3, 4, 5], ()),  # overlaps what was delivered
        (4, [5, 7, 8], ()),  # a hole inside (span is not its length)
        (4, [5, 6, 7], (9,)),  # something is already buffered: keep the slow path's order
    ],
)
def test_a_run_that_does_not_follow_on_is_refused_untouched(last: int, run: list[int], early: tuple[int, ...]) -> None:
    t = Tracker("dev", "E1", last)
    for seq in early:
        t.offer(m(seq))
    before = (t.last, t.known_head, dict(t.early))
    assert not t.offer_run([m(s) for s in run])
    assert (t.last, t.known_head, dict(t.early)) == before


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 8)), max_size=30))
def test_runs_and_single_offers_agree(runs: list[tuple[int, int]]) -> None:
    """Taking a batch whole when it follows on delivers exactly what offering it one
    message at a time would. Batches are what a broker publishes: ascending runs of
    consecutive seqs, arriving late, early, repeated or overlapping."""
    fast, slow = Tracker("dev", "E1", 0), Tracker("dev", "E1", 0)
    got_fast: list[int] = []
    got_slow: list[int] = []
    for start, length in runs:
        batch = list(range(start, start + length))
        msgs = [m(s) for s in batch]
        if fast.offer_run(msgs):
            got_fast += batch
        else:
            for msg in msgs:
                got_fast += seqs(fast.offer(msg))
        for msg in msgs:
            got_slow += seqs(slow.offer(msg))
    assert got_fast == got_slow
    assert (fast.last, fast.known_head) == (slow.last, slow.known_head)

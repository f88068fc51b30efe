"""Sessions ending with their connection, and the tick's expiry scan (sans I/O)."""

from __future__ import annotations

from tests.unit.test_core import DEV, hello, make, request
from zchat import protocol as p
from zchat.core import Limits, Outcome


class CountingDict(dict):
    """A sessions table that counts full scans (values())."""

    scans = 0

    def values(self):  # type: ignore[no-untyped-def]
        CountingDict.scans += 1
        return super().values()


def test_tick_scans_for_expiry_only_when_a_session_can_be_due() -> None:
    core = make(limits=Limits(heartbeat=10.0), members={"dev": {"alice", "bob"}})
    core.sessions = CountingDict(core.sessions)
    hello(core, "a1", "alice", now=0.0)
    hello(core, "b1", "bob", now=10.0)
    core.tick(1.0, Outcome())  # learns that nothing can expire before 0 + 30
    CountingDict.scans = 0
    for now in (5.0, 15.0, 29.9):
        core.tick(now, Outcome())
    assert CountingDict.scans == 0, "the tick scanned sessions before any could expire"
    out = Outcome()
    core.tick(30.1, out)
    assert set(core.sessions) == {"b1"}
    assert out.publish == [(DEV, p.Presence(room="dev", name="alice", online=False, ts=30.1))]
    request(core, "b1", "bob", p.Ping(rid=1), now=35.0)  # postpones bob past 40
    core.tick(40.1, Outcome())
    assert "b1" in core.sessions
    core.tick(65.1, Outcome())
    assert "b1" not in core.sessions


def test_disconnected_closes_the_session_now() -> None:
    core = make(limits=Limits(heartbeat=60.0), members={"dev": {"alice", "bob"}})
    hello(core, "a1", "alice", now=0.0)
    hello(core, "a2", "alice", now=0.0)  # a second device
    hello(core, "b1", "bob", now=0.0)
    out = Outcome()
    assert core.disconnected("b1", 1.0, out)
    assert "b1" not in core.sessions and not core.online("bob")
    assert out.publish == [(DEV, p.Presence(room="dev", name="bob", online=False, ts=1.0))]
    out = Outcome()
    assert core.disconnected("a1", 1.0, out)
    assert out.publish == [] and core.online("alice")  # alice's other device lives
    assert not core.disconnected("nobody", 1.0, Outcome())
    assert core.counters["session_disconnected"] == 2


def test_a_lazy_ping_is_answered_later_and_still_counts_as_a_sign_of_life() -> None:
    """A heartbeat's ping (lazy) puts its pong in Outcome.later, for the shell to send
    at its tick with the others; an eager ping is answered in this turn as before.
    Fails on main: the lazy pong was an immediate reply."""
    core = make(limits=Limits(heartbeat=10.0), members={"dev": {"alice"}})
    hello(core, "a1", "alice", now=0.0)
    out = request(core, "a1", "alice", p.Ping(rid=2, lazy=True), now=25.0)
    assert out.replies == []
    assert out.later == [("a1", p.Pong(rid=2, boot="B1", epoch="E1", heads={"dev": 0}))]
    core.tick(31.0, Outcome())
    assert "a1" in core.sessions, "a lazy ping is a sign of life like any request"
    out = request(core, "a1", "alice", p.Ping(rid=3), now=32.0)
    assert out.later is None and [type(body) for _, body in out.replies] == [p.Pong]


def test_the_sweep_leaves_online_users_out_until_their_last_session_closes() -> None:
    """An idle broker's tick looked at 1,000 online users a second to keep them all.
    Online users leave the sweep's queue; their state goes once they are offline.
    Fails on main: every online user stays queued (and is looked at every tick)."""
    core = make(limits=Limits(heartbeat=10.0, sweep=10), members={"dev": {"alice"}})
    for i in range(30):
        hello(core, f"s{i}", f"u{i}", now=0.0)
    for k in range(3):
        core.tick(1.0 + k, Outcome())
    assert len(core._sweep_users) == 0 and "u0" in core.request_buckets
    request(core, "s0", "u0", p.Bye(rid=2), now=4.0)
    assert list(core._sweep_users) == ["u0"]
    core.tick(20.0, Outcome())  # its request bucket has refilled: dropped (the others still online)
    assert "u0" not in core.request_buckets and "u1" in core.request_buckets

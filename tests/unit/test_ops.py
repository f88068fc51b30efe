"""The status request in the core and on the wire, and the pieces of zchat.metrics."""

from __future__ import annotations

import pytest

from zchat import protocol as p
from zchat.core import Core, Limits, Outcome
from zchat.metrics import Histogram, Stats, parse_address

E = p.ErrorCode


def test_status_round_trips_on_the_wire() -> None:
    assert p.decode_router(p.encode(p.Status(rid=7))) == p.Status(rid=7)
    assert p.decode_request(p.encode(p.Status(rid=7))) == p.Status(rid=7)
    reply = p.StatusReply(
        rid=7, version="1", boot="b", epoch="e", uptime=1.5, storage="sqlite /x", storage_bytes=-1, sessions=1,
        users_online=0, users=0, rooms=0, conversations=0, messages=0, rates={"lines_received": 0.5},
        limits={"rate": 20.0, "max_rooms": 500, "reserved_names": "admin"}, counters={"duplicate": 2},
    )
    back = p.decode_reply(p.encode(reply))
    assert back == reply and type(back.limits["max_rooms"]) is int  # type: ignore[union-attr]


def test_a_bad_status_is_a_bad_request() -> None:
    with pytest.raises(p.ProtocolError) as bad:
        p.decode_router(p.encode(p.Ping(rid=1)).replace(b"ping", b"stat"))
    assert bad.value.code == E.BAD_REQUEST


def core(**limits: float) -> Core:
    return Core(epoch="E", boot="B", limits=Limits(**limits), heads={"dev": 3, "@a:b": 2}, members={"dev": {"alice"}, "@a:b": {"a", "b"}})


def test_a_look_only_session_may_ask_status_and_sees_counts_and_limits() -> None:
    c = core()
    c.request("s1", "alice", p.Hello(rid=1), 0.0, Outcome())
    c.request("s2", p.LOOKER, p.Hello(rid=1), 0.0, Outcome())
    c.count("duplicate")
    out = Outcome()
    c.request("s2", p.LOOKER, p.Status(rid=2), 0.0, out)
    [(sid, reply)] = out.replies
    assert sid == "s2" and isinstance(reply, p.StatusReply)
    assert (reply.rid, reply.epoch, reply.boot) == (2, "E", "B")
    assert (reply.sessions, reply.users_online, reply.rooms, reply.conversations, reply.messages) == (2, 1, 1, 1, 5)
    assert reply.limits["rate"] == 20.0 and reply.limits["max_rooms"] == 500
    assert "pull_port" not in reply.limits
    assert reply.counters == {"duplicate": 1}


def test_status_needs_a_session_and_draws_from_the_request_budget() -> None:
    c = core(request_rate=1.0, request_burst=2.0)
    out = Outcome()
    c.request("s1", "alice", p.Status(rid=1), 0.0, out)  # no hello yet
    assert [(r.code, r.rid) for _, r in out.replies] == [(E.NO_SESSION, 1)]  # type: ignore[union-attr]
    c.request("s1", "alice", p.Hello(rid=2), 0.0, Outcome())  # the budget's second token
    out = Outcome()
    c.request("s1", "alice", p.Status(rid=3), 0.0, out)
    [(_, refused)] = out.replies
    assert isinstance(refused, p.Error) and refused.code == E.RATE_LIMITED and refused.retry_after > 0


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.sum == pytest.approx(2.65)


def test_rates_are_over_the_last_minute() -> None:
    s = Stats()
    s.sample(0.0)
    s.received, s.stored = 100, 90
    s.sample(50.0)
    s.received, s.stored = 700, 690
    s.error("rate_limited", line=True)
    s.error("bad_request", line=False)  # a request's error is no refused line
    rates = s.rates(100.0)  # the sample at 0 is past the window: the one at 50 counts
    assert rates["lines_received"] == pytest.approx(600 / 50, abs=1e-3)
    assert rates["messages_stored"] == pytest.approx(600 / 50, abs=1e-3)
    assert rates["lines_refused"] == pytest.approx(1 / 50, abs=1e-3)
    assert Stats().rates(5.0) == {"lines_received": 0.0, "messages_stored": 0.0, "lines_refused": 0.0, "history_requests": 0.0}


@pytest.mark.parametrize(
    "text, public, expected",
    [
        ("9464", False, ("127.0.0.1", 9464)),
        (":9464", False, ("127.0.0.1", 9464)),
        ("127.0.0.2:1", False, ("127.0.0.2", 1)),
        ("localhost:9464", False, ("localhost", 9464)),
        ("[::1]:9464", False, ("::1", 9464)),
        ("0.0.0.0:9464", True, ("0.0.0.0", 9464)),
    ],
)
def test_metrics_addresses(text: str, public: bool, expected: tuple[str, int]) -> None:
    assert parse_address(text, public) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:9464", "10.0.0.1:9464", "example.com:9464", "[::]:9464", "x", "1:0", "1:70000", ""])
def test_bad_or_public_metrics_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_storage_size_of_sqlite_counts_the_wal_and_redis_is_unknown(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from zchat.metrics import storage_size
    from zchat.storage.sqlite import SqliteStorage

    db = tmp_path / "h.db"
    db.write_bytes(b"x" * 100)
    (tmp_path / "h.db-wal").write_bytes(b"x" * 20)
    assert storage_size(SqliteStorage(db)) == (f"sqlite {db}", 120)
    assert storage_size(SqliteStorage(tmp_path / "none.db")) == (f"sqlite {tmp_path / 'none.db'}", 0)
    redis = pytest.importorskip("zchat.storage.redis")
    assert storage_size(redis.RedisStorage("redis://127.0.0.1:1")) == ("redis", -1)

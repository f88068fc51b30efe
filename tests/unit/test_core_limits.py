"""The core's budgets, caps, clocks, look-only sessions, undo and subscription heads,
driven with plain values (issues 11 and 12, core side)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zchat import protocol as p
from zchat.core import Core, Limits, Outcome
from zchat.protocol import ErrorCode as E

DEV = p.room_topic("dev")


def make(**kwargs) -> Core:  # type: ignore[no-untyped-def]
    kwargs.setdefault("limits", Limits(rate=0))
    return Core(epoch="E1", boot="B1", **kwargs)


def request(core: Core, sid: str, name: str, body: p.Request, now: float = 0.0) -> Outcome:
    out = Outcome()
    core.request(sid, name, body, now, out)
    return out


def hello(core: Core, sid: str, name: str, now: float = 0.0) -> Outcome:
    return request(core, sid, name, p.Hello(rid=1), now)


def send(core: Core, name: str, sid: str, cid: str, text: str = "hi", *, room: str = "", to: str = "",
         now: float = 0.0) -> Outcome:
    out = Outcome()
    core.send(name, p.Send(sid=sid, cid=cid, text=text, room=room, to=to), now, out)
    return out


def tick(core: Core, now: float) -> Outcome:
    out = Outcome()
    core.tick(now, out)
    return out


def only_error(out: Outcome, sid: str) -> p.Error:
    """The outcome is exactly one error reply to ``sid`` and nothing else."""
    assert len(out.replies) == 1, out.replies
    to, body = out.replies[0]
    assert to == sid
    assert isinstance(body, p.Error), body
    assert body.code in E.ALL and body.message
    assert (out.store, out.publish, out.acks, out.queries, out.members) == ([], [], {}, [], [])
    return body


def reply(out: Outcome) -> p.Reply:
    assert len(out.replies) == 1, out.replies
    return out.replies[0][1]


# ------------------------------------------------------------------ 1. clocks


def test_timestamps_are_monotonic_now_plus_the_wall_offset() -> None:
    """`now` is monotonic; what goes on the wire is now + wall_offset."""
    core = make(members={"dev": {"alice", "bob"}})
    core.wall_offset = 1_000_000.0
    out = hello(core, "a1", "alice", now=5.0)
    assert out.publish == [(DEV, p.Presence(room="dev", name="alice", online=True, ts=1_000_005.0))]
    assert core.sessions["a1"].last_seen == 5.0  # presence runs on the monotonic clock
    out = send(core, "alice", "a1", "c1", room="dev", now=6.0)
    assert out.store[0].ts == 1_000_006.0
    assert out.acks["a1"][0].ts == 1_000_006.0
    hello(core, "b1", "bob", now=6.0)
    joined = request(core, "b1", "bob", p.Join(rid=2, room="ops"), now=7.0)
    assert joined.store[0].ts == 1_000_007.0
    out = tick(core, 6.0 + core.limits.presence_timeout + 1)
    assert {body.ts for _, body in out.publish} == {1_000_006.0 + core.limits.presence_timeout + 1}
    out = Outcome()
    core.shutdown(50.0, out)
    assert out.publish == [(p.SYSTEM_TOPIC, p.Notice(event="shutdown", boot="B1", ts=1_000_050.0))]


def test_a_wall_clock_step_changes_neither_buckets_nor_presence() -> None:
    """A backward step of an hour kept users limited for an hour; a forward step of 31 s
    expired every session. With monotonic `now` only the timestamps move."""
    core = make(limits=Limits(rate=1.0, burst=1.0, heartbeat=10.0), members={"dev": {"alice"}})
    hello(core, "a1", "alice", now=100.0)
    assert send(core, "alice", "a1", "c1", room="dev", now=100.0).store
    assert only_error(send(core, "alice", "a1", "c2", room="dev", now=100.0), "a1").code == E.RATE_LIMITED
    core.wall_offset -= 3600.0  # the wall clock stepped back an hour
    out = send(core, "alice", "a1", "c2", room="dev", now=101.0)
    assert out.store and out.store[0].ts == 101.0 - 3600.0
    core.wall_offset += 3600.0 + 31.0  # and then forward past the presence timeout
    assert tick(core, 102.0).publish == [] and "a1" in core.sessions


# ------------------------------------------------------------------ 2. look-only sessions


def test_a_looker_is_never_online_a_user_or_a_member() -> None:
    core = make(heads={"dev": 4, "@alice:bob": 2}, members={"dev": {"alice"}, "@alice:bob": {"alice", "bob"}})
    hello(core, "a1", "alice")
    out = hello(core, "l1", p.LOOKER, now=1.0)
    welcome = reply(out)
    assert isinstance(welcome, p.Welcome) and welcome.rooms == {} and welcome.name == p.LOOKER
    assert out.publish == [] and out.members == []
    assert p.LOOKER not in core.users and not core.online(p.LOOKER)
    assert p.LOOKER not in core.devices
    assert reply(request(core, "l1", p.LOOKER, p.Ping(rid=2))) == p.Pong(rid=2, boot="B1", epoch="E1", heads={})
    assert reply(request(core, "l1", p.LOOKER, p.Who(rid=3, room="dev"))) == p.WhoReply(
        rid=3, room="dev", members=[p.Member("alice", True)]
    )
    assert reply(request(core, "l1", p.LOOKER, p.Rooms(rid=4))) == p.RoomsReply(rid=4, rooms=[p.RoomInfo("dev", 1, 1)])
    assert [q.head for q in request(core, "l1", p.LOOKER, p.History(rid=5, room="dev")).queries] == [4]
    err = only_error(request(core, "l1", p.LOOKER, p.History(rid=6, room="@alice:bob")), "l1")
    assert err.code == E.NOT_MEMBER
    # alice's online count in dev is hers alone
    assert core.room_list() == [p.RoomInfo("dev", 1, 1)]
    out = request(core, "l1", p.LOOKER, p.Bye(rid=7))
    assert reply(out) == p.Ok(rid=7) and out.publish == []
    assert "l1" not in core.sessions


@pytest.mark.parametrize(
    ("body", "verb"), [(p.Join(rid=2, room="dev"), "join"), (p.Join(rid=2, room="new"), "join"), (p.Part(rid=2, room="dev"), "part")]
)
def test_a_looker_may_not_join_or_part(body: p.Request, verb: str) -> None:
    core = make(members={"dev": {"alice"}})
    hello(core, "l1", p.LOOKER)
    err = only_error(request(core, "l1", p.LOOKER, body), "l1")
    assert (err.code, err.rid) == (E.FORBIDDEN, 2)
    assert err.message == f"sign in with a name to {verb} rooms"
    assert core.members == {"dev": {"alice"}} and core.heads == {}


@pytest.mark.parametrize("target", [{"room": "dev"}, {"to": "alice"}])
def test_a_looker_may_not_send(target: dict) -> None:
    core = make(members={"dev": {"alice"}})
    hello(core, "l1", p.LOOKER)
    err = only_error(send(core, p.LOOKER, "l1", "c1", **target), "l1")
    assert (err.code, err.cid) == (E.FORBIDDEN, "c1")
    assert "sign in with a name" in err.message
    assert core.heads == {} and len(core.dedup) == 0


def test_nobody_can_message_the_looker() -> None:
    core = make()
    hello(core, "a1", "alice")
    hello(core, "l1", p.LOOKER)
    core.add_user(p.LOOKER)
    assert p.LOOKER not in core.users
    assert only_error(send(core, "alice", "a1", "c1", to=p.LOOKER), "a1").code == E.BAD_NAME


def test_lookers_share_one_request_bucket() -> None:
    """All look-only sessions are one user: their budget also bounds how many live."""
    core = make(limits=Limits(request_rate=1.0, request_burst=3.0))
    for sid in ("l1", "l2", "l3"):
        assert isinstance(reply(hello(core, sid, p.LOOKER)), p.Welcome)
    err = only_error(hello(core, "l4", p.LOOKER), "l4")
    assert err.code == E.RATE_LIMITED and "l4" not in core.sessions
    assert isinstance(reply(hello(core, "a1", "alice")), p.Welcome)  # a named user has their own


# ------------------------------------------------------------------ 3. budgets


REQUESTS = [p.Hello(rid=9), p.Join(rid=9, room="dev"), p.Part(rid=9, room="dev"), p.History(rid=9, room="dev"),
            p.Who(rid=9, room="dev"), p.Rooms(rid=9), p.Ping(rid=9), p.Bye(rid=9)]


@pytest.mark.parametrize("body", REQUESTS, ids=lambda b: type(b).__name__)
def test_every_request_kind_draws_from_the_users_request_bucket(body: p.Request) -> None:
    core = make(limits=Limits(rate=1000.0, room_rate=0, request_rate=2.0, request_burst=3.0), members={"dev": {"alice"}})
    hello(core, "a1", "alice", now=10.0)
    request(core, "a1", "alice", p.Ping(rid=1), now=10.0)
    request(core, "a1", "alice", p.Ping(rid=2), now=10.0)
    before = (dict(core.heads), {r: set(m) for r, m in core.members.items()}, set(core.sessions))
    err = only_error(request(core, "a1", "alice", body, now=10.0), "a1")
    assert (err.code, err.rid) == (E.RATE_LIMITED, 9)
    assert err.retry_after == pytest.approx(0.5)
    assert err.message == f"too many requests: try again in {err.retry_after:.2f}s"
    assert (dict(core.heads), {r: set(m) for r, m in core.members.items()}, set(core.sessions)) == before
    # another user is not limited; half a second later alice is not either
    assert isinstance(reply(hello(core, "b1", "bob", now=10.0)), p.Welcome)
    assert not any(isinstance(b, p.Error) for _, b in request(core, "a1", "alice", body, now=10.5).replies)


def test_heartbeats_alone_never_reach_the_default_request_budget() -> None:
    lim = Limits()
    assert lim.request_rate * lim.heartbeat >= 10  # ten times a heartbeat's worth, sustained
    core = make(limits=lim)
    hello(core, "a1", "alice")
    for i in range(int(lim.request_burst) - 1):  # a reconnect's worth of requests at once
        assert not isinstance(reply(request(core, "a1", "alice", p.Ping(rid=i))), p.Error)


def test_join_and_part_lines_draw_from_the_line_bucket() -> None:
    """One client stored 20,000 join/part lines at t=0: they are stored lines too."""
    core = make(limits=Limits(rate=1.0, burst=10.0, request_rate=0, room_rate=0))
    hello(core, "a1", "alice")
    stored = 0
    refused = 0
    for i in range(10_000):
        for body in (p.Join(rid=i, room="dev"), p.Part(rid=i, room="dev")):
            out = request(core, "a1", "alice", body)
            stored += len(out.store)
            if out.replies and isinstance(out.replies[0][1], p.Error):
                err = out.replies[0][1]
                assert err.code in (E.RATE_LIMITED, E.NOT_MEMBER) and err.rid == i
                refused += 1
    assert stored == 10
    assert core.heads["dev"] == 10
    assert refused == 20_000 - 10
    # the bucket refills at the line rate, and is the one chat lines use
    assert only_error(request(core, "a1", "alice", p.Join(rid=1, room="ops")), "a1").code == E.RATE_LIMITED
    assert request(core, "a1", "alice", p.Join(rid=1, room="ops"), now=1.0).store
    assert only_error(send(core, "alice", "a1", "c1", room="ops", now=1.0), "a1").code == E.RATE_LIMITED


def test_a_join_refused_for_its_budget_changes_nothing() -> None:
    core = make(limits=Limits(rate=1.0, burst=1.0, request_rate=0, room_rate=0))
    hello(core, "a1", "alice")
    assert request(core, "a1", "alice", p.Join(rid=1, room="dev")).store
    err = only_error(request(core, "a1", "alice", p.Join(rid=2, room="ops")), "a1")
    assert (err.code, err.rid, err.retry_after) == (E.RATE_LIMITED, 2, pytest.approx(1.0))
    assert "ops" not in core.members and "ops" not in core.heads
    # a join of a room one is already in stores nothing and costs no line token
    assert isinstance(reply(request(core, "a1", "alice", p.Join(rid=3, room="dev"))), p.Joined)
    # nor does the part of a DM conversation (not sequenced)
    core.add_user("bob")
    assert send(core, "alice", "a1", "c1", to="bob", now=1.0).store
    assert reply(request(core, "a1", "alice", p.Part(rid=4, room="@alice:bob"), now=1.0)) == p.Ok(rid=4)


def test_a_busy_room_is_limited_for_everyone_but_other_rooms_are_not() -> None:
    names = [f"u{i}" for i in range(10)]
    core = make(limits=Limits(rate=5.0, burst=5.0, request_rate=0, room_rate=2.0, room_burst=3.0),
                members={"dev": set(names), "ops": {"u0"}})
    for name in names:
        hello(core, f"s-{name}", name)
    for name in names[:3]:
        assert send(core, name, f"s-{name}", "c1", room="dev").store
    err = only_error(send(core, "u3", "s-u3", "c1", room="dev"), "s-u3")
    assert (err.code, err.cid, err.retry_after) == (E.RATE_LIMITED, "c1", pytest.approx(0.5))
    assert err.message == f"'dev' is too busy: try again in {err.retry_after:.2f}s"
    assert core.buckets["u3"].tokens == 5.0  # the refusal cost u3 nothing
    assert send(core, "u0", "s-u0", "c2", room="ops").store  # another room
    assert send(core, "u0", "s-u0", "c3", to="u1").store  # DM conversations are bounded per user
    assert only_error(request(core, "s-u4", "u4", p.Part(rid=5, room="dev")), "s-u4").code == E.RATE_LIMITED
    assert send(core, "u3", "s-u3", "c1", room="dev", now=0.5).store
    assert core.counters["room_limited"] == 2


def test_big_lines_cost_by_their_size_for_the_user_and_the_room() -> None:
    """A token per started 4 KiB: a flood of 32 KB lines gets an eighth as many lines
    (bytes stored and fanned out) as one of short lines; any line can still pass."""
    core = make(limits=Limits(rate=20.0, burst=100.0, request_rate=0, room_rate=0), members={"dev": {"bob", "eve"}})
    hello(core, "s-bob", "bob")
    hello(core, "s-eve", "eve")
    big = "x" * 32 * 1024
    taken = 0
    while send(core, "eve", "s-eve", f"c{taken}", big, room="dev").store:
        taken += 1
    assert taken == 12  # 100 tokens / 8 a line
    err = only_error(send(core, "eve", "s-eve", "late", big, room="dev"), "s-eve")
    assert (err.code, err.retry_after) == (E.RATE_LIMITED, pytest.approx((8 - 4) / 20.0))
    assert all(send(core, "bob", "s-bob", f"c{i}", "short line", room="dev").store for i in range(100))
    multibyte = "é" * 2100  # 2,100 characters, 4,200 bytes: two tokens
    core.buckets["bob"].tokens = 2.0
    assert send(core, "bob", "s-bob", "mb", multibyte, room="dev", now=0.0).store
    assert core.buckets["bob"].tokens == pytest.approx(0.0)

    room = make(limits=Limits(rate=100.0, burst=100.0, request_rate=0, room_rate=8.0, room_burst=16.0), members={"dev": {"bob"}})
    hello(room, "s-bob", "bob")
    assert [bool(send(room, "bob", "s-bob", f"r{i}", big, room="dev").store) for i in range(3)] == [True, True, False]
    assert room.buckets["bob"].tokens == pytest.approx(100.0 - 16.0)  # the room's refusal gave the user's 8 back
    tiny = make(limits=Limits(rate=1.0, burst=4.0, request_rate=0, room_rate=0), members={"dev": {"bob"}})
    hello(tiny, "s-bob", "bob")
    assert send(tiny, "bob", "s-bob", "t1", big, room="dev").store  # costs the whole bucket, not more


def test_a_refused_big_line_weighs_its_tokens() -> None:
    """The core says what each refused line would have cost (Outcome.weights, by the
    Error's identity), so the broker counts a refused 32 KB line as 8 refusals; a short
    line's refusal weighs one (no entry)."""
    core = make(limits=Limits(rate=1.0, burst=8.0, request_rate=0, room_rate=0), members={"dev": {"eve"}})
    hello(core, "s-eve", "eve")
    big = "x" * 32 * 1024
    assert send(core, "eve", "s-eve", "c0", big, room="dev").store
    out = send(core, "eve", "s-eve", "c1", big, room="dev")
    err = only_error(out, "s-eve")
    assert err.code == E.RATE_LIMITED and out.weights == {id(err): 8.0}
    short = send(core, "eve", "s-eve", "c2", "hi", room="dev")
    assert only_error(short, "s-eve").code == E.RATE_LIMITED and short.weights is None
    room = make(limits=Limits(rate=100.0, burst=100.0, request_rate=0, room_rate=1.0, room_burst=8.0), members={"dev": {"bob"}})
    hello(room, "s-bob", "bob")
    assert send(room, "bob", "s-bob", "r0", big, room="dev").store
    out = send(room, "bob", "s-bob", "r1", big, room="dev")
    err = only_error(out, "s-bob")
    assert "too busy" in err.message and out.weights == {id(err): 8.0}


def test_the_default_room_budget_is_far_above_a_busy_room() -> None:
    lim = Limits()
    assert lim.room_rate >= 10 * lim.rate and lim.room_burst >= 10 * lim.burst


def test_rate_zero_turns_every_rate_limit_off() -> None:
    """The benchmarks and trusted deployments run with rate=0: no request or room budget."""
    core = make(limits=Limits(rate=0, request_rate=1.0, request_burst=1.0, room_rate=1.0, room_burst=1.0),
                members={"dev": {"alice", "bob"}})
    for i in range(50):
        assert not isinstance(reply(hello(core, "a1", "alice")), p.Error)
        assert send(core, "alice", "a1", f"c{i}", room="dev").store
    assert core.request_buckets == {} and core.room_buckets == {} and core.buckets == {}
    assert core.limits.rate == 0 and core.limits.request_rate == 0 and core.limits.room_rate == 0


def test_state_of_users_gone_idle_is_evicted_a_bounded_amount_per_tick() -> None:
    lim = Limits(rate=1.0, burst=2.0, request_rate=1.0, request_burst=3.0, room_rate=1.0, room_burst=5.0, sweep=10,
                 heartbeat=1000.0)
    names = [f"u{i:02d}" for i in range(40)]
    core = make(limits=lim, members={"dev": set(names)})
    for name in names:
        hello(core, f"s-{name}", name)
        send(core, name, f"s-{name}", "c1", to="u00")
        send(core, name, f"s-{name}", "c2", room="dev")
    for name in names[1:]:
        request(core, f"s-{name}", name, p.Bye(rid=2))
    assert len(core.buckets) == len(core.request_buckets) == len(core.dms) == 40
    assert set(core.room_buckets) == {"dev"}
    tick(core, 0.5)  # not refilled yet: nothing may go
    assert len(core.buckets) == len(core.request_buckets) == 40 and core.room_buckets
    sizes = []
    for t in range(100, 106):
        tick(core, float(t))
        sizes.append(len(core.request_buckets))
    assert 40 - lim.sweep <= sizes[0] < 40  # at most `sweep` names looked at per tick
    assert set(core.request_buckets) == set(core.buckets) == set(core.dms) == {"u00"}  # u00 is still online
    assert core.room_buckets == {}
    assert set(core.dedup.by_user) == set(names)  # their cids are still within the window
    for t in range(10_000, 10_010):  # past the window (u00's session expires too)
        tick(core, float(t))
    assert core.buckets == {} and core.request_buckets == {} and core.dms == {}
    assert core.dedup.by_user == {} and len(core.dedup) == 0 and len(core.dedup.order) == 0
    # and a user who comes back starts afresh
    hello(core, "s-u05", "u05", now=10_010.0)
    assert send(core, "u05", "s-u05", "c1", to="u00", now=10_010.0).store  # the old cid was forgotten


# ------------------------------------------------------------------ 4. caps and pages


def test_rooms_per_user_are_capped_counting_dm_conversations() -> None:
    core = make(limits=Limits(rate=0, max_rooms=3))
    for name in ("alice", "bob", "carol"):
        hello(core, f"s-{name}", name)
    for room in ("r1", "r2"):
        assert request(core, "s-alice", "alice", p.Join(rid=1, room=room)).store
    assert send(core, "alice", "s-alice", "c1", to="bob").store  # the third: a conversation
    err = only_error(request(core, "s-alice", "alice", p.Join(rid=7, room="r3")), "s-alice")
    assert (err.code, err.rid) == (E.LIMIT_REACHED, 7)
    assert err.message == "you are in 3 rooms and conversations, the most allowed: part one first"
    assert "r3" not in core.members and "r3" not in core.heads
    err = only_error(send(core, "alice", "s-alice", "c2", to="carol"), "s-alice")
    assert (err.code, err.cid) == (E.LIMIT_REACHED, "c2")
    assert "@alice:carol" not in core.members and ("alice", "c2") not in core.dedup
    assert send(core, "alice", "s-alice", "c3", to="bob").store  # an existing conversation goes on
    # someone else at the cap cannot be pulled into one more conversation either
    err = only_error(send(core, "carol", "s-carol", "c1", to="alice"), "s-carol")
    assert err.code == E.LIMIT_REACHED and "'alice'" in err.message
    request(core, "s-alice", "alice", p.Part(rid=8, room="r1"))
    assert send(core, "carol", "s-carol", "c1", to="alice").store
    assert len(core.rooms_of["alice"]) == 3


def test_hello_and_bye_cost_is_bounded_by_the_rooms_cap() -> None:
    core = make(limits=Limits(rate=0, request_rate=0, max_rooms=50))
    hello(core, "a1", "alice")
    for i in range(60):
        request(core, "a1", "alice", p.Join(rid=i, room=f"r{i:02d}"))
    assert len(core.rooms_of["alice"]) == 50
    request(core, "a1", "alice", p.Bye(rid=1))
    out = hello(core, "a2", "alice")
    assert len(out.publish) == 50 and len(reply(out).rooms) == 50  # type: ignore[union-attr]


def paged(core: Core, kind: str, room: str = "") -> tuple[list, int]:
    """Everything a client gets by asking page after page; and how many pages."""
    got: list = []
    after = ""
    pages = 0
    while True:
        body = p.Rooms(rid=1, after=after) if kind == "rooms" else p.Who(rid=1, room=room, after=after)
        answer = reply(request(core, "l1", p.LOOKER, body))
        items = answer.rooms if kind == "rooms" else answer.members  # type: ignore[union-attr]
        assert len(p.encode(answer)) <= p.MAX_REPLY_BYTES
        pages += 1
        got.extend(items)
        if not answer.more:  # type: ignore[union-attr]
            return got, pages
        assert items, "a page that says more must carry something"
        after = items[-1].name


def test_rooms_and_who_are_paged_by_name() -> None:
    core = make(limits=Limits(rate=0, request_rate=0, page_size=2),
                members={r: {"alice"} for r in ("e", "a", "c", "b", "d")} | {"@alice:bob": {"alice", "bob"}})
    core.members["c"] |= {"zed", "bob", "amy", "kim"}
    hello(core, "l1", p.LOOKER)
    first = reply(request(core, "l1", p.LOOKER, p.Rooms(rid=1)))
    assert first == p.RoomsReply(rid=1, rooms=[p.RoomInfo("a", 1, 0), p.RoomInfo("b", 1, 0)], more=True)
    last = reply(request(core, "l1", p.LOOKER, p.Rooms(rid=2, after="d")))
    assert last == p.RoomsReply(rid=2, rooms=[p.RoomInfo("e", 1, 0)], more=False)
    between = reply(request(core, "l1", p.LOOKER, p.Rooms(rid=3, after="bb")))  # after a name that is no room
    assert [r.name for r in between.rooms] == ["c", "d"]  # type: ignore[union-attr]
    assert [r.name for r in paged(core, "rooms")[0]] == ["a", "b", "c", "d", "e"]
    assert [m.name for m in paged(core, "who", "c")[0]] == ["alice", "amy", "bob", "kim", "zed"]
    assert reply(request(core, "l1", p.LOOKER, p.Rooms(rid=4, after="e"))) == p.RoomsReply(rid=4, rooms=[], more=False)


def test_pages_are_held_to_max_reply_bytes() -> None:
    rooms = {f"{i:06d}" + "r" * 58: {"alice"} for i in range(20_000)}
    people = {f"{i:06d}" + "n" * 26 for i in range(40_000)}
    core = make(limits=Limits(rate=0, request_rate=0, page_size=1_000_000), members=rooms | {"big": people})
    hello(core, "l1", p.LOOKER)
    got, pages = paged(core, "rooms")
    assert [r.name for r in got] == sorted(rooms | {"big": 0}) and pages > 1
    got, pages = paged(core, "who", "big")
    assert [m.name for m in got] == sorted(people) and pages > 1


def test_joined_carries_the_first_page_of_members() -> None:
    core = make(limits=Limits(rate=0, request_rate=0, page_size=3), members={"dev": {"d", "b", "a", "c"}})
    hello(core, "e1", "e")
    joined = reply(request(core, "e1", "e", p.Join(rid=1, room="dev")))
    assert [m.name for m in joined.members] == ["a", "b", "c"]  # type: ignore[union-attr]


def test_rooms_does_not_sort_every_room_per_request() -> None:
    """100k rooms made each `rooms` request sort them all: the index is kept sorted."""
    core = make(members={f"r{i}": {"alice"} for i in range(1000)})
    hello(core, "a1", "alice")
    calls = []
    import builtins
    real = builtins.sorted

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    builtins.sorted = counting
    try:
        request(core, "a1", "alice", p.Rooms(rid=1))
        request(core, "a1", "alice", p.Rooms(rid=2, after="r5"))
    finally:
        builtins.sorted = real
    assert calls == []


_index_ops = st.lists(
    st.tuples(st.sampled_from(["join", "part", "hello", "bye", "dm"]), st.sampled_from(["ann", "bob", "cy"]),
              st.sampled_from(["a", "b", "c"]), st.sampled_from([1, 2])),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_index_ops)
def test_room_and_member_indexes_agree_with_a_plain_recount(ops: list[tuple[str, str, str, int]]) -> None:
    core = make(limits=Limits(rate=0, request_rate=0, page_size=2), members={"b": {"bob"}})
    for op, name, room, device in ops:
        sid = f"{name}{device}"
        if op == "hello":
            hello(core, sid, name)
        elif sid not in core.sessions:
            continue
        elif op == "bye":
            request(core, sid, name, p.Bye(rid=1))
        elif op == "dm":
            send(core, name, sid, f"c{len(core.heads)}{room}", to={"a": "ann", "b": "bob", "c": "cy"}[room])
        elif op == "join":
            request(core, sid, name, p.Join(rid=1, room=room))
        else:
            request(core, sid, name, p.Part(rid=1, room=room))
        if op in ("join", "part"):  # a who now and then makes (and then keeps) the member index
            core.member_page(room)
        want = [p.RoomInfo(r, len(ms), sum(1 for n in ms if core.online(n)))
                for r, ms in sorted(core.members.items()) if not p.is_dm_room(r)]
        assert core.room_list() == want
        for r in core.members:
            names = sorted(core.members[r])
            assert core.member_page(r)[0] == [p.Member(n, core.online(n), core.is_op(r, n)) for n in names][:2]
        assert core.rooms_of == {n: rs for n, rs in _rooms_of(core).items()}


def _rooms_of(core: Core) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for room, names in core.members.items():
        for name in names:
            out.setdefault(name, set()).add(room)
    return out


# ------------------------------------------------------------------ 5. dedup memory


def test_dedup_is_bounded_in_total_not_only_per_user() -> None:
    """200 throwaway names each kept a window of their own."""
    core = make(limits=Limits(rate=0, request_rate=0, room_rate=0, dedup_per_user=50, dedup_total=300))
    for i in range(200):
        name = f"u{i:03d}"
        hello(core, f"s{i}", name)
        request(core, f"s{i}", name, p.Join(rid=1, room="dev"))
        for j in range(10):
            send(core, name, f"s{i}", f"c{j}", room="dev")
    assert len(core.dedup) == 300
    assert len(core.dedup.order) - core.dedup.stale == 300
    assert ("u199", "c9") in core.dedup and ("u000", "c0") not in core.dedup  # the oldest went first
    assert core.dedup.get(("u170", "c0")) is not None


def test_the_default_dedup_caps() -> None:
    lim = Limits()
    assert (lim.dedup_per_user, lim.dedup_total, lim.dedup_window) == (1_000, 100_000, 900.0)
    core = make(limits=Limits(rate=0, room_rate=0), members={"dev": {"alice"}})
    hello(core, "a1", "alice")
    for i in range(1_500):
        send(core, "alice", "a1", f"c{i}", room="dev", now=i / 1000)
    assert len(core.dedup) == 1_000 and ("alice", "c499") not in core.dedup and ("alice", "c500") in core.dedup


def test_a_chatty_user_does_not_push_out_a_quiet_users_cids() -> None:
    core = make(limits=Limits(rate=0, request_rate=0, room_rate=0, dedup_per_user=5, dedup_total=10),
                members={"dev": {"alice", "bob"}})
    hello(core, "a1", "alice")
    hello(core, "b1", "bob")
    first = send(core, "bob", "b1", "quiet", room="dev")
    for i in range(10_000):
        send(core, "alice", "a1", f"c{i}", room="dev")
    assert send(core, "bob", "b1", "quiet", room="dev").acks == first.acks
    assert len(core.dedup.order) <= 2 * 10 + 2  # compacted as it went


def test_dedup_entries_go_after_the_window() -> None:
    core = make(limits=Limits(rate=0, request_rate=0, dedup_window=900.0, heartbeat=10_000.0), members={"dev": {"alice"}})
    hello(core, "a1", "alice")
    first = send(core, "alice", "a1", "c1", room="dev", now=10.0)
    send(core, "alice", "a1", "c2", room="dev", now=500.0)
    tick(core, 909.0)
    assert send(core, "alice", "a1", "c1", room="dev", now=909.0).acks == first.acks
    tick(core, 911.0)
    assert ("alice", "c1") not in core.dedup and ("alice", "c2") in core.dedup
    assert send(core, "alice", "a1", "c1", room="dev", now=911.0).store  # taken afresh
    tick(core, 1401.0)
    assert ("alice", "c2") not in core.dedup


def test_expiry_work_per_tick_is_bounded() -> None:
    core = make(limits=Limits(rate=0, request_rate=0, room_rate=0, sweep=100, heartbeat=10_000.0), members={"dev": {"alice"}})
    hello(core, "a1", "alice")
    for i in range(1000):
        send(core, "alice", "a1", f"c{i}", room="dev")
    tick(core, 10_000.0)
    assert len(core.dedup) == 900
    for _ in range(9):
        tick(core, 10_000.0)
    assert len(core.dedup) == 0


def test_the_warm_up_from_storage_obeys_the_caps_and_the_window() -> None:
    """The shell passes `recent` (wall-clock ts) at start, with wall_offset."""
    wall = 1_700_000_000.0
    recent = [p.Msg(room="dev", seq=i + 1, id=f"x{i}", ts=wall - 1000 + i * 100, sender="alice", text="t", cid=f"c{i}",
                    epoch="E1") for i in range(8)]  # 1000 s ago .. 300 s ago
    recent += [p.Msg(room="dev", seq=9, id="x8", ts=wall - 50, sender="bob", text="t", cid="b1", epoch="E1")]
    lim = Limits(rate=0, request_rate=0, dedup_per_user=7, dedup_window=900.0)
    core = Core(epoch="E1", boot="B1", limits=lim, heads={"dev": 9}, members={"dev": {"alice", "bob"}},
                recent=recent, wall_offset=wall - 100.0)  # monotonic now is 100.0
    assert [cid for _, cid in core.dedup] == ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "b1"]  # alice's cap: her newest 7
    tick(core, 101.0)  # c1 was stored 901 s ago
    assert [cid for _, cid in core.dedup] == ["c2", "c3", "c4", "c5", "c6", "c7", "b1"]
    hello(core, "a1", "alice", now=101.0)
    out = send(core, "alice", "a1", "c7", room="dev", now=101.0)
    assert out.acks == {"a1": [p.Stored("c7", "dev", 8, "x7", wall - 300)]} and out.store == []


# ------------------------------------------------------------------ 6. undo


def snapshot(core: Core) -> tuple:
    """What undo must restore, plus the indexes that follow membership."""
    for room, index in core._member_index.items():
        assert index == sorted(core.members.get(room, ())), room
    return (
        dict(core.heads),
        {room: set(names) for room, names in core.members.items()},
        {name: set(rooms) for name, rooms in core.rooms_of.items()},
        [(user, cid, core.dedup.get((user, cid))) for user, cid in core.dedup],
        list(core.room_index),
        dict(core.online_in),
    )


def mixed_batch(core: Core, out: Outcome) -> None:
    core.send("alice", p.Send(sid="a1", cid="c1", text="one", room="dev"), 1.0, out)
    core.request("b1", "bob", p.Join(rid=2, room="ops"), 1.0, out)
    core.send("bob", p.Send(sid="b1", cid="c2", text="two", room="ops"), 1.0, out)
    core.send("alice", p.Send(sid="a1", cid="c3", text="psst", to="carol"), 1.0, out)  # a new conversation
    core.request("b1", "bob", p.Part(rid=3, room="dev"), 1.0, out)
    core.request("a1", "alice", p.Join(rid=4, room="new"), 1.0, out)
    core.send("alice", p.Send(sid="a1", cid="c0", text="dup", room="dev"), 1.0, out)  # a resend of a stored line
    core.request("a1", "alice", p.Part(rid=5, room="@alice:bob"), 1.0, out)  # not sequenced, but a change


def test_undo_puts_the_core_back_and_rewrites_the_outcome() -> None:
    core = make(heads={"dev": 7, "@alice:bob": 3}, members={"dev": {"alice", "bob"}, "@alice:bob": {"alice", "bob"}},
                users={"carol"})
    for sid, name in (("a1", "alice"), ("b1", "bob")):
        hello(core, sid, name)
    kept = send(core, "alice", "a1", "c0", room="dev")  # stored in an earlier batch
    core.member_page("dev")  # the who index exists and must follow
    before = snapshot(core)
    out = Outcome()
    mixed_batch(core, out)
    assert sorted((m.room, m.seq) for m in out.store) == [
        ("@alice:carol", 1), ("dev", 9), ("dev", 10), ("new", 1), ("ops", 1), ("ops", 2)]
    core.undo(out)
    assert snapshot(core) == before
    assert (out.store, out.members, out.changed) == ([], [], [])
    assert out.publish == []  # every publication was of a failed message
    assert out.acks == {"a1": kept.acks["a1"]}  # the resend's ack stands
    errors = [(sid, body.code, body.rid, body.cid) for sid, body in out.replies if isinstance(body, p.Error)]
    assert sorted(errors) == sorted([
        ("a1", E.INTERNAL, 0, "c1"), ("b1", E.INTERNAL, 2, ""), ("b1", E.INTERNAL, 0, "c2"), ("a1", E.INTERNAL, 0, "c3"),
        ("b1", E.INTERNAL, 3, ""), ("a1", E.INTERNAL, 4, ""), ("a1", E.INTERNAL, 5, ""),
    ])
    assert all(isinstance(body, p.Error) for _, body in out.replies)
    # the resends are taken afresh, with the same seqs
    again = Outcome()
    mixed_batch(core, again)
    assert sorted((m.room, m.seq) for m in again.store) == [
        ("@alice:carol", 1), ("dev", 9), ("dev", 10), ("new", 1), ("ops", 1), ("ops", 2)]


def test_undo_keeps_what_is_not_of_the_failed_batch() -> None:
    core = make(members={"dev": {"alice"}})
    hello(core, "a1", "alice")
    out = Outcome()
    core.request("a1", "alice", p.Ping(rid=1), 1.0, out)
    core.send("alice", p.Send(sid="a1", cid="c1", text="x", room="dev"), 1.0, out)
    core.request("a1", "alice", p.Who(rid=2, room="dev"), 1.0, out)
    hello_out = Outcome()
    core.request("b1", "bob", p.Hello(rid=3), 1.0, hello_out)
    core.undo(out)
    assert [type(body).__name__ for _, body in out.replies] == ["Pong", "WhoReply", "Error"]
    core.undo(Outcome())  # nothing to undo
    assert core.heads == {} and core.online("bob")


_batch_ops = st.lists(
    st.tuples(st.sampled_from(["say", "say", "dm", "join", "part", "part_dm"]), st.sampled_from(["ann", "bob", "cy"]),
              st.sampled_from(["a", "b", "ann", "bob", "cy"]), st.integers(0, 4)),
    max_size=25,
)


def run_ops(core: Core, ops: list[tuple[str, str, str, int]], out: Outcome) -> None:
    for op, name, target, n in ops:
        sid = f"s-{name}"
        if op == "say":
            core.send(name, p.Send(sid=sid, cid=f"c{n}", text="x", room=target), 1.0, out)
        elif op == "dm":
            core.send(name, p.Send(sid=sid, cid=f"c{n}", text="x", to=target), 1.0, out)
        elif op == "join":
            core.request(sid, name, p.Join(rid=n, room=target), 1.0, out)
        elif op == "part":
            core.request(sid, name, p.Part(rid=n, room=target), 1.0, out)
        elif target in ("ann", "bob", "cy"):
            core.request(sid, name, p.Part(rid=n, room=p.dm_room(name, target)), 1.0, out)


@settings(max_examples=300, deadline=None)
@given(_batch_ops, _batch_ops, st.sampled_from([3, 100]))
def test_sequencing_then_undo_leaves_the_core_as_before(
    prefix: list[tuple[str, str, str, int]], batch: list[tuple[str, str, str, int]], max_rooms: int
) -> None:
    core = make(limits=Limits(rate=0, request_rate=0, room_rate=0, max_rooms=max_rooms), users={"ann", "bob", "cy"})
    for name in ("ann", "bob", "cy"):
        hello(core, f"s-{name}", name)
    run_ops(core, prefix, Outcome())
    for room in list(core.members)[:2]:
        core.member_page(room)
    before = snapshot(core)
    out = Outcome()
    run_ops(core, batch, out)
    stored = [(m.room, m.seq, m.sender, m.cid) for m in out.store]
    core.undo(out)
    assert snapshot(core) == before
    assert out.store == [] and out.members == [] and not any(isinstance(m, p.Msg) for _, m in out.publish)
    redo = Outcome()
    run_ops(core, batch, redo)
    assert [(m.room, m.seq, m.sender, m.cid) for m in redo.store] == stored


# ------------------------------------------------------------------ 7. heads on subscription


def test_subscribed_tells_the_heads_of_what_the_subscription_covers() -> None:
    core = make(heads={"dev": 5, "@alice:bob": 2, "@alice:carol": 9, "ops": 1},
                members={"dev": {"alice"}, "@alice:bob": {"alice", "bob"}, "@alice:carol": {"alice", "carol"}, "ops": {"bob"}})
    assert core.subscribed("alice", DEV) == p.Heads(epoch="E1", heads={"dev": 5})
    assert core.subscribed("alice", p.inbox_topic("alice")) == p.Heads(epoch="E1", heads={"@alice:bob": 2, "@alice:carol": 9})
    assert core.subscribed("bob", p.inbox_topic("bob")) == p.Heads(epoch="E1", heads={"@alice:bob": 2})
    assert core.subscribed("zed", p.inbox_topic("zed")) == p.Heads(epoch="E1", heads={})
    assert core.subscribed("alice", p.room_topic("fresh")) == p.Heads(epoch="E1", heads={"fresh": 0})
    assert core.subscribed("alice", p.SYSTEM_TOPIC) is None
    assert core.subscribed("alice", p.inbox_topic("bob")) is None  # never authorised: nothing to tell
    assert core.subscribed("alice", b"#de") is None


def test_undo_lowers_the_heads_told_in_the_same_outcome() -> None:
    """A head that counted an undone seq would make a client skip the next message."""
    core = make(heads={"dev": 4, "ops": 2}, members={"dev": {"alice", "bob"}, "ops": {"bob"}})
    hello(core, "a1", "alice")
    hello(core, "b1", "bob")
    out = Outcome()
    core.send("alice", p.Send(sid="a1", cid="c1", text="x", room="dev"), 1.0, out)
    core.request("b1", "bob", p.Ping(rid=1), 1.0, out)
    core.request("b2", "bob", p.Hello(rid=2), 1.0, out)
    core.request("b1", "bob", p.Join(rid=3, room="dev"), 1.0, out)  # already a member: a plain Joined
    core.request("b1", "bob", p.History(rid=4, room="dev"), 1.0, out)
    core.request("b1", "bob", p.History(rid=5, room="ops"), 1.0, out)
    told = [body for _, body in out.replies]
    assert told[0].heads["dev"] == 5 and told[1].rooms["dev"] == 5 and told[2].head == 5  # type: ignore[union-attr]
    core.undo(out)
    pong, welcome, joined = (body for _, body in out.replies[:3])
    assert pong.heads == {"dev": 4, "ops": 2}  # type: ignore[union-attr]
    assert welcome.rooms == {"dev": 4, "ops": 2}  # type: ignore[union-attr]
    assert isinstance(joined, p.Joined) and joined.head == 4
    assert [q.head for q in out.queries] == [4, 2]
    assert core.heads == {"dev": 4, "ops": 2}


def test_a_released_name_cannot_be_messaged_through_the_dm_cache() -> None:
    core = make(users={"bob"})
    hello(core, "a1", "alice")
    assert send(core, "alice", "a1", "c1", to="bob").store  # the pair is cached from here on
    core.release_user("bob")
    assert only_error(send(core, "alice", "a1", "c2", to="bob"), "a1").code == E.UNKNOWN_USER

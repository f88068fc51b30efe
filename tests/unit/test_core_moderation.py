"""Private rooms and moderation in the core, driven with plain values."""

from __future__ import annotations

import pytest

from zchat import protocol as p
from zchat.core import BROKER_SCOPE, Core, Limits, Outcome
from zchat.protocol import ErrorCode as E


def make(**kwargs) -> Core:  # type: ignore[no-untyped-def]
    kwargs.setdefault("limits", Limits(rate=0))
    return Core(epoch="E1", boot="B1", **kwargs)


def request(core: Core, sid: str, name: str, body: p.Request, now: float = 0.0) -> Outcome:
    out = Outcome()
    core.request(sid, name, body, now, out)
    return out


def error(out: Outcome) -> p.Error:
    assert len(out.replies) == 1, out.replies
    body = out.replies[0][1]
    assert isinstance(body, p.Error), body
    assert not out.store and not out.members and not out.room_changes
    return body


def mod(core: Core, who: str, action: str, room: str = "sec", name: str = "", text: str = "") -> Outcome:
    return request(core, f"s-{who}", who, p.Moderate(rid=7, room=room, action=action, name=name, text=text))  # type: ignore[arg-type]


def private_room(*names: str) -> Core:
    """alice created private #sec and invited the others, who joined; all online."""
    core = make(users=["alice", "bob", "carol", "dave", "root"], admins=["root"])
    for name in ("alice", "bob", "carol", "dave", "root"):
        request(core, f"s-{name}", name, p.Hello(rid=1))
    out = request(core, "s-alice", "alice", p.Join(rid=2, room="sec", private=True))
    assert isinstance(out.replies[0][1], p.Joined) and out.replies[0][1].private
    for name in names:
        assert isinstance(mod(core, "alice", "invite", name=name).replies[0][1], p.Ok)
        assert isinstance(request(core, f"s-{name}", name, p.Join(rid=3, room="sec")).replies[0][1], p.Joined)
    return core


def test_creating_a_private_room_makes_the_creator_its_operator_with_a_token() -> None:
    core = make(users=["alice"])
    request(core, "s-alice", "alice", p.Hello(rid=1))
    out = request(core, "s-alice", "alice", p.Join(rid=2, room="sec", private=True))
    joined = out.replies[0][1]
    assert isinstance(joined, p.Joined) and joined.private and joined.token == "1"
    assert joined.members == [p.Member("alice", True, True)]
    assert ("sec", "private", "1", True) in out.room_changes and ("sec", "op", "alice", True) in out.room_changes
    assert out.publish[0][0] == p.room_topic("sec", "1")  # the join line, on the tokened topic
    assert core.room_list() == [] and core.room_page("", "alice")[0] == [p.RoomInfo("sec", 1, 1, True)]


def test_a_private_room_cannot_be_made_over_an_existing_room() -> None:
    core = make(users=["alice", "bob"])
    request(core, "s-bob", "bob", p.Hello(rid=1))
    request(core, "s-bob", "bob", p.Join(rid=2, room="dev"))
    request(core, "s-alice", "alice", p.Hello(rid=1))
    assert error(request(core, "s-alice", "alice", p.Join(rid=2, room="dev", private=True))).code == E.FORBIDDEN


def test_non_members_cannot_join_read_list_or_find_a_private_room() -> None:
    core = private_room()
    for body in (p.Join(rid=4, room="sec"), p.History(rid=4, room="sec"), p.Who(rid=4, room="sec")):
        assert error(request(core, "s-dave", "dave", body)).code == E.FORBIDDEN
    assert request(core, "s-dave", "dave", p.Rooms(rid=4)).replies[0][1].rooms == []  # type: ignore[union-attr]
    assert not core.may_subscribe("dave", p.room_topic("sec", core.tokens["sec"]))
    assert core.may_subscribe("alice", p.room_topic("sec", core.tokens["sec"]))
    assert not core.may_subscribe("alice", p.room_topic("sec"))  # the token is part of the topic


def test_an_invited_user_is_admitted_at_once_and_the_invite_is_used_up() -> None:
    core = private_room()
    out = mod(core, "alice", "invite", name="bob")
    line = out.store[0]
    assert (line.kind, line.sender, line.to) == ("invite", "alice", "bob")
    assert [t for t, _ in out.publish] == [p.room_topic("sec", "1"), p.inbox_topic("bob")]
    assert isinstance(request(core, "s-bob", "bob", p.Join(rid=3, room="sec")).replies[0][1], p.Joined)
    assert core.role_of("sec", "invite") == set()
    request(core, "s-bob", "bob", p.Part(rid=4, room="sec"))
    assert error(request(core, "s-bob", "bob", p.Join(rid=5, room="sec"))).code == E.FORBIDDEN


@pytest.mark.parametrize("action", ["kick", "ban"])
def test_kick_and_ban_remove_the_member_and_rotate_the_topic_for_the_rest(action: str) -> None:
    core = private_room("bob", "carol")
    old = core.tokens["sec"]
    out = mod(core, "alice", action, name="bob", text="spam")
    line = out.store[0]
    assert (line.kind, line.to, line.text) == (action, "bob", "spam")
    new = core.tokens["sec"]
    assert new != old and "bob" not in core.members["sec"]
    # the line on the old topic (bob hears he is out) and bob's inbox, then the new topic to the rest
    assert out.publish[0] == (p.room_topic("sec", old), line)
    assert out.publish[1] == (p.inbox_topic("bob"), line)
    told = sorted(t for t, body in out.publish if isinstance(body, p.Retopic) and body.token == new)
    assert told == [p.inbox_topic("alice"), p.inbox_topic("carol")]
    assert not core.may_subscribe("carol", p.room_topic("sec", old)) and core.may_subscribe("carol", p.room_topic("sec", new))
    later = Outcome()
    core.send("carol", p.Send(sid="s-carol", cid="c1", text="after", room="sec"), 1.0, later)
    assert later.publish[0][0] == p.room_topic("sec", new)  # only the current topic carries the room
    if action == "ban":
        assert error(request(core, "s-bob", "bob", p.Join(rid=9, room="sec"))).code == E.FORBIDDEN
        assert error(mod(core, "alice", "invite", name="bob")).code == E.BAD_REQUEST


def test_a_part_rotates_a_private_room_but_not_a_public_one() -> None:
    core = private_room("bob")
    old = core.tokens["sec"]
    out = request(core, "s-bob", "bob", p.Part(rid=5, room="sec"))
    assert core.tokens["sec"] != old
    assert [t for t, body in out.publish if isinstance(body, p.Retopic)] == [p.inbox_topic("alice")]
    request(core, "s-bob", "bob", p.Join(rid=6, room="pub"))
    request(core, "s-carol", "carol", p.Hello(rid=1))
    request(core, "s-carol", "carol", p.Join(rid=6, room="pub"))
    out = request(core, "s-carol", "carol", p.Part(rid=7, room="pub"))
    assert "pub" not in core.tokens and not any(isinstance(b, p.Retopic) for _, b in out.publish)


def test_non_operators_get_forbidden_for_every_action() -> None:
    core = private_room("bob")
    for action in ("invite", "kick", "ban", "unban", "op", "deop"):
        assert error(mod(core, "bob", action, name="carol")).code == E.FORBIDDEN
    assert error(mod(core, "bob", "topic", text="mine")).code == E.FORBIDDEN
    assert error(mod(core, "dave", "kick", name="bob")).code == E.FORBIDDEN


def test_topic_op_deop_unban_are_sequenced_lines_and_settings() -> None:
    core = private_room("bob")
    out = mod(core, "alice", "topic", text="secrets here")
    assert (out.store[0].kind, out.store[0].text) == ("topic", "secrets here") and core.topic_of("sec") == "secrets here"
    mod(core, "alice", "topic", text="v2")
    assert core.role_of("sec", "topic") == {"v2"}
    assert mod(core, "alice", "op", name="bob").store[0].kind == "op" and core.is_op("sec", "bob")
    assert isinstance(mod(core, "bob", "kick", name="alice").replies[0][1], p.Ok)  # bob runs it now
    assert not core.is_op("sec", "alice")  # op status is a member's
    assert mod(core, "bob", "ban", name="carol").store[0].kind == "ban"
    assert mod(core, "bob", "unban", name="carol").store[0].kind == "unban" and core.role_of("sec", "ban") == set()
    assert mod(core, "bob", "deop", name="bob").store[0].kind == "deop"
    assert error(mod(core, "bob", "deop", name="bob")).code == E.FORBIDDEN


def test_caps_bound_bans_ops_and_invites() -> None:
    core = private_room()
    core.limits = Limits(rate=0, max_bans=1, max_invites=1, max_ops=1)
    assert mod(core, "alice", "ban", name="x1").store
    assert error(mod(core, "alice", "ban", name="x2")).code == E.LIMIT_REACHED
    core.users.update({"y1", "y2"})
    assert mod(core, "alice", "invite", name="y1").store
    assert error(mod(core, "alice", "invite", name="y2")).code == E.LIMIT_REACHED
    assert error(mod(core, "alice", "op", name="bob")).code == E.NOT_MEMBER


def test_moderation_has_a_rate_budget() -> None:
    core = private_room()
    core.limits = Limits(rate=1000, burst=1000, moderation_rate=1.0, moderation_burst=2.0)
    assert mod(core, "alice", "topic", text="a").store and mod(core, "alice", "topic", text="b").store
    assert error(mod(core, "alice", "topic", text="c")).code == E.RATE_LIMITED


def test_bad_input_changes_nothing() -> None:
    core = private_room()
    assert error(mod(core, "alice", "kick", name="Not A Name")).code == E.BAD_NAME
    assert error(mod(core, "alice", "kick", name="bob")).code == E.NOT_MEMBER
    assert error(mod(core, "alice", "topic", text="x" * (p.MAX_TOPIC_LEN + 1))).code == E.BAD_REQUEST
    assert error(mod(core, "alice", "invite", name="nobody")).code == E.UNKNOWN_USER
    assert error(mod(core, "alice", "topic", room="../x")).code == E.BAD_ROOM


def test_a_rejected_store_undoes_the_settings() -> None:
    core = private_room("bob")
    old = core.tokens["sec"]
    out = mod(core, "alice", "ban", name="bob")
    core.undo(out)
    assert "bob" in core.members["sec"] and core.role_of("sec", "ban") == set()
    assert isinstance(out.replies[0][1], p.Error) and not out.room_changes
    assert core.tokens["sec"] != old  # the topic stays new: harmless, members are told through Pong's tokens
    assert core.tokens_of("bob") == {"sec": core.tokens["sec"]}


def test_admin_ban_ends_sessions_and_is_broker_wide() -> None:
    core = private_room("bob")
    out = request(core, "s-root", "root", p.Admin(rid=1, action="ban", name="bob"))
    assert isinstance(out.replies[0][1], p.Ok) and out.cut == ["bob"]
    assert "bob" in core.banned and (BROKER_SCOPE, "ban", "bob", True) in out.room_changes
    assert "s-bob" not in core.sessions and not core.online("bob")
    assert error(request(core, "s-alice", "alice", p.Admin(rid=1, action="ban", name="carol"))).code == E.FORBIDDEN
    assert isinstance(request(core, "s-root", "root", p.Admin(rid=2, action="unban", name="bob")).replies[0][1], p.Ok)
    assert "bob" not in core.banned


def test_admin_delete_sequences_a_delete_line_and_asks_for_a_tombstone() -> None:
    core = private_room("bob")
    sent = Outcome()
    core.send("bob", p.Send(sid="s-bob", cid="c1", text="oops", room="sec"), 0.0, sent)
    seq = sent.store[0].seq
    out = request(core, "s-root", "root", p.Admin(rid=1, action="delete", room="sec", seq=seq))
    line = out.store[0]
    assert (line.kind, line.text, line.sender) == ("delete", str(seq), "root") and out.tombstones == [("sec", seq)]
    assert error(request(core, "s-root", "root", p.Admin(rid=1, action="delete", room="sec", seq=seq + 5))).code == E.BAD_REQUEST
    assert error(request(core, "s-bob", "bob", p.Admin(rid=1, action="delete", room="sec", seq=seq))).code == E.FORBIDDEN


def test_admin_release_takes_the_name_out_of_every_room() -> None:
    core = private_room("bob")
    old = core.tokens["sec"]
    out = request(core, "s-root", "root", p.Admin(rid=1, action="release", name="bob"))
    assert out.released == ["bob"] and out.cut == ["bob"] and "bob" not in core.users
    assert "bob" not in core.members["sec"] and core.tokens["sec"] != old
    assert [(m.kind, m.to) for m in out.store] == [("kick", "bob")]


def test_a_rejected_store_undoes_a_release() -> None:
    core = private_room("bob")
    out = request(core, "s-root", "root", p.Admin(rid=1, action="release", name="bob"))
    core.undo(out)
    assert "bob" in core.users and "bob" in core.members["sec"] and out.released == [] and out.cut == []


def test_a_release_marks_the_earlier_owner_and_a_restart_or_an_undo_keeps_it_right() -> None:
    """Releasing alice stores when (on the broker) and where each of her DMs stood: a
    core started from those settings knows them, and an undone batch takes them back."""
    core = make(users=["alice", "bob", "root"], admins=["root"])
    core.wall_offset = 1000.0
    for name in ("alice", "bob", "root"):
        request(core, f"s-{name}", name, p.Hello(rid=1))
    sent = Outcome()
    core.send("alice", p.Send(sid="s-alice", cid="c1", to="bob", text="secret"), 5.0, sent)
    dm = p.dm_room("alice", "bob")
    assert core.heads[dm] == 1
    out = request(core, "s-root", "root", p.Admin(rid=9, action="release", name="alice"), now=10.0)
    assert isinstance(out.replies[-1][1], p.Ok)
    assert (BROKER_SCOPE, "released", "alice 1010.000000", True) in out.room_changes
    assert (dm, "floor", "alice:1", True) in out.room_changes
    assert core.floor("alice", dm) == 1 and core.floor("bob", dm) == 0
    line = sent.store[0]
    assert core.by_earlier_owner("alice", line) and not core.by_earlier_owner("bob", line)

    state: dict[str, dict[str, set[str]]] = {}
    for room, role, value, on in out.room_changes:
        values = state.setdefault(room, {}).setdefault(role, set())
        (values.add if on else values.discard)(value)
    again = make(users=["bob", "root"], admins=["root"], rooms_state=state)
    assert again.floor("alice", dm) == 1 and again.released_at == {"alice": 1010.0}

    for room, role, value, on in reversed(out.room_changes):  # the batch was refused: undone
        core._apply_role(room, role, value, not on)
    assert core.floor("alice", dm) == 0 and "alice" not in core.released_at

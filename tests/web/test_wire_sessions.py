"""zchat.web.wire and zchat.web.sessions with plain values: no network."""

from __future__ import annotations

import json

import pytest

from zchat.web import wire
from zchat.web.sessions import Sessions, cookie_flags


def test_decode_takes_our_frames_only() -> None:
    assert wire.decode('{"t":"hello","since":{"general":["e1",4]}}') == wire.Hello(since={"general": ("e1", 4)})
    assert wire.decode('{"t":"send","ref":"r","text":"hi","room":"general"}') == wire.Send(ref="r", text="hi", room="general")
    for bad in ("", "[]", '{"t":"nope"}', '{"t":"send","text":"x"}', '{"t":"send","ref":"","text":"x"}',
                '{"t":"history","room":"r","before":-1}', '{"t":"history","room":"r","before":1,"limit":100000}',
                '{"t":"join","room":"r","extra":1}', '{"t":"hello","since":{"r":["e",-5]}}', "x" * (wire.MAX_FRAME + 1)):
        with pytest.raises(wire.FrameError):
            wire.decode(bad)


def test_frames_split_by_size_and_keep_every_item_once() -> None:
    items = [{"n": i, "text": "x" * 1000} for i in range(100)]
    texts = wire.frames("replay", items, 10_000, room="general")
    assert len(texts) > 5
    decoded = [json.loads(t) for t in texts]
    assert all(d["t"] == "replay" and d["room"] == "general" for d in decoded)
    assert [i["n"] for d in decoded for i in d["items"]] == list(range(100))
    assert all(len(t) <= 10_000 + 1100 for t in texts)
    big = wire.frames("events", [{"text": "y" * 50_000}], 1000)  # a lone big item still goes
    assert len(big) == 1 and json.loads(big[0])["items"][0]["text"] == "y" * 50_000
    assert json.loads(wire.frames("events", [], 1000)[0]) == {"t": "events", "items": []}


def test_moderation_lines_carry_their_sentence() -> None:
    from zchat import protocol as p

    kick = p.Msg(room="general", seq=7, id="i", ts=1.0, sender="alice", text="spam", kind="kick", to="mallory")
    assert wire.msg(kick)["action"] == "alice kicked mallory (spam)"
    gone = p.Msg(room="general", seq=3, id="j", ts=1.0, sender="bob", kind="deleted")
    assert wire.msg(gone)["action"] == "(message deleted)"
    assert "action" not in wire.msg(p.Msg(room="general", seq=8, id="k", ts=1.0, sender="bob", text="hi"))


def test_user_text_is_json_not_markup() -> None:
    text = wire.frame("error", message='<script>alert("x")</script>')
    assert json.loads(text)["message"] == '<script>alert("x")</script>'


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sessions_expire_and_are_bounded() -> None:
    clock = Clock()
    sessions = Sessions(idle=100, max_sessions=3, clock=clock)
    token, session = sessions.create("alice")
    assert session.key != token and token not in repr(sessions._table)  # only the digest is kept
    assert sessions.get(token).name == "alice"  # type: ignore[union-attr]
    clock.now = 99
    assert sessions.get(token) is not None  # use renews it
    clock.now = 198
    assert sessions.get(token) is not None
    clock.now = 299
    assert sessions.get(token) is None
    tokens = [sessions.create(f"u{i}")[0] for i in range(5)]
    assert len(sessions) == 3 and sessions.get(tokens[0]) is None and sessions.get(tokens[-1]) is not None
    assert sessions.get(None) is None and sessions.get("x" * 1000) is None and sessions.get("nope") is None
    assert sessions.end(tokens[-1]) is not None and sessions.get(tokens[-1]) is None


def test_cookie_flags() -> None:
    assert cookie_flags(False)["httponly"] is True and cookie_flags(False)["samesite"] == "Strict"
    assert "secure" not in cookie_flags(False) and cookie_flags(True)["secure"] is True

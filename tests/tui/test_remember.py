"""talk's read positions file and its notifier, with plain values (their wiring into
the app, and its Pilot tests, come with the talk session of issue 17)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zchat import protocol as p
from zchat.tui.cursors import MAX_ROOMS, CursorFile, new_since
from zchat.tui.notify import Notifier, NotifySettings, clean, mentions


def test_cursors_round_trip_per_user_and_broker(tmp_path: Path) -> None:
    a = CursorFile(tmp_path, "alice", "tcp://h:5555#k=KEY")
    a.save({"general": ("e1", 41), "@alice:bob": ("e1", 3)})
    assert a.load() == {"general": ("e1", 41), "@alice:bob": ("e1", 3)}
    assert CursorFile(tmp_path, "alice", "tcp://h:5555").load() == a.load()  # the key part is not the broker
    assert CursorFile(tmp_path, "alice", "tcp://other:5555").load() == {}
    assert CursorFile(tmp_path, "bob", "tcp://h:5555").load() == {}
    assert (a.path.stat().st_mode & 0o777) == 0o600
    assert [x.name for x in a.path.parent.iterdir()] == [a.path.name]  # no temporary file left


def test_a_damaged_file_starts_afresh_and_is_kept_aside(tmp_path: Path) -> None:
    f = CursorFile(tmp_path, "alice", "tcp://h:5555")
    f.path.parent.mkdir(parents=True)
    f.path.write_text("{not json")
    assert f.load() == {}
    assert f.path.with_name(f.path.name + ".damaged").exists()
    f.path.write_text(json.dumps({"format": 1, "rooms": {"ok": ["e", 5], "bad": ["e", -1], "worse": "x"}}))
    assert f.load() == {"ok": ("e", 5)}  # odd entries are skipped, the rest kept


def test_the_file_is_bounded(tmp_path: Path) -> None:
    f = CursorFile(tmp_path, "alice", "tcp://h:5555")
    f.save({f"r{i}": ("e", i) for i in range(MAX_ROOMS + 50)})
    kept = f.load()
    assert len(kept) == MAX_ROOMS and "r0" not in kept and f"r{MAX_ROOMS + 49}" in kept


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CursorFile(tmp_path, "../etc", "tcp://h:5555")


def test_new_since() -> None:
    assert new_since([3, 4, 5, 6], 4) == 2
    assert new_since([3, 4], 4) is None
    assert new_since([], 0) is None


def msg(text: str, sender: str = "bob", room: str = "general", kind: str = "text") -> p.Msg:
    return p.Msg(room=room, seq=1, id="x-1", ts=0.0, sender=sender, text=text, kind=kind)  # type: ignore[arg-type]


def test_mentions() -> None:
    assert mentions("hey alice, look", "alice") and mentions("@Alice!", "alice") and mentions("alice", "alice")
    assert not mentions("malice aforethought", "alice") and not mentions("alice-bot said", "alice")


class Term:
    def __init__(self) -> None:
        self.out: list[str] = []
        self.runs: list[list[str]] = []
        self.now = 100.0


def notifier(term: Term, **settings: object) -> Notifier:
    return Notifier("alice", NotifySettings(**settings), term.out.append, term.runs.append, clock=lambda: term.now, which=lambda _: None)  # type: ignore[arg-type]


def test_a_mention_rings_and_notifies_through_the_terminal() -> None:
    term = Term()
    n = notifier(term)
    assert n.on_msg(msg("lunch, alice?")) == ["bell", "osc777"]
    assert term.out == ["\a", "\x1b]777;notify;zchat: bob in #general;lunch, alice?\x1b\\"]
    assert n.on_msg(msg("no mention here")) == []
    assert n.on_msg(msg("alice, me again", sender="alice")) == []  # our own line
    assert n.on_msg(msg("", kind="join")) == []


def test_a_dm_notifies_and_busy_rooms_ring_once_per_gap() -> None:
    term = Term()
    n = notifier(term, min_gap=2.0)
    assert n.on_msg(msg("psst", room="@alice:bob")) == ["bell", "osc777"]
    assert n.on_msg(msg("psst again", room="@alice:bob")) == []  # within the gap
    term.now += 2.5
    assert n.on_msg(msg("later", room="@alice:bob")) != []


def test_switches_and_methods() -> None:
    term = Term()
    assert notifier(term, bell=False, desktop=False).on_msg(msg("alice!")) == []
    assert notifier(term, bell=False, method="osc9").on_msg(msg("alice!")) == ["osc9"]
    assert term.out[-1].startswith("\x1b]9;")
    n = Notifier("alice", NotifySettings(bell=False), term.out.append, term.runs.append, which=lambda _: "/usr/bin/notify-send")
    assert n.on_msg(msg("alice!")) == ["notify-send"] and term.runs[-1][0] == "notify-send"
    with pytest.raises(ValueError):
        NotifySettings(method="smoke-signals")


def test_chat_text_cannot_drive_the_terminal() -> None:
    term = Term()
    evil = "alice \x1b\\\x1b]0;owned\x07\x9b2J; rm"
    notifier(term, bell=False).on_msg(msg(evil))
    sent = term.out[-1]
    body = sent[len("\x1b]777;notify;") : -2]
    assert "\x1b" not in body and "\x07" not in body and "\x9b" not in body and ";" not in body.split(";", 1)[1]
    assert clean("a" * 500).endswith("…") and len(clean("a" * 500)) == 200
    assert os.linesep not in clean("two\nlines")

"""zchat lines as IRC lines, with plain values: splitting, tags, NAMES."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from zchat.irc.lines import MAX_LINE, body_size
from zchat.irc.translate import (
    chat_lines,
    names_lines,
    server_time,
    split_text,
    tags_for,
)


def test_server_time_is_utc_with_milliseconds() -> None:
    assert server_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert server_time(1764600000.1234) == "2025-12-01T14:40:00.123Z"


def test_tags_follow_the_caps() -> None:
    assert tags_for(set(), 0.0, "1.x", "b") == ()
    assert tags_for({"server-time", "message-tags", "batch"}, 0.0, "1.x", "b") == (
        ("batch", "b"), ("time", "1970-01-01T00:00:00.000Z"), ("msgid", "1.x"),
    )


def test_split_prefers_spaces_and_newlines_make_lines() -> None:
    assert split_text("one two three", 8) == ["one two", "three"]
    assert split_text("a\nb\r\n\nc", 100) == ["a", "b", "c"]
    assert split_text("x" * 10, 4) == ["xxxx", "xxxx", "xx"]


@given(st.text(min_size=1, max_size=3000), st.booleans())
def test_every_line_fits_and_nothing_is_lost(text: str, me: bool) -> None:
    lines = chat_lines("somebody!somebody@zchat", "#a-long-channel-name", text, me=me)
    for line in lines:
        assert body_size(line) <= MAX_LINE
    pieces = [line.params[1].removeprefix("\x01ACTION ").removesuffix("\x01") if me else line.params[1] for line in lines]
    squeeze = lambda t: "".join(t.replace("\0", "").split())
    assert squeeze("".join(pieces)) == squeeze(text)


def test_names_are_cut_to_fit() -> None:
    nicks = [f"user-{i:05d}" for i in range(300)]
    lines = names_lines("zchat", "alice", "#general", nicks)
    assert lines[-1].command == "366"
    assert all(body_size(line) <= MAX_LINE for line in lines)
    assert sum(len(line.params[-1].split()) for line in lines[:-1]) == 300

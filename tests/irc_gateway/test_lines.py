"""The IRC line parser, formatter and splitter, with plain bytes (no sockets)."""

from __future__ import annotations

import pytest

from zchat.irc import names
from zchat.irc.lines import (
    MAX_LINE,
    Line,
    LineError,
    Splitter,
    body_size,
    format_line,
    parse,
)


def test_parse_plain_and_trailing() -> None:
    line = parse(b"PRIVMSG #general :hello there")
    assert line == Line("PRIVMSG", ("#general", "hello there"))
    assert parse(b"nick alice").command == "NICK"  # commands are case-insensitive
    assert parse(b":srv 001 alice :Welcome").source == "srv"
    assert parse(b"USER a 0 * :Real Name").params == ("a", "0", "*", "Real Name")
    assert parse(b"PRIVMSG #a ::-)").params == ("#a", ":-)")
    assert parse(b"PRIVMSG #a :").params == ("#a", "")


def test_parse_tags_are_unescaped() -> None:
    line = parse(b"@time=2026-12-01T10:00:00.000Z;+draft/x=a\\sb\\:c;flag :bob PRIVMSG #a :hi")
    assert line.tag("time") == "2026-12-01T10:00:00.000Z"
    assert line.tag("+draft/x") == "a b;c"
    assert line.tag("flag") == ""
    assert line.source == "bob" and line.command == "PRIVMSG"


def test_parse_refuses_invalid_utf8_and_names_the_command() -> None:
    with pytest.raises(LineError) as exc:
        parse(b"PRIVMSG #a :\xff\xfe")
    assert exc.value.reason == "utf8" and exc.value.command == "PRIVMSG"
    with pytest.raises(LineError) as exc:
        parse(b"@a=b")
    assert exc.value.reason == "empty"


def test_format_round_trip_and_trailing_rules() -> None:
    line = Line("PRIVMSG", ("#a", "two words"), "bob!bob@zchat", (("time", "x y"),))
    raw = format_line(line)
    assert raw == b"@time=x\\sy :bob!bob@zchat PRIVMSG #a :two words\r\n"
    assert parse(raw[:-2]) == line
    assert format_line(Line("PING", ("tok",))) == b"PING tok\r\n"
    assert format_line(Line("PRIVMSG", ("#a", ":)"))) == b"PRIVMSG #a ::)\r\n"
    assert format_line(Line("PRIVMSG", ("#a", ""))) == b"PRIVMSG #a :\r\n"


def test_format_never_puts_cr_lf_nul_on_the_wire() -> None:
    raw = format_line(Line("PRIVMSG", ("#a", "one\r\ntwo\0")))
    assert raw.count(b"\r\n") == 1 and b"\0" not in raw
    assert body_size(Line("PING", ("x",), tags=(("time", "t" * 100),))) == len(b"PING x\r\n")


def test_splitter_cuts_lines_and_accepts_bare_lf() -> None:
    s = Splitter()
    assert s.feed(b"NICK a\r\nUSER a 0 * :a\nPI") == [b"NICK a", b"USER a 0 * :a"]
    assert s.feed(b"NG x\r\n\r\n") == [b"PING x"]  # an empty line is skipped


def test_splitter_refuses_a_512_byte_body_and_keeps_going() -> None:
    s = Splitter()
    ok = b"PRIVMSG #a :" + b"x" * (MAX_LINE - 2 - 12)  # exactly 512 with CRLF
    too = ok + b"y"
    out = s.feed(ok + b"\r\n" + too + b"\r\nPING z\r\n")
    assert out[0] == ok
    assert isinstance(out[1], LineError) and out[1].reason == "too_long" and out[1].command == "PRIVMSG"
    assert out[2] == b"PING z"


def test_splitter_tags_do_not_count_against_the_body() -> None:
    s = Splitter()
    tags = b"@+x=" + b"t" * 4000 + b" "
    body = b"PRIVMSG #a :" + b"x" * 400
    assert s.feed(tags + body + b"\r\n") == [tags + body]


def test_splitter_buffer_stays_bounded_without_newline() -> None:
    s = Splitter()
    errors = []
    for _ in range(1000):
        errors += s.feed(b"x" * 1000)
        assert s.buffered <= MAX_LINE + 8191 + 1000
    assert len(errors) == 1 and isinstance(errors[0], LineError)
    assert s.feed(b"tail of the long line\r\nPING after\r\n") == [b"PING after"]


@pytest.mark.parametrize("nick,name", [("alice", "alice"), ("Alice", "alice"), ("a-b_9", "a-b_9"), ("9lives", "9lives")])
def test_nicks_that_map(nick: str, name: str) -> None:
    assert names.nick_to_name(nick) == name


@pytest.mark.parametrize("nick", ["-x", "_x", "a b", "[bot]", "a" * 33, "", "émile", "a.b"])
def test_nicks_that_do_not_map(nick: str) -> None:
    assert names.nick_to_name(nick) is None


def test_channels_and_rooms() -> None:
    assert names.channel_to_room("#general") == "general"
    assert names.channel_to_room("#Dev.Ops") == "dev.ops"
    assert names.room_to_channel("general") == "#general"
    for bad in ("general", "&local", "#", "#-x", "#a b", "#@alice:bob", "#" + "a" * 65, "#ça"):
        assert names.channel_to_room(bad) is None, bad

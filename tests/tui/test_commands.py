"""Unit tests of what the user types: command parsing, completion, input history."""

from __future__ import annotations

import pytest

from zchat.tui import commands as c
from zchat.tui.commands import CommandError, Completer, InputHistory, parse


@pytest.mark.parametrize(
    ("line", "action"),
    [
        ("hello", c.Say("hello")),
        ("  spaced  ", c.Say("  spaced  ")),
        ("//etc/passwd is a path", c.Say("/etc/passwd is a path")),
        ("/me waves", c.Say("waves", me=True)),
        ("/ME  waves  twice", c.Say("waves  twice", me=True)),
        ("/join #Dev", c.Join("dev")),
        ("/j ops.alerts", c.Join("ops.alerts")),
        ("/part", c.Part(None)),
        ("/leave dev", c.Part("dev")),
        ("/msg Bob hi there  bob", c.Msg("bob", "hi there  bob")),
        ("/msg @carol", c.Msg("carol", None)),
        ("/query dave", c.Msg("dave", None)),
        ("/who", c.Who(None)),
        ("/names #general", c.Who("general")),
        ("/rooms", c.Rooms()),
        ("/switch #random", c.Switch("random")),
        ("/switch @Bob", c.Switch("@bob")),
        ("/switch 2", c.Switch("2")),
        ("/history 25", c.History(25)),
        ("/clear", c.Clear()),
        ("/help", c.Help(None)),
        ("/help /join", c.Help("join")),
        ("/quit", c.Quit()),
        ("/exit", c.Quit()),
    ],
)
def test_parse(line: str, action: c.Action) -> None:
    assert parse(line) == action


@pytest.mark.parametrize("line", ["", "   ", "\t"])
def test_blank_lines_are_nothing(line: str) -> None:
    assert parse(line) is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/jion dev", "unknown command /jion: did you mean /join?"),
        ("/frobnicate", "unknown command /frobnicate: /help lists the commands"),
        ("/join", "/join needs one room (usage: /join ROOM)"),
        ("/join a b", "/join needs one room"),
        ("/join bad room!", "/join needs one room"),
        ("/join Bad!", "bad room name 'Bad!'"),
        ("/msg", "/msg needs a name (usage: /msg NAME [TEXT])"),
        ("/msg no/pe hi", "bad user name 'no/pe'"),
        ("/me", "/me needs some text"),
        ("/history", "/history needs a number from 1 to 1000"),
        ("/history 0", "/history needs a number from 1 to 1000"),
        ("/history 1001", "/history needs a number"),
        ("/history lots", "/history needs a number"),
        ("/switch", "/switch needs one room, @name or number"),
        ("/switch 0", "window numbers start at 1"),
        ("/quit now", "/quit takes no arguments"),
        ("/rooms x", "/rooms takes no arguments"),
    ],
)
def test_errors_are_one_clear_line(line: str, message: str) -> None:
    with pytest.raises(CommandError) as info:
        parse(line)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_help_lists_every_command_and_explains_one() -> None:
    lines = c.help_lines()
    for name in ("join", "part", "msg", "me", "who", "rooms", "switch", "history", "clear", "help", "quit"):
        assert any(line.startswith(f"/{name}") for line in lines), name
    (one,) = c.help_lines("leave")
    assert one.startswith("/part [ROOM]") and "/leave" in one
    with pytest.raises(CommandError, match="no command /nope"):
        c.help_lines("nope")


NICKS = ["bob", "bea", "carol"]
ROOMS = ["general", "dev", "design"]


def complete(value: str, cursor: int | None = None, completer: Completer | None = None) -> tuple[str, int] | None:
    completer = completer or Completer()
    done = completer.complete(value, len(value) if cursor is None else cursor, NICKS, ROOMS)
    return None if done is None else (done.value, done.cursor)


def test_completes_a_nick_at_line_start_with_a_colon() -> None:
    assert complete("ca") == ("carol: ", 7)


def test_completes_a_nick_in_the_middle_with_a_space_and_keeps_the_rest() -> None:
    assert complete("hi ca there", 5) == ("hi carol there", 9)
    assert complete("ping @ca") == ("ping @carol ", 12)


def test_completes_commands_and_their_arguments() -> None:
    assert complete("/jo") == ("/join ", 6)
    assert complete("/join #ge") == ("/join #general ", 15)
    assert complete("/part de") == ("/part #design ", 14)
    assert complete("/msg ca") == ("/msg carol ", 11)
    assert complete("/switch @b") == ("/switch @bea ", 13)
    assert complete("/help sw") == ("/help switch ", 13)


def test_repeated_tab_cycles_the_matches() -> None:
    completer = Completer()
    first = completer.complete("b", 1, NICKS, ROOMS)
    assert first is not None and first.value == "bea: "
    second = completer.complete(first.value, first.cursor, NICKS, ROOMS)
    assert second is not None and second.value == "bob: "
    third = completer.complete(second.value, second.cursor, NICKS, ROOMS)
    assert third is not None and third.value == "bea: "


def test_typing_after_a_completion_starts_afresh() -> None:
    completer = Completer()
    first = completer.complete("b", 1, NICKS, ROOMS)
    assert first is not None
    again = completer.complete(first.value + "and c", len(first.value) + 5, NICKS, ROOMS)
    assert again is not None and again.value == "bea: and carol "


def test_nothing_to_complete() -> None:
    assert complete("zz") is None
    assert complete("/zz") is None
    assert complete("") is None
    assert complete("hello ") is None


def test_history_recalls_lines_and_returns_the_draft() -> None:
    h = InputHistory()
    assert h.previous("draft") is None
    for line in ("one", "two", "two", "  ", "three"):
        h.add(line)
    assert h.lines == ["one", "two", "three"]
    assert h.previous("half typed") == "three"
    assert h.previous("three") == "two"
    assert h.previous("two") == "one"
    assert h.previous("one") is None  # stays at the oldest
    assert h.next("one") == "two"
    assert h.next("two") == "three"
    assert h.next("three") == "half typed"
    assert h.next("half typed") is None  # not browsing any more


def test_history_is_bounded() -> None:
    h = InputHistory(limit=3)
    for n in range(10):
        h.add(str(n))
    assert h.lines == ["7", "8", "9"]


# ------------------------------------------------------------------ the window model

from zchat import protocol as p  # noqa: E402
from zchat.tui.widgets import Buffer, Note, nick_colour  # noqa: E402


def msg(seq: int, sender: str = "bob", text: str = "hi", room: str = "general", kind: str = "text", epoch: str = "e1") -> p.Msg:
    return p.Msg(room=room, seq=seq, id=f"m{seq}", ts=1000.0 + seq, sender=sender, text=text, kind=kind, epoch=epoch)  # type: ignore[arg-type]


def test_a_window_keeps_messages_in_seq_order_once() -> None:
    buf = Buffer("general", "alice")
    assert buf.add(msg(5)) == 0
    assert buf.add(msg(7)) == 1
    assert buf.add(msg(6)) == 1  # a late one goes in between
    assert buf.add(msg(6)) is None  # and only once
    buf.note("a note")
    assert buf.add(msg(2)) == 0  # older history goes on top
    assert [e.item.seq if isinstance(e.item, p.Msg) else "note" for e in buf.entries] == [2, 5, 6, 7, "note"]
    assert buf.oldest == 2 and buf.newest == 7


def test_a_window_keeps_a_bounded_scrollback_and_can_fetch_the_rest_again() -> None:
    """A window open for weeks in a busy room: live lines push the oldest out (memory
    stays bounded); what went is history again (scrolling up fetches it)."""
    from zchat.tui.widgets import MAX_ENTRIES, TRIM_TO

    buf = Buffer("general", "alice")
    buf.complete = True
    for seq in range(1, MAX_ENTRIES + 1):
        assert buf.add(msg(seq)) == seq - 1
    assert len(buf.entries) == MAX_ENTRIES and not buf.trimmed
    index = buf.add(msg(MAX_ENTRIES + 1))  # one more live line
    assert len(buf.entries) == TRIM_TO and index == TRIM_TO - 1 and buf.entries[index].item.seq == MAX_ENTRIES + 1
    assert buf.trimmed and not buf.complete and buf.oldest == MAX_ENTRIES + 2 - TRIM_TO
    assert len(buf.seqs) == TRIM_TO and buf.newest == MAX_ENTRIES + 1
    for seq in range(MAX_ENTRIES + 2, 3 * MAX_ENTRIES):
        buf.add(msg(seq))
    assert len(buf.entries) <= MAX_ENTRIES and len(buf.seqs) <= MAX_ENTRIES
    older = buf.oldest - 1
    assert buf.add(msg(older)) == 0  # scrolled up: the line fetched again goes on top
    assert buf.oldest == older


def test_unread_counts_skip_own_lines_and_joins_and_mark_mentions() -> None:
    buf = Buffer("general", "alice")
    for m in (msg(1), msg(2, sender="alice"), msg(3, kind="join", text=""), msg(4, kind="me", text="waves")):
        buf.count_unread(m)
    assert (buf.unread, buf.mentioned) == (2, False)
    buf.count_unread(msg(5, text="@Alice: look"))
    assert (buf.unread, buf.mentioned) == (3, True)
    buf.count_unread(msg(6, text="malice is not a mention"))
    buf.seen()
    assert (buf.unread, buf.mentioned) == (0, False)


def test_a_direct_conversation_window() -> None:
    buf = Buffer(p.dm_room("alice", "bob"), "alice")
    assert (buf.is_dm, buf.peer, buf.title) == (True, "bob", "@bob")
    buf.count_unread(msg(1, room=buf.key, text="no name in it"))
    assert buf.mentioned  # every direct message is for you


def test_members_follow_live_joins_and_parts() -> None:
    buf = Buffer("general", "alice")
    buf.live(msg(1, sender="carol", kind="join", text=""))
    buf.live(msg(2, sender="dave", text="hello"))
    buf.live(msg(3, sender="carol", kind="part", text=""))
    assert buf.members == {"dave": True}


def test_a_new_epoch_starts_the_window_afresh() -> None:
    buf = Buffer("general", "alice")
    for seq in (1, 2, 3):
        buf.add(msg(seq))
    assert buf.add(msg(1, text="after the reset", epoch="e2")) is not None
    notes = [e.item for e in buf.entries if isinstance(e.item, Note)]
    texts = [e.item.text for e in buf.entries if isinstance(e.item, p.Msg)]
    assert texts == ["after the reset"] and len(notes) == 1 and "reset" in notes[0].text


def test_clear_empties_the_window() -> None:
    buf = Buffer("general", "alice")
    for seq in (1, 2, 3):
        buf.add(msg(seq))
    buf.clear()
    assert buf.entries == [] and buf.cleared_below == 3
    assert buf.add(msg(4)) == 0


def test_nick_colours_are_stable_and_spread() -> None:
    assert nick_colour("alice") == nick_colour("alice")
    assert len({nick_colour(n) for n in ("alice", "bob", "carol", "dave")}) == 4


def test_search_command() -> None:
    from zchat import protocol as p
    from zchat.tui import commands as c

    assert c.parse("/search deploy failed") == c.Search("deploy failed")
    for bad in ("/search", "/search   ", "/search " + "x" * (p.MAX_SEARCH_TEXT + 1)):
        try:
            c.parse(bad)
        except c.CommandError as exc:
            assert "/search TEXT" in str(exc)
        else:
            raise AssertionError(bad)


def test_edit_and_delete_commands() -> None:
    from zchat.tui import commands as c

    assert c.parse("/edit the right words") == c.Edit("the right words")
    assert c.parse("/delete") == c.Edit(None)
    for bad in ("/edit", "/delete 5"):
        try:
            c.parse(bad)
        except c.CommandError:
            pass
        else:
            raise AssertionError(bad)

"""Issue 11: every line typed or pasted in the full-screen client is sent once, in order.

Real ChatApp under Pilot against a real in-process broker; what was stored is read
back with a second client's ``history()``. No fixed sleeps: waits poll with deadlines,
and "nothing else was sent" is checked after a later marker line has arrived.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

from textual import events
from textual.keys import _character_to_key
from textual.widgets import Static

from tests.conftest import HEARTBEAT, RunningBroker
from tests.tui.test_app import SIZE, app_for, connected, lines, shown, soon, typed, until
from zchat import protocol as p
from zchat.client import Client
from zchat.core import Limits
from zchat.tui import app as tui
from zchat.tui.app import ChatApp


def burst(app: ChatApp, *keys: str) -> None:
    """Queue key presses the way a fast typist's terminal delivers them: all at once,
    before the app has handled any (Pilot's ``press`` waits for idle after each key)."""
    driver = app._driver
    assert driver is not None
    for key in keys:
        if key == "enter":
            event = events.Key("enter", "\r")
        elif len(key) > 1:
            event = events.Key(key, None)
        else:
            event = events.Key(key if key.isalnum() else _character_to_key(key), key)
        event.set_sender(app)
        driver.send_message(event)


async def stored(client: Client, room: str = "general", sender: str = "alice") -> list[tuple[str, str]]:
    """(kind, text) of ``sender``'s chat lines in ``room``, as the broker stored them."""
    msgs = await soon(client.history(room, limit=500))
    return [(m.kind, m.text) for m in msgs if m.sender == sender and m.kind in ("text", "me")]


async def stored_until(pilot, client: Client, last: tuple[str, str], room: str = "general") -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """What was stored once ``last`` (a marker sent after everything else) is there."""
    deadline = time.monotonic() + 10.0
    while True:
        got = await stored(client, room)
        if last in got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{last!r} not stored within 10s; stored: {got}\nlog: {lines(pilot.app)}")
        await pilot.pause()
        await asyncio.sleep(0.02)  # polling interval


async def test_keys_typed_right_after_enter_start_a_new_line(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        app.input.insert_text_at_cursor("yes, 1.4 is out")
        burst(app, "enter", *"/me celebrates", "enter", *"and a third", "enter")
        await until(pilot, lambda: shown(app, "and a third") == 1, "the third line in the log")
        await typed(pilot, "marker")
        got = await stored_until(pilot, bob, ("text", "marker"))
        assert got == [("text", "yes, 1.4 is out"), ("me", "celebrates"), ("text", "and a third"), ("text", "marker")], lines(app)
        assert app.input.value == ""
        # and Up recalls them in order, each once (the first Up on the empty line offers
        # to edit the last one, as Slack does)
        await until(pilot, lambda: app.buffers["general"].last_own() is not None, "our last line shown")
        for want in ("/edit marker", "marker", "and a third", "/me celebrates", "yes, 1.4 is out"):
            await pilot.press("up")
            assert app.input.value == want


async def test_a_line_typed_before_a_window_switch_goes_to_its_window(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    app = app_for(broker, rooms=["general", "dev"])
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await until(pilot, lambda: app.buffers["dev"].loaded, "#dev loaded")
        burst(app, *"for general", "enter", "ctrl+n", *"for dev", "enter", "ctrl+p", *"general again", "enter")
        await until(pilot, lambda: shown(app, "general again") == 1, "the last line")
        assert app.current == "general"
        await typed(pilot, "marker")
        assert await stored_until(pilot, bob, ("text", "marker")) == [("text", "for general"), ("text", "general again"), ("text", "marker")]
        assert await stored(bob, "dev") == [("text", "for dev")]


async def test_ctrl_q_right_after_a_line_sends_it_first(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        burst(app, *"bye all", "enter", "ctrl+q")
        deadline = time.monotonic() + 10
        while app.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # polling interval
        assert not app.is_running
    assert await stored(bob) == [("text", "bye all")]


async def test_a_short_multi_line_paste_sends_each_line_once_in_order(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        app.input.post_message(events.Paste("first pasted line\nsecond pasted line\n/me pastes a third\n"))
        await until(pilot, lambda: shown(app, "alice pastes a third") == 1, "the third pasted line in the log")
        await typed(pilot, "marker")
        got = await stored_until(pilot, bob, ("text", "marker"))
        assert got == [("text", "first pasted line"), ("text", "second pasted line"), ("me", "pastes a third"), ("text", "marker")]
        assert app.input.value == ""

        # a paste into a half-typed line: the typed text starts the first line; a paste
        # without a final newline is sent whole too (the input is a single line)
        await typed(pilot, "so: ", enter=False)
        app.input.post_message(events.Paste("one\r\ntwo"))
        await until(pilot, lambda: shown(app, "alice", "two") == 1, "the pasted lines")
        await typed(pilot, "marker 2")
        got = await stored_until(pilot, bob, ("text", "marker 2"))
        assert got[4:] == [("text", "so: one"), ("text", "two"), ("text", "marker 2")]

        # one line pasted (with or without its newline) stays in the input to be edited
        app.input.post_message(events.Paste("just one line\n"))
        await until(pilot, lambda: app.input.value == "just one line", "the single line in the input")


async def test_a_long_paste_asks_first(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    app = app_for(broker)
    pasted = [f"pasted line {n}" for n in range(8)]
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)

        # Esc cancels: nothing sent, the input as it was
        await typed(pilot, "draft", enter=False)
        app.input.post_message(events.Paste("\n".join(pasted)))
        await until(pilot, lambda: isinstance(app.screen, tui.PasteConfirm), "the paste prompt")
        assert app.screen.question == "Paste 8 lines to #general?"  # type: ignore[attr-defined]
        assert app.sendq.qsize() == 0 and not app.sending
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, tui.PasteConfirm), "the prompt gone")
        assert app.input.value == "draft"
        assert shown(app, "paste of 8 lines cancelled") == 1
        app.input.value = ""
        await typed(pilot, "marker 1")
        got = await stored_until(pilot, bob, ("text", "marker 1"))
        assert got == [("text", "marker 1")]

        # n cancels too
        app.input.post_message(events.Paste("\n".join(pasted)))
        await until(pilot, lambda: isinstance(app.screen, tui.PasteConfirm), "the paste prompt again")
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, tui.PasteConfirm), "the prompt gone")

        # Enter sends all eight, in order, once
        app.input.post_message(events.Paste("\n".join(pasted) + "\n"))
        await until(pilot, lambda: isinstance(app.screen, tui.PasteConfirm), "the paste prompt a third time")
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, tui.PasteConfirm), "the prompt gone")
        await typed(pilot, "marker 2")
        got = await stored_until(pilot, bob, ("text", "marker 2"))
        assert got == [("text", "marker 1"), *(("text", t) for t in pasted), ("text", "marker 2")]

        # and y sends as well
        app.input.post_message(events.Paste("\n".join(pasted)))
        await until(pilot, lambda: isinstance(app.screen, tui.PasteConfirm), "the paste prompt a fourth time")
        await pilot.press("y")
        await typed(pilot, "marker 3")
        got = await stored_until(pilot, bob, ("text", "marker 3"))
        assert got[-9:] == [*(("text", t) for t in pasted), ("text", "marker 3")]
        assert len(got) == 19


async def test_member_counts_are_singular_for_one(broker, connect) -> None:  # type: ignore[no-untyped-def]
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        topic = lambda: str(app.query_one("#topic", Static).content)  # noqa: E731
        await until(pilot, lambda: "#general · 1 member, 1 online" in topic(), "one member in the header")
        await typed(pilot, "/who")
        await until(pilot, lambda: shown(app, "#general: 1 member; online: alice") == 1, "/who with one member")
        await typed(pilot, "/rooms")
        await until(pilot, lambda: shown(app, "#general: 1 member, 1 online (joined)") == 1, "/rooms with one member")
        bob = await connect("bob")
        await soon(bob.join("general"))
        await until(pilot, lambda: "#general · 2 members, 2 online" in topic(), "two members in the header")
        await typed(pilot, "/rooms")
        await until(pilot, lambda: shown(app, "#general: 2 members, 2 online (joined)") == 1, "/rooms with two members")


async def test_an_unrecoverable_gap_is_a_line_in_its_rooms_log(broker, connect) -> None:  # type: ignore[no-untyped-def]
    """A real gap: while alice's broker is down, bob talks through another broker on
    the same database, and some of those lines are then trimmed from it. When alice's
    broker is back she learns the room's new head, fetches what she missed, and the
    client library reports the trimmed lines as a Gap; her window shows it in place."""
    bob = await connect("bob")
    await soon(bob.join("general"))
    app = app_for(broker, rooms=["general", "dev"])
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await soon(bob.send("general", "before the gap"))
        await until(pilot, lambda: shown(app, "bob", "before the gap") == 1, "bob's first line")

        await broker.stop()
        other = await RunningBroker(broker.path, broker.limits).start()  # same history, other ports
        try:
            bob2 = Client(other.endpoint, "bob", "secret-of-bob-0123456789")
            await soon(bob2.connect())
            await soon(bob2.join("general"))
            for n in range(12):
                await soon(bob2.send("general", f"trimmed {n}" if n < 10 else f"kept {n}"))
            await bob2.close()
        finally:
            await other.stop()
        with sqlite3.connect(broker.path) as db:
            assert db.execute("DELETE FROM messages WHERE room = 'general' AND text LIKE 'trimmed %'").rowcount == 10
        db.close()
        await app.input.run_action("app.cycle(1)")  # look at #dev meanwhile: the gap is shown all the same
        assert app.current == "dev"
        await broker.start()

        await until(pilot, lambda: any("kept 11" in e.item.text for e in app.buffers["general"].entries), "the kept lines recovered", timeout=20)
        await pilot.press("ctrl+p")
        assert app.current == "general"
        log = lines(app)
        gap = [n for n, line in enumerate(log) if "— 10 messages missing (no longer in history) —" in line]
        assert len(gap) == 1, log
        before = next(n for n, line in enumerate(log) if "before the gap" in line)
        kept = next(n for n, line in enumerate(log) if "kept 10" in line)
        assert before < gap[0] < kept, log
        assert shown(app, "trimmed") == 0 and shown(app, "kept 11") == 1


def test_a_gap_line_sits_where_the_missing_messages_would_be() -> None:
    from zchat.tui.widgets import Buffer, Note

    buf = Buffer("general", "alice")
    for seq in (1, 2, 9, 10):
        buf.add(p.Msg(room="general", seq=seq, id=f"m{seq}", ts=0.0, sender="bob", kind="text", text=f"line {seq}", epoch="e"))
    buf.note("a note after line 10")
    index = buf.gap(3, 8, "no longer in history")
    texts = [e.item.text for e in buf.entries]
    assert texts == ["line 1", "line 2", "— 6 messages missing (no longer in history) —", "line 9", "line 10", "a note after line 10"]
    assert index == 2 and isinstance(buf.entries[index].item, Note) and buf.entries[index].item.style == "gap"
    buf.gap(11, 11, "beyond the recovery limit")
    assert buf.entries[-1].item.text == "— 1 message missing (beyond the recovery limit) —"


def test_counted_agrees_with_the_number() -> None:
    from zchat.tui.commands import counted

    assert [counted(n, "member") for n in (0, 1, 2)] == ["0 members", "1 member", "2 members"]


async def test_a_paste_past_the_brokers_burst_is_sent_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The broker allows a burst of 3 lines, then 20 a second: the 12 pasted lines are
    all stored, in order, the refused ones sent again rather than dropped."""
    limited = await RunningBroker(tmp_path / "limited.db", Limits(heartbeat=HEARTBEAT, rate=20, burst=3)).start()
    bob = Client(limited.endpoint, "bob", "secret-of-bob-0123456789")
    try:
        await soon(bob.connect())
        app = app_for(limited)
        pasted = [f"fast line {n}" for n in range(12)]
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot)
            app.input.post_message(events.Paste("\n".join(pasted)))
            await until(pilot, lambda: isinstance(app.screen, tui.PasteConfirm), "the paste prompt")
            await pilot.press("y")
            await until(pilot, lambda: shown(app, "fast line 11") == 1, "the last line", timeout=20)
            assert shown(app, "!!") == 0, lines(app)
        assert await stored(bob) == [("text", t) for t in pasted]
        assert limited.core.counters.get("rate_limited", 0) > 0  # the limit was really hit
    finally:
        await bob.close()
        await limited.stop()


async def test_a_paste_bigger_than_the_send_queue_is_refused_whole(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await typed(pilot, "draft", enter=False)
        app.input.post_message(events.Paste("\n".join(f"line {n}" for n in range(tui.MAX_QUEUED + 1))))
        await until(pilot, lambda: shown(app, f"paste of {tui.MAX_QUEUED + 1} lines not sent") == 1, "the refusal")
        assert not isinstance(app.screen, tui.PasteConfirm) and app.input.value == "draft"
        app.input.value = ""
        await typed(pilot, "marker")
        assert await stored_until(pilot, bob, ("text", "marker")) == [("text", "marker")]


async def test_a_gap_in_a_conversation_not_open_opens_its_window(broker) -> None:  # type: ignore[no-untyped-def]
    """Routing only (the Gap is handed to the app's event handler, as the client's
    reader would): the line goes to its conversation, not to the window in view."""
    from zchat.recovery import Gap

    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        dm = p.dm_room("alice", "bob")
        app._on_event(Gap(dm, 3, 5, "no longer in history"))
        await until(pilot, lambda: "@bob" in app.query_one("#rooms").plain, "bob's conversation in the window list")  # type: ignore[attr-defined]
        assert [e.item.text for e in app.buffers[dm].entries] == ["— 3 messages missing (no longer in history) —"]
        assert app.current == "general" and shown(app, "missing") == 0


async def test_a_history_reset_is_one_clear_line(broker, connect, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The broker comes back with a new database: the client reports everything seen
    as a Gap, then the new history's lines arrive and the window starts afresh with
    one line saying so (the old lines and the gap line go with the old history)."""
    bob = await connect("bob")
    await soon(bob.join("general"))
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await soon(bob.send("general", "old world"))
        await until(pilot, lambda: shown(app, "bob", "old world") == 1, "bob's line")
        await broker.stop()
        broker.path = tmp_path / "replacement.db"
        await broker.start()
        await until(pilot, lambda: shown(app, "the broker's history was reset: earlier lines are gone") == 1, "the reset line", timeout=20)
        await soon(bob.send("general", "new world", timeout=15))
        await until(pilot, lambda: shown(app, "bob", "new world") == 1, "bob's new line", timeout=20)
        assert shown(app, "old world") == 0 and shown(app, "missing") == 0, lines(app)
        assert shown(app, "history was reset") == 1, lines(app)


def test_a_reset_gap_line_goes_below_the_lines_it_covers() -> None:
    from zchat.tui.widgets import Buffer

    buf = Buffer("general", "alice")
    for seq in (1, 2, 3):
        buf.add(p.Msg(room="general", seq=seq, id=f"m{seq}", ts=0.0, sender="bob", kind="text", text=f"line {seq}", epoch="e"))
    assert buf.gap(1, 3, "the broker's history was reset") == 3
    assert buf.entries[-1].item.text == "— 3 messages missing (the broker's history was reset) —"

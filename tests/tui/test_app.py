"""The full-screen client, driven by Textual's Pilot against a real in-process broker.

Each test runs the real ChatApp (its Client talks to the broker over real sockets in
the same loop) and asserts on what the widgets show. No fixed sleeps: every wait
polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Callable

from textual.pilot import Pilot

from tests.conftest import RunningBroker, collect
from zchat import protocol as p
from zchat.tui.app import ChatApp
from zchat.tui.widgets import MemberList, RoomList, StatusBar

SIZE = (120, 36)


def app_for(broker: RunningBroker, name: str = "alice", rooms: list[str] | None = None, history: int = 50) -> ChatApp:
    return ChatApp(broker.endpoint, name, rooms or ["general"], secret=f"secret-of-{name}-0123456789", history=history)


async def until(pilot: Pilot, predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Let the app run until ``predicate`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        await pilot.pause()
        if predicate():
            return
        if time.monotonic() > deadline:
            app = pilot.app
            assert isinstance(app, ChatApp)
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}\nlog: {app.log_view.plain_lines()}\n"
                f"rooms: {rooms_text(app)!r}\nstatus: {status_text(app)!r}\nclient: {client_health(app)}"
            )
        await asyncio.sleep(0.02)


async def soon(awaitable, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """Await a client call with a deadline, so a stuck broker fails the test at its line."""
    return await asyncio.wait_for(awaitable, timeout)


def client_health(app: ChatApp) -> str:
    """For failure messages: the client's state and any of its tasks that ended."""
    client = app.client
    if client is None:
        return "no client"
    ended = [(t.get_coro().__qualname__, t.exception() if not t.cancelled() else "cancelled") for t in client._tasks if t.done()]
    return f"state {client.state} since {time.time() - client.state_since:.1f}s, pending sends {len(client._pending)}, ended tasks {ended}"


def lines(app: ChatApp) -> list[str]:
    return app.log_view.plain_lines()


def shown(app: ChatApp, *parts: str) -> int:
    """How many log lines contain every one of ``parts``."""
    return sum(1 for line in lines(app) if all(part in line for part in parts))


def rooms_text(app: ChatApp) -> str:
    return app.query_one("#rooms", RoomList).plain


def status_text(app: ChatApp) -> str:
    return app.query_one("#status", StatusBar).plain


def members_text(app: ChatApp) -> str:
    return app.query_one("#members", MemberList).plain


async def typed(pilot: Pilot, text: str, enter: bool = True, keys: bool = False) -> None:
    """Put ``text`` in the input line (key by key with ``keys``) and press Enter."""
    app = pilot.app
    assert isinstance(app, ChatApp)
    if keys:
        await pilot.press(*text)
    else:
        app.input.insert_text_at_cursor(text)
    if enter:
        await pilot.press("enter")


async def connected(pilot: Pilot) -> ChatApp:
    app = pilot.app
    assert isinstance(app, ChatApp)
    await until(pilot, lambda: app.state == "connected" and "general" in app.buffers and app.buffers["general"].loaded, "connected and joined")
    return app


async def test_typing_shows_the_message_in_a_second_clients_view(broker) -> None:  # type: ignore[no-untyped-def]
    alice, bob = app_for(broker, "alice"), app_for(broker, "bob")
    async with alice.run_test(size=SIZE) as pa, bob.run_test(size=SIZE) as pb:
        await connected(pa)
        await connected(pb)
        await until(pb, lambda: "● alice" in members_text(bob) and "● bob" in members_text(bob), "both online in bob's member list")

        await typed(pa, "hello bob, long time no see", keys=True)
        await until(pb, lambda: shown(bob, "alice", "hello bob, long time no see") == 1, "alice's line in bob's view")
        await until(pa, lambda: shown(alice, "alice", "hello bob, long time no see") == 1, "alice's line in her own view")

        await typed(pb, "/me waves back")
        await until(pa, lambda: shown(alice, "*", "bob waves back") == 1, "bob's action in alice's view")
        assert alice.input.value == "" and bob.input.value == ""
        assert "● connected" in status_text(alice) and "alice" in status_text(alice) and "#general" in status_text(alice)

        # Up recalls the earlier line, Down returns to what was being typed
        await typed(pa, "draft", enter=False)
        await pa.press("up")
        assert alice.input.value == "hello bob, long time no see"
        await pa.press("down")
        assert alice.input.value == "draft"
        # Tab completes a nick at the start of the line
        alice.input.value = ""
        await typed(pa, "bo", enter=False, keys=True)
        await pa.press("tab")
        assert alice.input.value == "bob: "


async def test_join_and_switching_rooms(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await typed(pilot, "/join #dev")
        await until(pilot, lambda: app.current == "dev" and app.buffers["dev"].loaded, "switched to #dev")
        assert rooms_text(app).splitlines() == [" 1 #general", " 2 #dev"]
        assert "#dev" in status_text(app)

        await soon(bob.join("dev"))
        await soon(bob.send("dev", "welcome to dev"))
        await until(pilot, lambda: shown(app, "bob", "welcome to dev") == 1, "bob's line in #dev")
        await until(pilot, lambda: "● bob" in members_text(app), "bob in the member list")

        await pilot.press("ctrl+p")
        assert app.current == "general"
        assert shown(app, "welcome to dev") == 0
        await pilot.press("ctrl+n")
        assert app.current == "dev" and shown(app, "welcome to dev") == 1
        await typed(pilot, "/switch 1")
        assert app.current == "general"
        await typed(pilot, "/switch dev")
        assert app.current == "dev"

        await typed(pilot, "/part")
        await until(pilot, lambda: "dev" not in app.buffers and app.current == "general", "left #dev")
        assert rooms_text(app).splitlines() == [" 1 #general"]


async def test_unread_counts_and_mention_marks(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await soon(bob.join("random"))
    await soon(bob.join("general"))
    app = app_for(broker, rooms=["general", "random"])
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await until(pilot, lambda: app.buffers["random"].loaded, "#random loaded")
        assert app.current == "general"
        for n in range(3):
            await soon(bob.send("random", f"news {n}"))
        await until(pilot, lambda: app.buffers["random"].unread == 3, "3 unread in #random")
        assert " 2 #random (3)" in rooms_text(app).splitlines()
        assert not app.buffers["random"].mentioned

        await soon(bob.send("random", "alice: are you there?"))
        await until(pilot, lambda: "#random (4!)" in rooms_text(app), "a mention mark")
        await soon(bob.send("general", "not counted: you are looking at it"))
        await until(pilot, lambda: shown(app, "not counted") == 1, "the line in #general")
        assert app.buffers["general"].unread == 0

        await pilot.press("ctrl+n")
        assert app.current == "random"
        assert app.buffers["random"].unread == 0 and not app.buffers["random"].mentioned
        assert " 2 #random" in rooms_text(app).splitlines()
        for n in range(3):
            assert shown(app, "bob", f"news {n}") == 1
        assert shown(app, "alice: are you there?") == 1


async def test_msg_opens_a_direct_conversation(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    carol = await connect("carol")
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await typed(pilot, "/msg bob are you free for lunch?")
        dm = p.dm_room("alice", "bob")
        await until(pilot, lambda: app.current == dm, "the conversation window")
        (got,) = await collect(bob, 1)
        assert (got.room, got.sender, got.text) == (dm, "alice", "are you free for lunch?")
        await until(pilot, lambda: shown(app, "alice", "are you free for lunch?") == 1, "her line in the conversation")
        assert "@bob" in rooms_text(app) and "@bob" in status_text(app)

        await soon(bob.send_dm("alice", "sure, noon?"))
        await until(pilot, lambda: shown(app, "bob", "sure, noon?") == 1, "bob's answer in the conversation")
        await typed(pilot, "noon it is")  # plain text in a DM window goes to bob
        (reply,) = [m for m in await collect(bob, 2) if m.sender == "alice"]
        assert (reply.room, reply.text) == (dm, "noon it is")

        # a DM from someone else opens its own window, marked, without switching to it
        await pilot.press("ctrl+p")
        assert app.current == "general"
        await soon(carol.send_dm("alice", "psst"))
        await until(pilot, lambda: "@carol (1!)" in rooms_text(app), "carol's conversation, marked")
        assert app.current == "general"
        assert shown(app, "psst") == 0


async def test_command_errors_are_one_line(broker) -> None:  # type: ignore[no-untyped-def]
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)

        async def one_error(text: str, expect: str) -> None:
            """``text`` adds exactly one entry to the window: an error line saying ``expect``."""
            before = len(app.buffer.entries)  # type: ignore[union-attr]
            await typed(pilot, text)
            await until(pilot, lambda: shown(app, "!!", expect) == 1, f"the error for {text!r}")
            await pilot.pause()
            new = app.buffer.entries[before:]  # type: ignore[union-attr]
            assert len(new) == 1 and new[0].item.style == "error" and new[0].item.text.startswith(expect), new  # type: ignore[union-attr]
            assert "Traceback" not in "".join(lines(app))

        await one_error("/jion dev", "unknown command /jion: did you mean /join?")
        await one_error("/history lots", "/history needs a number from 1 to 1000")
        await one_error("/join no spaces please", "/join needs one room")
        await one_error("/switch nowhere", "not in #nowhere: /join nowhere first")
        # a refused action: no such user. The empty conversation closes again.
        await one_error("/msg nobody hello?", "not sent: no user 'nobody' [unknown_user]")
        assert app.current == "general" and "@nobody" not in rooms_text(app)
        assert app.input.value == "hello?"  # the text is not lost
        assert app.is_running


async def test_reconnect_indicator_and_nothing_lost_or_doubled(broker: RunningBroker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await soon(bob.join("general"))
    app = app_for(broker)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await typed(pilot, "before the restart")
        await until(pilot, lambda: shown(app, "alice", "before the restart") == 1, "the first line")

        await broker.stop()
        await until(pilot, lambda: app.state == "reconnecting" and "reconnecting" in status_text(app), "the reconnect indicator")
        assert shown(app, "lost the broker") == 1
        await typed(pilot, "while it was down 1")
        await typed(pilot, "while it was down 2")
        await typed(pilot, "half typed", enter=False)
        await until(pilot, lambda: "2 queued" in status_text(app), "two queued lines")
        sending = asyncio.ensure_future(bob.send("general", "bob, also while down"))

        await broker.start()
        await until(pilot, lambda: app.state == "connected" and "● connected" in status_text(app), "connected again", timeout=20)
        assert "reconnecting" not in status_text(app)
        try:
            await asyncio.wait_for(asyncio.shield(sending), 20)
        except asyncio.TimeoutError:
            dead = [(t.get_coro().__name__, t.exception()) for t in bob._tasks if t.done()]
            raise AssertionError(f"bob's send never acked: state {bob.state}, pending {len(bob._pending)}, dead tasks {dead}") from None
        await soon(bob.send("general", "after the restart"))
        await until(pilot, lambda: shown(app, "after the restart") == 1 and "queued" not in status_text(app), "the queue sent", timeout=20)
        for text in ("before the restart", "while it was down 1", "while it was down 2", "bob, also while down", "after the restart"):
            await until(pilot, lambda: shown(app, text) >= 1, f"{text!r} shown")
            assert shown(app, text) == 1, (text, lines(app))
        assert app.input.value == "half typed"
        assert f"recovered {app.client.recovered}" in status_text(app)  # type: ignore[union-attr]

    # and stored once each, in the order typed
    texts = [m.text for m in await soon(bob.history("general", limit=100)) if m.sender == "alice" and m.kind == "text"]
    assert texts == ["before the restart", "while it was down 1", "while it was down 2"]


async def test_scrolling_to_the_top_loads_older_history(broker, connect) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await soon(bob.join("general"))
    for n in range(80):
        await soon(bob.send("general", f"old line {n}"))
    app = app_for(broker, history=20)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        assert shown(app, "old line 79") == 1 and shown(app, "old line 59") == 0
        for _ in range(10):
            await pilot.press("pageup")
            if shown(app, "old line 0") == 1:
                break
            await until(pilot, lambda: not app._fetching, "the fetch done")
        await until(pilot, lambda: shown(app, "old line 0") == 1, "the first line after paging up")
        ends = [line.rsplit(" ", 3)[-3:] for line in lines(app) if "old line" in line]
        assert [" ".join(e) for e in ends] == [f"old line {n}" for n in range(80)]  # each once, in order
        await typed(pilot, "/history 5")
        await until(pilot, lambda: shown(app, "no earlier messages") == 1, "the beginning reported")
        await typed(pilot, "/clear")
        assert shown(app, "old line") == 0


async def test_offline_at_start_then_the_broker_comes(broker: RunningBroker) -> None:
    await broker.stop()
    app = ChatApp(broker.endpoint, "alice", ["general"], secret="secret-of-alice-0123456789", connect_timeout=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: re.search(r"✕ offline \d+s", status_text(app)) is not None, "the offline indicator, with how long")
        await typed(pilot, "typed before the broker was there")
        await until(pilot, lambda: "1 queued" in status_text(app), "the queued line")
        await broker.start()
        await until(pilot, lambda: app.state == "connected" and shown(app, "alice", "typed before the broker was there") == 1,
                    "connected, and the line sent", timeout=20)
        assert "queued" not in status_text(app) and "● connected" in status_text(app)


async def test_a_name_owned_by_someone_else_ends_with_one_clear_message(broker, connect) -> None:  # type: ignore[no-untyped-def]
    await connect("bob")  # bob's name now belongs to bob's secret
    app = ChatApp(broker.endpoint, "bob", ["general"], secret="not-bobs-secret-0123456789")
    async with app.run_test(size=SIZE):
        deadline = time.monotonic() + 10
        while app.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not app.is_running
    assert app.fatal_code == "refused"
    assert "refused the name 'bob'" in app.fatal and "\n" not in app.fatal


async def test_a_broker_error_naming_nothing_is_shown(broker) -> None:  # type: ignore[no-untyped-def]
    """An error with neither rid nor cid (the broker could not read a frame at all) is a
    line on screen, not dropped: the client library hands it over as a Problem."""
    app = app_for(broker)
    async with app.run_test() as pilot:
        await connected(pilot)
        assert app.client is not None
        app.client._dealer.submit(lambda s: s.send(b"\xc1 not messagepack"))  # a frame nobody can read
        await until(pilot, lambda: shown(app, "!! broker: not a MessagePack") == 1, "the problem on screen")


async def test_an_idle_app_repaints_nothing(broker) -> None:  # type: ignore[no-untyped-def]
    """Idle CPU (issue 15): the once-a-second status refresh repaints only when the
    status text changed, and the input's cursor does not blink (a blink repaints the
    input twice a second forever). Measured: idle talk 1.1-1.6% of a core before, 0.25-0.37% after."""
    app = app_for(broker, "alice")
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        status = app.query_one("#status", StatusBar)
        updates: list[object] = []
        real_update = status.update
        status.update = lambda *a, **k: (updates.append(a), real_update(*a, **k))[1]  # type: ignore[method-assign]
        for _ in range(3):
            app._refresh_status()
        assert updates == [], "an unchanged status line was repainted"
        app._set_state("reconnecting", time.time(), "test")
        assert len(updates) == 1 and "reconnecting" in status_text(app), "a changed status line must still show"
        assert app.input.cursor_blink is False

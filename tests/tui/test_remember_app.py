"""talk remembers: read positions across a restart, and notifications on a mention or a
DM. Pilot drives the real app against a real broker; the data directory is a real one."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import RunningBroker
from tests.tui.test_app import SIZE, connected, lines, shown, soon, typed, until
from zchat.tui.app import ChatApp
from zchat.tui.cursors import CursorFile
from zchat.tui.notify import Notifier, NotifySettings
from zchat.tui.search import SearchResults
from zchat.tui.widgets import NEW_SINCE


def talk(broker: RunningBroker, data: Path, name: str = "alice", **kwargs) -> ChatApp:  # type: ignore[no-untyped-def]
    kwargs.setdefault("history", 0)  # what shows after a restart comes from the cursor, not from a history page
    return ChatApp(broker.endpoint, name, ["general"], secret=f"secret-of-{name}-0123456789", data_dir=data, **kwargs)


async def test_a_restarted_talk_shows_what_was_said_while_away(broker: RunningBroker, connect, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await soon(bob.join("general"))
    await soon(bob.send("general", "before alice came"))
    data = tmp_path / "data"
    first = talk(broker, data)
    async with first.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await soon(bob.send("general", "seen by alice"))
        await until(pilot, lambda: shown(first, "seen by alice") == 1, "the live line")
        await typed(pilot, "/quit")
        await until(pilot, lambda: first.client is None, "talk closed")
    saved = CursorFile(data, "alice", broker.endpoint).load()
    assert saved["general"][1] >= 3  # bob's join, two lines: the position was written on leaving

    for n in range(3):
        await soon(bob.send("general", f"while away {n}"))
    second = talk(broker, data)
    async with second.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await until(pilot, lambda: all(shown(second, f"while away {n}") == 1 for n in range(3)), "the lines said while away")
        shown_lines = lines(second)
        marker = [i for i, line in enumerate(shown_lines) if NEW_SINCE in line]
        first_new = next(i for i, line in enumerate(shown_lines) if "while away 0" in line)
        assert marker and marker[0] < first_new, shown_lines
        assert shown(second, "seen by alice") == 0  # history 0: only what came after the cursor
        await soon(bob.send("general", "live again"))
        await until(pilot, lambda: shown(second, "live again") == 1, "a live line")
        assert shown(second, NEW_SINCE) == 1  # one marker, above the lines said while away only
        second.save_cursors()  # the periodic save
        assert CursorFile(data, "alice", broker.endpoint).load()["general"][1] == saved["general"][1] + 4


async def test_more_than_the_bound_missed_is_said_in_the_window(broker: RunningBroker, connect, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await soon(bob.join("general"))
    data = tmp_path / "data"
    first = talk(broker, data)
    async with first.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await until(pilot, lambda: first.client is not None and "general" in first.client.cursors(), "a position")
    for n in range(5):
        await soon(bob.send("general", f"missed {n}"))
    second = talk(broker, data, recover_limit=2)
    async with second.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await until(pilot, lambda: shown(second, "missed 4") == 1 and shown(second, "missing") == 1, "the newest and a gap line")
        assert shown(second, "missed 3") == 1 and shown(second, "missed 2") == 0
        assert shown(second, "3 messages missing", "more than 2 since you left") == 1


class Terminal:
    """Stands in for the terminal and notify-send: what the notifier wrote and ran."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.runs: list[list[str]] = []


def listening(app: ChatApp, **settings: object) -> Terminal:
    term = Terminal()
    settings.setdefault("min_gap", 0.0)
    app.notifier = Notifier(app.me, NotifySettings(**settings), term.out.append, term.runs.append, which=lambda _: None)  # type: ignore[arg-type]
    return term


async def test_a_mention_or_a_dm_rings_and_nothing_else_does(broker: RunningBroker, connect, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await soon(bob.join("general"))
    app = talk(broker, tmp_path / "data", history=50)
    term = listening(app)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await soon(bob.send("general", "hello everyone"))
        await typed(pilot, "alice here, mentioning myself")
        await until(pilot, lambda: shown(app, "hello everyone") == 1 and shown(app, "mentioning myself") == 1, "two lines")
        assert term.out == [] and app.notifier.sent == 0  # neither a mention nor a DM; our own line never rings

        await soon(bob.send("general", "lunch, @alice?"))
        await until(pilot, lambda: app.notifier.sent == 1, "a notification for the mention")
        assert term.out == ["\a", "\x1b]777;notify;zchat: bob in #general;lunch, @alice?\x1b\\"]

        await soon(bob.send_dm("alice", "psst"))
        await until(pilot, lambda: app.notifier.sent == 2, "a notification for the DM")
        assert term.out[-1] == "\x1b]777;notify;zchat: DM from bob;psst\x1b\\"
        await soon(bob.send("general", "malice is not a mention"))
        await soon(bob.send("general", "marker"))
        await until(pilot, lambda: shown(app, "marker") == 1, "the marker line")
        assert app.notifier.sent == 2


async def test_lines_said_while_away_do_not_ring_and_switches_hold(broker: RunningBroker, connect, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await soon(bob.join("general"))
    data = tmp_path / "data"
    first = talk(broker, data)
    async with first.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await until(pilot, lambda: first.client is not None and "general" in first.client.cursors(), "a position")
    await soon(bob.send("general", "alice, while you were away"))
    second = talk(broker, data)
    term = listening(second, bell=False)
    async with second.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await until(pilot, lambda: shown(second, "while you were away") == 1, "the line said while away")
        assert second.notifier.sent == 0  # a catch-up from history is shown, not rung for
        await soon(bob.send("general", "alice: now live"))
        await until(pilot, lambda: second.notifier.sent == 1, "the live mention")
        assert term.out == ["\x1b]777;notify;zchat: bob in #general;alice: now live\x1b\\"]  # no bell: switched off


async def test_search_lists_results_and_enter_jumps_to_the_line(broker: RunningBroker, connect, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bob = await connect("bob")
    await soon(bob.join("general"))
    await soon(bob.send("general", "the needle is here"))
    for n in range(60):
        await soon(bob.send("general", f"hay {n}"))
    app = talk(broker, tmp_path / "data", history=10)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await soon(bob.send_dm("alice", "a needle for you"))
        await until(pilot, lambda: "@alice:bob" in app.buffers and app.buffers["@alice:bob"].seqs, "the DM")
        buf = app.buffers["general"]
        await until(pilot, lambda: shown(app, "hay 59") == 1, "the recent lines")
        assert shown(app, "the needle is here") == 0  # far above what was loaded

        await typed(pilot, "/search needle")
        await until(pilot, lambda: isinstance(app.screen, SearchResults), "the result list")
        results = app.screen
        assert isinstance(results, SearchResults)
        assert [(h.room, h.text) for h in results.hits] == [("@alice:bob", "a needle for you"), ("general", "the needle is here")]
        await pilot.press("down", "enter")
        await until(pilot, lambda: not isinstance(app.screen, SearchResults) and app.current == "general" and buf.focus > 0, "the jump")
        await until(pilot, lambda: shown(app, "the needle is here") == 1, "the line in its window")
        log = app.log_view
        row = next(i for i, line in enumerate(lines(app)) if "the needle is here" in line)
        assert log.scroll_y <= row < log.scroll_y + log.scrollable_content_region.height  # in view
        assert shown(app, "hay 20") == 1  # the lines after it, loaded with it, up to what was shown
        assert shown(app, "missing") == 0  # no hole: the window is whole

        await typed(pilot, "/search needle")
        await until(pilot, lambda: isinstance(app.screen, SearchResults), "the result list again")
        await pilot.press("enter")  # the newest: the DM
        await until(pilot, lambda: app.current == "@alice:bob" and shown(app, "a needle for you") == 1, "the DM window")

        await typed(pilot, "/search nothing-like-it")
        await until(pilot, lambda: shown(app, "nothing found for 'nothing-like-it'") == 1, "a one-line answer")
        await typed(pilot, "/search needle")
        await until(pilot, lambda: isinstance(app.screen, SearchResults), "the result list, once more")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, SearchResults), "closed")
        assert app.current == "@alice:bob"


async def test_edit_and_delete_are_seen_by_a_second_client(broker: RunningBroker, tmp_path: Path) -> None:
    alice, bob = talk(broker, tmp_path / "a", "alice", history=50), talk(broker, tmp_path / "b", "bob", history=50)
    async with alice.run_test(size=SIZE) as pa, bob.run_test(size=SIZE) as pb:
        await connected(pa)
        await connected(pb)
        await typed(pa, "/edit nothing yet")
        await until(pa, lambda: shown(alice, "nothing of yours to edit") == 1, "a one-line refusal")

        await typed(pa, "helo bob")
        await until(pb, lambda: shown(bob, "helo bob") == 1, "the line in bob's view")
        await until(pa, lambda: alice.buffers["general"].last_own() is not None, "alice's line stored and shown")
        await pa.press("up")  # on an empty input: edit the last line, as Slack does
        assert alice.input.value == "/edit helo bob"
        alice.input.value = "/edit hello bob"
        await pa.press("enter")
        await until(pb, lambda: shown(bob, "hello bob (edited)") == 1 and shown(bob, "helo bob") == 0, "the edit in bob's view")
        await until(pa, lambda: shown(alice, "hello bob (edited)") == 1, "the edit in alice's view")
        assert shown(bob, "edited #") == 0  # the edit line changes its line; it is not shown itself

        await typed(pb, "/edit not yours")  # bob has no line of his own here
        await until(pb, lambda: shown(bob, "nothing of yours to edit") == 1, "bob's refusal")
        await pa.press("up")
        assert alice.input.value == "/edit hello bob"
        await pa.press("up")  # Up again: on to the earlier lines typed
        assert alice.input.value == "/edit hello bob"  # the last line typed was that edit
        alice.input.value = ""

        await typed(pa, "/delete")
        await until(pb, lambda: shown(bob, "hello bob") == 0 and shown(bob, "deleted a message") == 1, "the line gone in bob's view")
        await until(pa, lambda: shown(alice, "hello bob") == 0, "gone in alice's view")
        await typed(pa, "one more")
        await until(pa, lambda: shown(alice, "one more") == 1 and alice.buffers["general"].last_own() is not None, "shown")
        await typed(pa, "/edit one more, fixed")
        await until(pb, lambda: shown(bob, "one more, fixed (edited)") == 1, "the second edit in bob's view")

    again = talk(broker, tmp_path / "c", "carol", history=50)  # a later client: history has the latest state
    async with again.run_test(size=SIZE) as pc:
        await connected(pc)
        await until(pc, lambda: shown(again, "deleted a message") == 1, "history")
        assert shown(again, "helo") == 0 and shown(again, "hello bob") == 0
        await until(pc, lambda: shown(again, "one more, fixed (edited)") == 1, "the latest text, marked edited")
        assert shown(again, "edited #") == 0

"""Private rooms and moderation in the full-screen client, driven by Textual's Pilot
against a real in-process broker (its admins: boss)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import HEARTBEAT, RunningBroker, collect
from tests.tui.test_app import SIZE, app_for, connected, shown, soon, typed, until
from zchat.client import Client
from zchat.core import Limits


@pytest.fixture
async def admin_broker(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    running = await RunningBroker(tmp_path / "h.db", Limits(heartbeat=HEARTBEAT, rate=0), admins=("boss",)).start()
    yield running
    await running.stop()


async def client(broker: RunningBroker, name: str) -> Client:
    c = Client(broker.endpoint, name, f"secret-of-{name}-0123456789")
    await soon(c.connect())
    return c


async def test_operator_commands_from_the_tui(admin_broker: RunningBroker) -> None:
    bob = await client(admin_broker, "bob")
    alice = app_for(admin_broker, "alice")
    try:
        async with alice.run_test(size=SIZE) as pa:
            await connected(pa)
            await typed(pa, "/create sec")
            await until(pa, lambda: alice.current == "sec" and "sec" in admin_broker.core.private, "the private room")
            await typed(pa, "/invite bob")
            await until(pa, lambda: shown(alice, "alice invited bob") == 1, "the invite line")
            await soon(bob.join("sec"))
            await soon(bob.send("sec", "hello in secret"))
            await until(pa, lambda: shown(alice, "bob", "hello in secret") == 1, "bob's line")
            await typed(pa, "/topic the plans")
            await until(pa, lambda: shown(alice, "alice set the topic: the plans") == 1, "the topic line")
            await typed(pa, "/topic")
            await until(pa, lambda: shown(alice, "topic of #sec: the plans") == 1, "the topic shown")
            await typed(pa, "/op bob")
            await until(pa, lambda: shown(alice, "alice made an operator: bob") == 1, "the op line")
            await typed(pa, "/deop bob")
            await until(pa, lambda: shown(alice, "alice took operator status from bob") == 1, "the deop line")
            await typed(pa, "/kick bob too loud")
            await until(pa, lambda: shown(alice, "alice kicked bob (too loud)") == 1, "the kick line")
            await until(pa, lambda: "bob" not in alice.buffers["sec"].members, "bob out of the member list")
            await typed(pa, "/ban bob")
            await until(pa, lambda: shown(alice, "alice banned bob") == 1, "the ban line")
            await typed(pa, "/unban bob")
            await until(pa, lambda: shown(alice, "alice unbanned bob") == 1, "the unban line")
            kinds = [m.kind for m in await soon(alice.client.history("sec")) if m.kind not in ("join", "text")]  # type: ignore[union-attr]
            assert kinds == ["invite", "topic", "op", "deop", "kick", "ban", "unban"]
    finally:
        await bob.close()


async def test_a_non_operator_gets_one_clear_error_line(admin_broker: RunningBroker) -> None:
    alice = await client(admin_broker, "alice")
    await soon(alice.join("general"))  # alice opened it: she runs it
    bob = app_for(admin_broker, "bob")
    try:
        async with bob.run_test(size=SIZE) as pb:
            await connected(pb)
            for line in ("/kick alice", "/ban alice", "/op bob", "/topic mine", "/invite alice"):
                await typed(pb, line)
            await until(pb, lambda: shown(bob, "only the operators of #general may", "forbidden") == 5, "five refusals")
            await typed(pb, "/kick")
            await until(pb, lambda: shown(bob, "/kick needs one name") == 1, "the usage error")
    finally:
        await alice.close()


async def test_a_deleted_message_is_hidden_and_an_invite_and_a_kick_are_told(admin_broker: RunningBroker) -> None:
    root, carol = await client(admin_broker, "boss"), await client(admin_broker, "carol")
    await soon(carol.join("general"))
    bob = app_for(admin_broker, "bob")
    try:
        async with bob.run_test(size=SIZE) as pb:
            await connected(pb)
            stored = await soon(carol.send("general", "something awful"))
            await soon(carol.send("general", "something fine"))
            await until(pb, lambda: shown(bob, "something fine") == 1 and shown(bob, "something awful") == 1, "both lines")
            await soon(root.delete("general", stored.seq))
            await until(pb, lambda: shown(bob, "something awful") == 0, "the deleted line hidden")
            assert shown(bob, "boss deleted a message") == 1 and shown(bob, "something fine") == 1
            await soon(carol.join("sec", private=True))
            await soon(carol.invite("sec", "bob"))
            await until(pb, lambda: shown(bob, "carol invited you to #sec") == 1, "the invite note")
            await typed(pb, "/join sec")
            await until(pb, lambda: bob.current == "sec", "bob in #sec")
            await soon(carol.kick("sec", "bob", "bye"))
            await until(pb, lambda: shown(bob, "carol kicked bob (bye)") >= 1 and shown(bob, "you are out of #sec") == 1, "the kick told")
            (line,) = await collect(carol, 1, where=lambda m: m.kind == "kick")
            assert line.to == "bob"
    finally:
        await root.close()
        await carol.close()

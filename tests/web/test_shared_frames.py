"""The gateway's shared encodings (zchat.web.wire.Shared) and each tab's way out
(zchat.web.tab.Tab: bursts and the writer's queue), against a real broker: sharing must
never give a user a line meant for others, and a tab's frames stay in order."""

from __future__ import annotations

import asyncio
import socket

from tests.web.conftest import RunningWeb
from tests.web.test_gateway import signed_up
from zchat import protocol as p
from zchat.web import wire

N = 5


async def test_shared_frames_give_each_user_only_their_dms_and_private_rooms(users, connect, site: RunningWeb) -> None:  # type: ignore[no-untyped-def]
    """Two DM conversations and a private room whose lines have the same seqs as other
    rooms' lines (seqs are per room): a cache keyed on less than the whole line would hand
    one user another's text."""
    alice, bob, carol, dave = await signed_up(users, "alice", "bob", "carol", "dave")
    tabs = {u.name: await u.tab() for u in (alice, bob, carol, dave)}
    eve = await connect("eve")
    await eve.join("general")
    await eve.join("secret", private=True)
    await eve.invite("secret", "bob")
    await tabs["bob"].send(t="join", room="secret")
    await tabs["bob"].until(lambda t: t.of("joined"), what="bob in #secret")
    for i in range(N):
        await tabs["alice"].send(t="send", ref=f"ab{i}", to="bob", text=f"alice to bob {i}")
        await tabs["carol"].send(t="send", ref=f"cd{i}", to="dave", text=f"carol to dave {i}")
        await eve.send("secret", f"secret {i}")
        await eve.send("general", f"public {i}")
    await eve.send("general", "marker")  # after every line above: once a tab has it, it has the rest
    for tab in tabs.values():
        await tab.until(lambda t: "marker" in t.texts("general"), what="the marker")
    ab, cd = p.dm_room("alice", "bob"), p.dm_room("carol", "dave")
    public = [f"public {i}" for i in range(N)] + ["marker"]
    want = {
        "alice": {"general": public, ab: [f"alice to bob {i}" for i in range(N)]},
        "bob": {"general": public, ab: [f"alice to bob {i}" for i in range(N)], "secret": [f"secret {i}" for i in range(N)]},
        "carol": {"general": public, cd: [f"carol to dave {i}" for i in range(N)]},
        "dave": {"general": public, cd: [f"carol to dave {i}" for i in range(N)]},
    }
    for name, tab in tabs.items():
        live = [i for f in tab.of("events") for i in f["items"] if i["t"] == "msg" and i["kind"] == "text"]
        got: dict[str, list[str]] = {}
        for m in live:
            got.setdefault(m["room"], []).append(m["text"])
        for room in want[name]:  # DMs may also arrive by history (a new conversation): the live ones must be right
            await tab.until(lambda t, room=room, texts=want[name][room]: t.texts(room) == texts, what=f"{name}'s {room}")
        assert set(got) <= set(want[name]), f"{name} got lines of {set(got) - set(want[name])}"
        for room, texts in got.items():
            assert texts == [t for t in want[name][room] if t in texts], f"{name}'s {room}: {texts}"
    assert site.gateway.shared.hits > 0  # #general's lines were encoded once for the four users


async def test_a_backed_up_tab_gets_every_line_once_in_order(users, connect, site: RunningWeb) -> None:  # type: ignore[no-untyped-def]
    """A tab whose socket backs up (a thin send buffer) switches between bursts and the
    writer's queue many times: no frame may overtake another or go twice."""
    (alice,) = await signed_up(users, "alice")
    tab = await alice.tab()
    (gw_tab,) = site.gateway.users["alice"].tabs
    gw_tab.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
    eve = await connect("eve")
    await eve.join("general")
    count = 300
    line = "y" * 2000
    sent = await asyncio.gather(*(eve.post("general", f"{i} {line}") for i in range(count)))
    last = max(s.seq for s in sent)
    await tab.until(lambda t: any(m["seq"] == last for m in t.messages("general")), timeout=30, what="the last line")
    seqs = [m["seq"] for f in tab.of("events") for m in f["items"] if m["t"] == "msg" and m["room"] == "general"]
    assert seqs == sorted(set(seqs)), "frames overtook each other or came twice"
    texts = [int(t.split()[0]) for t in tab.texts("general")]
    assert texts == list(range(count))


def test_shared_is_bounded_and_keys_on_the_whole_line() -> None:
    shared = wire.Shared(max_entries=8, max_chars=64 * 1024)

    def frame(*evs: p.Msg) -> bytes:
        ((data, whole),) = wire.events(shared, list(evs))
        assert whole.endswith(data) and whole[:1] == b"\x81"  # one text frame, unmasked
        return data

    a = p.Msg(room="@a:b", seq=1, id="x1", ts=1.0, sender="a", text="for b", epoch="e")
    c = p.Msg(room="@c:d", seq=1, id="x1", ts=1.0, sender="c", text="for d", epoch="e")
    assert b"for b" in frame(a) and b"for d" in frame(c) and b"for b" not in frame(c)
    assert frame(a, c) != frame(c, a) and frame(a, c) is frame(a, c)  # a batch is shared too, in its order
    mid = p.Msg(room="@a:b", seq=2, id="x2", ts=1.0, sender="a", text="middle one", epoch="e")
    other = p.Msg(room="@a:b", seq=2, id="x2", ts=1.0, sender="a", text="another middle", epoch="e")
    assert b"middle one" in frame(a, mid, c) and b"another middle" in frame(a, other, c)  # same ends, not the same batch
    edited = p.Msg(room="@a:b", seq=1, id="x1", ts=1.0, sender="a", text="for b, edited", epoch="e", edited=2)
    assert b"edited" in frame(edited)
    for i in range(100):
        frame(p.Msg(room="general", seq=i, id=f"m{i}", ts=1.0, sender="a", text="t" * 100, epoch="e"))
    assert len(shared) <= 16
    big = p.Msg(room="general", seq=999, id="big", ts=1.0, sender="a", text="z" * 5000, epoch="e")
    assert frame(big) is not frame(big)  # a line over 1/64 of the budget is not kept

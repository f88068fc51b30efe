"""protocol.encode_sends: the client's fast path for packing encoded Sends into one
Sends frame must give the very bytes the generic encoder gives, and decode back."""

from __future__ import annotations

import msgspec
import pytest

from zchat import protocol as p


@pytest.mark.parametrize("count", [2, 15, 16, 17, 255, p.MAX_SENDS_ITEMS])
def test_encode_sends_is_the_generic_encoding(count: int) -> None:
    items = [p.encode(p.Send(sid="s" * 16, cid=f"c-{i:x}", text="é" * i, room="general", me=i % 2 == 0)) for i in range(count)]
    fast = p.encode_sends(items)
    assert fast == p.encode(p._RawSends(items=[msgspec.Raw(item) for item in items]))
    sends, bad = p.decode_sends(fast, limit=len(fast))
    assert bad == []
    assert [s.cid for s in sends] == [f"c-{i:x}" for i in range(count)]
    assert [s.text for s in sends] == ["é" * i for i in range(count)]


@pytest.mark.parametrize("text", ["", "hi", "x" * 31, "x" * 32, "é" * 200, "🙂" * 20_000])
@pytest.mark.parametrize(("room", "to", "me"), [("general", "", False), ("ops-2", "", True), ("", "bob", False)])
def test_send_encoder_is_the_generic_encoding(text: str, room: str, to: str, me: bool) -> None:
    encode = p.send_encoder("0123456789abcdef", room, to, me)
    for cid in ("a1b2c3d4e5f6-1", "a1b2c3d4e5f6-" + "f" * 40):
        assert encode(cid, text) == p.encode(p.Send(sid="0123456789abcdef", cid=cid, text=text, room=room, to=to, me=me))


@pytest.mark.parametrize("room", ["\x00", "\x01", "a\x00"])
def test_send_encoder_with_a_placeholder_in_the_room(room: str) -> None:
    """A room the broker will refuse still encodes as the Struct would (no template)."""
    encode = p.send_encoder("0123456789abcdef", room)
    assert encode("c-1", "\x00") == p.encode(p.Send(sid="0123456789abcdef", cid="c-1", text="\x00", room=room))


def test_hot_structs_are_untracked_and_still_equal() -> None:
    """gc=False on Send, Stored and Msg: values, equality and replace are unchanged."""
    import gc

    msg = p.Msg(room="general", seq=1, id="x", ts=1.0, sender="alice", text="hi")
    assert not gc.is_tracked(msg) and not gc.is_tracked(p.Stored("c", "general", 1, "x", 1.0))
    assert p.decode_event(p.encode(msg)) == msg
    assert msgspec.structs.replace(msg, epoch="e").epoch == "e"
